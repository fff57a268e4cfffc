#!/usr/bin/env bash
# The project's test command: everything CI checks, runnable on a fresh machine.
# Needs the Rust toolchain; installs etcd when missing; reads the reference models
# from ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d ../shared/refs ]; then
    echo "error: ../shared/refs (the shared reference models) is missing beside the repository" >&2
    exit 1
fi

# The membership tests run a real etcd (Debian's etcd-server).
if ! command -v etcd >/dev/null 2>&1; then
    echo "installing etcd-server (needed by the membership tests)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
