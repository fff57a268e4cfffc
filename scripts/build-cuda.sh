#!/usr/bin/env bash
# Builds the GPU `sirocco` binary: candle's CUDA backend + NCCL collectives.
#
#   scripts/build-cuda.sh [extra cargo args]
#
# Needs no system CUDA: the toolkit is assembled from PyPI wheels by scripts/cuda-toolkit.sh
# (cached in .cache/cuda-13.0). Output: $CARGO_TARGET_DIR/release/sirocco, by default
# target/cuda/release/sirocco (a target dir of its own, so the CPU build's stays valid).
# CUDA_COMPUTE_CAP defaults to 90 (H100); candle-kernels' PTX is compiled for it, which
# is most of the build time (~20 min on 2 cores). Cargo caches that in the target dir;
# it is redone only when the toolkit path, CUDA_COMPUTE_CAP or candle-kernels change.
# Set NICE=10 to build at a lower priority. CARGO_CMD=check only type-checks.
# After a build, $CARGO_TARGET_DIR/release/sirocco-cuda is a copy without debug info (~63 MB)
# and sirocco-cuda.gz the same gzipped (~22 MB, what to carry to a GPU machine; gpu-check.sh
# unpacks it). The binary needs libcublas/libcublasLt/libcurand/libnvrtc (CUDA 13),
# libnccl.so.2 and the driver's libcuda.so.1 at run time (scripts/gpu-check.sh finds the
# PyPI-wheel copies under python3's site-packages).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
eval "$(scripts/cuda-toolkit.sh --env)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target/cuda}"
CARGO_CMD="${CARGO_CMD:-build}"
echo "build-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_${CUDA_COMPUTE_CAP}, target dir $CARGO_TARGET_DIR" >&2
nice -n "${NICE:-0}" cargo "$CARGO_CMD" --release -p sirocco --features cuda "$@"
if [[ "$CARGO_CMD" == build ]]; then
  objcopy --strip-debug "$CARGO_TARGET_DIR/release/sirocco" "$CARGO_TARGET_DIR/release/sirocco-cuda"
  gzip -1 -c "$CARGO_TARGET_DIR/release/sirocco-cuda" > "$CARGO_TARGET_DIR/release/sirocco-cuda.gz"
  ls -l "$CARGO_TARGET_DIR/release/sirocco-cuda" "$CARGO_TARGET_DIR/release/sirocco-cuda.gz" >&2
fi
