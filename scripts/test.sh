#!/usr/bin/env bash
# The project's test command: everything CI checks, runnable on a fresh machine.
# Needs only the Rust toolchain; the reference models are read from ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d ../shared/refs ]; then
    echo "error: ../shared/refs (the shared reference models) is missing beside the repository" >&2
    exit 1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
