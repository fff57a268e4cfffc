#!/usr/bin/env bash
# Sets up the Python environment for the example clients in examples/python:
#   - a virtual environment at .venv (python3 -m venv; PYTHON picks another interpreter),
#   - the pinned packages below, installed with pip when missing or at another version,
#   - the gRPC stubs (with .pyi types) for proto/sirocco/v1/sirocco.proto in examples/python/generated/
#     (git-ignored; regenerated when the .proto is newer).
# Idempotent, and quick once done. Progress goes to stderr; the last line on stdout is
# the venv's python, e.g. `PY=$(scripts/python-env.sh)`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$REPO/.venv"
PY="$VENV/bin/python"
PROTO="$REPO/proto/sirocco/v1/sirocco.proto"
GEN="$REPO/examples/python/generated"
PINS=(grpcio==1.85.1 grpcio-tools==1.85.1 openai==3.57.0)

# One setup at a time: tests may call this concurrently.
mkdir -p "$REPO/.cache"
exec 9>"$REPO/.cache/python-env.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

if [ ! -x "$PY" ]; then
    base="${PYTHON:-python3}"
    if ! command -v "$base" >/dev/null 2>&1; then
        echo "error: $base not found; install Python 3.9 or newer (and its venv module)" >&2
        exit 1
    fi
    echo "creating $VENV with $("$base" --version 2>&1)" >&2
    rm -rf "$VENV"
    if ! "$base" -m venv "$VENV" >&2; then
        echo "error: '$base -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        rm -rf "$VENV"
        exit 1
    fi
fi

# Which pins are not installed at exactly that version?
missing=$("$PY" - "${PINS[@]}" <<'EOF'
import sys
from importlib import metadata

for pin in sys.argv[1:]:
    name, version = pin.split("==")
    try:
        if metadata.version(name) == version:
            continue
    except metadata.PackageNotFoundError:
        pass
    print(pin)
EOF
)
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    echo "installing:" $missing >&2
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --disable-pip-version-check $missing >&2
fi

stub="$GEN/sirocco/v1/sirocco_pb2_grpc.py"
if [ ! -f "$stub" ] || [ "$PROTO" -nt "$stub" ] || [ -n "$missing" ]; then
    echo "generating gRPC stubs in $GEN" >&2
    tmp="$(mktemp -d "$REPO/examples/python/.generated.XXXXXX")"
    "$PY" -m grpc_tools.protoc -I "$REPO/proto" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" "$PROTO" >&2
    rm -rf "$GEN"
    mv "$tmp" "$GEN"
fi

echo "$PY"
