#!/usr/bin/env bash
# Sets up the Python environment for the example clients in examples/python and the test-data
# tool scripts/quantize-formats.py (numpy, safetensors):
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
PINS=(grpcio==1.85.1 grpcio-tools==1.85.1 openai==3.57.0 numpy==2.4.6 safetensors==0.8.0)

# shellcheck source=lib/venv.sh
source "$REPO/scripts/lib/venv.sh"
ensure_venv "$VENV" "$REPO/.cache/python-env.lock" "${PINS[@]}"

stub="$GEN/sirocco/v1/sirocco_pb2_grpc.py"
if [ ! -f "$stub" ] || [ "$PROTO" -nt "$stub" ] || [ -n "$VENV_INSTALLED" ]; then
    echo "generating gRPC stubs in $GEN" >&2
    tmp="$(mktemp -d "$REPO/examples/python/.generated.XXXXXX")"
    "$PY" -m grpc_tools.protoc -I "$REPO/proto" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" "$PROTO" >&2
    rm -rf "$GEN"
    mv "$tmp" "$GEN"
fi

echo "$PY"
