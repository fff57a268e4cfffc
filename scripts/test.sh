#!/usr/bin/env bash
# The project's test command: everything CI checks, runnable on a fresh machine.
# Needs the Rust toolchain, python3 and Node.js with npm; installs etcd, promtool and
# chromium (Debian), a Python venv with grpcio, grpcio-tools and openai (PyPI) and
# playwright-core (npm) when missing; reads the reference models from ../shared. The
# console's browser test writes its screenshots to target/console-screenshots.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d ../shared/refs ]; then
    echo "error: ../shared/refs (the shared reference models) is missing beside the repository" >&2
    exit 1
fi

# Tests run a real etcd (Debian's etcd-server) and promtool (Debian's prometheus).
missing=""
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
if [ -n "$missing" ]; then
    echo "installing:$missing" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
./scripts/python-env.sh >/dev/null   # venv (.venv) and gRPC stubs for tests/python_clients.rs
./scripts/browser-env.sh             # chromium and Playwright for tests/console.rs
cargo test --workspace --locked
