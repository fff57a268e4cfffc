#!/usr/bin/env bash
# Single-stream decode of llama.cpp and sirocco on the same weights, side by side, on
# this machine's CPU. Bounded: one model, a few formats, a fixed number of tokens.
#
#   scripts/llamacpp-compare.sh [MODEL_DIR]
#
# MODEL_DIR defaults to a generated checkpoint of `bench-engine`'s default shape
# (229M parameters, written once under .cache/llamacpp). llama.cpp comes from the
# llama-cpp-python source package (its vendored llama.cpp), fetched with `pip download`
# and checked against the pinned hash, built once (llama-bench only, -march=native)
# under .cache/llamacpp. The checkpoint is written as GGUF f32, bf16, Q8_0 and Q4_0 by
# scripts/to-gguf.py, then each pair runs in turn:
#   llama.cpp: llama-bench -p 0 -n $TOKENS -t $THREADS (tokens/s of 1-stream decode)
#   sirocco:   bench-engine --model MODEL_DIR --batches 1 (--dtype, --quantize as below)
# f32 ~ --dtype f32, bf16 ~ --dtype bf16, Q8_0 ~ --dtype bf16 --quantize int8,
# Q4_0 ~ --dtype bf16 --quantize int4; for the quantized formats sirocco also runs the
# very GGUF file llama.cpp reads (its blocks kept quantized as stored, --dtype bf16).
# Progress goes to stderr, the table to stdout.
# Environment: THREADS (default: the CPU count), TOKENS (default 64), SIROCCO (the
# binary; default: build it with cargo --release), FORMATS (default "f32 bf16 q8_0 q4_0").
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$REPO/.cache/llamacpp"
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
THREADS="${THREADS:-$(nproc)}"
TOKENS="${TOKENS:-64}"
FORMATS="${FORMATS:-f32 bf16 q8_0 q4_0}"
mkdir -p "$CACHE"

# shellcheck source=lib/venv.sh
source "$REPO/scripts/lib/venv.sh"
ensure_venv "$CACHE/venv" "$CACHE/venv.lock" cmake==4.4.5 numpy==2.4.6
PY="$CACHE/venv/bin/python"

src="$CACHE/llama_cpp_python-$VERSION"
if [ ! -d "$src" ]; then
    echo "fetching llama-cpp-python $VERSION (source) with pip download" >&2
    req="$(mktemp)"
    echo "llama-cpp-python==$VERSION --hash=sha256:$SHA256" >"$req"
    "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-python --require-hashes -r "$req" -d "$CACHE/dl" >&2
    rm -f "$req"
    tar -xzf "$CACHE/dl/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
llama="$src/vendor/llama.cpp"
"$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install --quiet -e "$llama/gguf-py" >&2
bench="$llama/build/bin/llama-bench"
if [ ! -x "$bench" ]; then
    echo "building llama-bench (a few minutes)" >&2
    "$CACHE/venv/bin/cmake" -S "$llama" -B "$llama/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release >&2
    "$CACHE/venv/bin/cmake" --build "$llama/build" --target llama-bench -j "$THREADS" >&2
fi

if [ -z "${SIROCCO:-}" ]; then
    (cd "$REPO" && cargo build --release --locked -p sirocco >&2)
    SIROCCO="${CARGO_TARGET_DIR:-$REPO/target}/release/sirocco"
fi

model="${1:-$CACHE/bench-model}"
if [ ! -f "$model/config.json" ]; then
    echo "writing the bench-engine default shape to $model" >&2
    # llama.cpp wants a vocabulary in the GGUF: the Mistral tokenizer of the shared
    # material, whose 32000 tokens match the shape.
    tokenizer="$REPO/../shared/tokenizers/mistral-7b-v0.1/tokenizer.json"
    [ -f "$tokenizer" ] || { echo "error: $tokenizer not found; pass a MODEL_DIR with a tokenizer.json" >&2; exit 1; }
    "$SIROCCO" make-model --out "$model" --hidden 1024 --layers 12 --heads 16 --kv-heads 4 \
        --intermediate 3584 --vocab 32000 --tokenizer "$tokenizer" >&2
fi

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $THREADS threads" 
"$SIROCCO" bench-engine --model "$model" --batches 1 --repeat 1 --decode-steps 4 --prompt-len 8 --no-roofline 2>&1 \
    | grep -E '^kernels' || true
printf '%-6s | %-16s | %-16s | %-34s | %s\n' format "llama.cpp tok/s" "sirocco tok/s" "sirocco flags" "sirocco on the GGUF file, tok/s"
for fmt in $FORMATS; do
    gguf_file="$CACHE/$(basename "$model")-$fmt.gguf"
    [ -f "$gguf_file" ] || "$PY" "$REPO/scripts/to-gguf.py" "$model" "$gguf_file" --type "$fmt" >&2
    case "$fmt" in
        f32) flags="--dtype f32" ;;
        bf16) flags="--dtype bf16" ;;
        q8_0) flags="--dtype bf16 --quantize int8" ;;
        q4_0) flags="--dtype bf16 --quantize int4" ;;
    esac
    ll=$("$bench" -m "$gguf_file" -p 0 -n "$TOKENS" -t "$THREADS" -r 3 -o csv 2>/dev/null \
        | awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i ~ /avg_ts/) c = i } NR > 1 { gsub(/"/, "", $c); print $c }')
    decode() {
        "$SIROCCO" bench-engine "$@" --batches 1 --repeat 3 --decode-steps "$TOKENS" --prompt-len 8 --no-roofline 2>&1 \
            | sed -n 's/^decode batch   1: \([0-9.]*\) tok\/s.*/\1/p'
    }
    # shellcheck disable=SC2086
    sr=$(decode --model "$model" $flags)
    same="-"
    case "$fmt" in q8_0 | q4_0) same=$(decode --model "$gguf_file" --dtype bf16) ;; esac
    printf '%-6s | %-16s | %-16s | %-34s | %s\n' "$fmt" "$ll" "$sr" "$flags" "$same"
done
