#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit (enough to build sirocco with `--features cuda`) from
# NVIDIA's PyPI wheels, without root and without NVIDIA's installers.
#
#   scripts/cuda-toolkit.sh [DIR]        # default DIR: $REPO/.cache/cuda-13.0 (gitignored)
#   eval "$(scripts/cuda-toolkit.sh --env [DIR])"   # assemble if needed, then print only the exports
#
# What it does:
#  1. `pip download --no-deps --only-binary=:all:` the pinned wheels below into DIR/wheels
#     (skipped for wheels already there);
#  2. unzips them into DIR/root; every CUDA 13 wheel puts its files under nvidia/cu13/
#     (bin/nvcc, include/, lib/, nvvm/), NCCL under nvidia/nccl/;
#  3. arranges DIR/root/nvidia/cu13 as a CUDA_ROOT: lib64 -> lib, targets/x86_64-linux/{include,lib},
#     unversioned .so names for the linker (libcudart.so, libcublas.so, libcublasLt.so,
#     libcurand.so, libnvrtc.so, libnccl.so -> libnccl.so.2), nccl.h in include/;
#  4. builds lib/stubs/libcuda.so (soname libcuda.so.1): the wheels carry no driver library,
#     yet cudarc's `dynamic-linking` mode links with -lcuda. The stub defines every cu*
#     identifier named in include/cuda.h as an empty function; it only satisfies the linker.
#     At run time the real libcuda.so.1 of the driver is loaded. Never put lib/stubs on
#     LD_LIBRARY_PATH.
#  5. prints the environment to source.
#
# The versions are CUDA 13.0 Update 2's (driver >= 580 runs them). PTX produced by a newer
# nvcc (13.1+) would NOT load on a 580 driver, so keep nvcc at 13.0.x for such machines.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_ONLY=0
if [[ "${1:-}" == "--env" ]]; then ENV_ONLY=1; shift; fi
DIR="${1:-${SIROCCO_CUDA_DIR:-$REPO/.cache/cuda-13.0}}"
PIP="${PIP:-python3 -m pip}"

WHEELS=(
  nvidia-cuda-nvcc==13.0.88     # nvcc, ptxas, fatbinary, nvlink, cudafe++
  nvidia-cuda-crt==13.0.88      # include/crt (nvcc's host-compilation headers)
  nvidia-nvvm==13.0.88          # nvvm/bin/cicc, libdevice
  nvidia-cuda-cccl==13.0.85     # include/cccl (cub, thrust, libcu++)
  nvidia-cuda-runtime==13.0.96  # cudart, cuda.h, cuda_runtime.h, cuda_fp16/bf16.h
  nvidia-cublas==13.1.0.3       # cublas, cublasLt
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
  nvidia-nccl-cu13==2.27.7      # libnccl.so.2, nccl.h (2.27.7: the cu13 build PyTorch 2.9 ships)
)

log() { if [[ $ENV_ONLY == 1 ]]; then echo "$*" >&2; else echo "$*"; fi; }

ROOT="$DIR/root/nvidia/cu13"
STAMP="$DIR/.assembled"
if [[ ! -f "$STAMP" ]]; then
  mkdir -p "$DIR/wheels" "$DIR/root"
  log "cuda-toolkit: downloading wheels into $DIR/wheels"
  # pip skips files already in the destination directory.
  $PIP download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    --python-version 3.11 -d "$DIR/wheels" "${WHEELS[@]%%#*}" >&2
  log "cuda-toolkit: unpacking"
  for w in "$DIR"/wheels/*.whl; do
    (cd "$DIR/root" && python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(m) for m in z.namelist() if m.startswith("nvidia/")]' "$w")
  done
  # zipfile drops the executable bits.
  chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true

  cd "$ROOT"
  ln -sfn lib lib64
  mkdir -p targets/x86_64-linux
  ln -sfn ../../include targets/x86_64-linux/include
  ln -sfn ../../lib targets/x86_64-linux/lib
  (cd lib
   for f in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
     ln -sfn "$f" "${f%%.so.*}.so"
   done
   ln -sfn ../../nccl/lib/libnccl.so.2 libnccl.so.2
   ln -sfn libnccl.so.2 libnccl.so)
  ln -sfn ../../nccl/include/nccl.h include/nccl.h

  log "cuda-toolkit: building the libcuda.so link stub"
  mkdir -p lib/stubs
  grep -o '\bcu[A-Z][A-Za-z0-9_]*' include/cuda.h | sort -u \
    | awk '{ printf "void %s(void) {}\n", $1 }' > lib/stubs/libcuda_stub.c
  ${CC:-cc} -shared -fPIC -o lib/stubs/libcuda.so -Wl,-soname,libcuda.so.1 lib/stubs/libcuda_stub.c
  cd - >/dev/null

  PATH="$ROOT/bin:$PATH" nvcc --version >&2
  touch "$STAMP"
fi

NVCC_CCBIN="${NVCC_CCBIN:-}"
cat <<EOF
export CUDA_ROOT="$ROOT"
export CUDA_PATH="$ROOT"
export CUDA_HOME="$ROOT"
export CUDA_TOOLKIT_ROOT_DIR="$ROOT"
export PATH="$ROOT/bin:\$PATH"
# Link time: the stub libcuda.so and the unversioned names. Run time (on a GPU machine):
# lib/ only, never lib/stubs, so that the driver's real libcuda.so.1 is loaded.
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$ROOT/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDARC_CUDA_VERSION=13000
# H100 (sm_90); candle-kernels' build reads CUDA_COMPUTE_CAP when no GPU can be queried.
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export NVCC_PREPEND_FLAGS="-I$ROOT/include -I$ROOT/include/cccl${NVCC_CCBIN:+ -ccbin $NVCC_CCBIN}"
EOF
