#!/usr/bin/env bash
# GPU checks of a `--features cuda` sirocco build, sized to run in under ~8 minutes on one
# H100. Needs no registry and no toolkit: python3 (stdlib only) and the NVIDIA runtime
# libraries from PyPI wheels under its site-packages (cublas, curand, nvrtc, nccl; CUDA 13),
# plus the driver's libcuda.so.1.
#
#   SIROCCO=path/to/sirocco OUT=out-dir scripts/gpu-check.sh
#
#   SIROCCO  the CUDA binary, or a .gz of it (default: target/cuda/release/sirocco-cuda, then
#            .../sirocco, target/release/sirocco, then target/cuda/release/sirocco-cuda.gz)
#   REFS     reference models (default: ../shared/refs, else shared/refs)
#   OUT      where results go (default: ./gpu-check-out)
#   SKIP     space-separated stages to skip: correctness nccl bench serve
#   SERVE_LAYERS  depth of the served model (default 8; 32 = the full 7B shape, adds minutes)
#   DEVICE   default cuda; DEVICE=cpu SHAPE="--hidden 64 --layers 2 --heads 4 --kv-heads 2
#            --intermediate 128 --vocab 512" dry-runs the script's plumbing on a CPU build
#            (the nccl stage is skipped there and f32 must then match exactly as on CUDA).
#
# Stages (each writes $OUT/<stage>.*; a failing stage does not stop the others):
#  (a) correctness: `generate --device "$DEVICE" --json` on refs tiny/odd, every prompt of
#      refs.json: f32 last logits within rel. error 1e-4 (max-norm, as tests/refs.rs) and all
#      24 greedy tokens; bf16 within rel. error 5e-2 (candle's CPU bf16 gives
#      0.8e-2..2.7e-2 on these refs) and greedy tokens reported (not required:
#      bf16 may flip near-ties).
#  (b) nccl: `nccl-check --ranks 1` (all-reduce f32/bf16, all-gather, broadcast, barrier, and
#      a bf16 all-reduce bandwidth loop), and --ranks <GPU count> when there are several GPUs.
#  (c) bench: `bench-engine --device "$DEVICE" --dtype bf16` on a generated Mistral-7B-shaped model,
#      with the GPU's copy bandwidth and matmul peak measured in the same run and every
#      figure as a % of its roofline
#      (hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 32000).
#  (d) serve: `make-model` (generated weights, SERVE_LAYERS layers of the 7B shape), then
#      `serve --device "$DEVICE" --tp 1` and `bench` at concurrency 8/32/64.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu-check-out}"
mkdir -p "$OUT"
SKIP=" ${SKIP:-} "
SERVE_LAYERS="${SERVE_LAYERS:-8}"
DEVICE="${DEVICE:-cuda}"
[[ "$DEVICE" == cpu ]] && SKIP="$SKIP nccl "
REFS="${REFS:-}"
if [[ -z "$REFS" ]]; then
  for d in ../shared/refs shared/refs; do [[ -d "$d/tiny" ]] && REFS="$(cd "$d" && pwd)" && break; done
fi
SIROCCO="${SIROCCO:-}"
if [[ -z "$SIROCCO" ]]; then
  for b in target/cuda/release/sirocco-cuda target/cuda/release/sirocco target/release/sirocco; do
    [[ -x "$b" ]] && SIROCCO="$REPO/$b" && break
  done
fi
# A gzipped binary (what scripts/build-cuda.sh leaves to carry) is unpacked into $OUT/bin.
if [[ -z "$SIROCCO" || "$SIROCCO" == *.gz ]]; then
  gz="${SIROCCO:-$REPO/target/cuda/release/sirocco-cuda.gz}"
  if [[ -f "$gz" ]]; then
    mkdir -p "$OUT/bin" && gzip -dc "$gz" > "$OUT/bin/sirocco" && chmod +x "$OUT/bin/sirocco"
    SIROCCO="$OUT/bin/sirocco"
  fi
fi
[[ -x "$SIROCCO" ]] || { echo "gpu-check: no sirocco binary (set SIROCCO=...)" >&2; exit 2; }

# The NVIDIA libraries from PyPI wheels: every nvidia/*/lib (and nvidia/cu13/lib) under
# python3's site-packages.
NV_LIBS="$(python3 - <<'EOF'
import glob, os, site, sys
roots = []
try:
    import nvidia
    roots += [p for p in getattr(nvidia, "__path__", [])]
except Exception:
    pass
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    roots.append(os.path.join(sp, "nvidia"))
libs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        if d not in libs:
            libs.append(d)
print(":".join(libs))
EOF
)"
# A toolkit assembled by scripts/cuda-toolkit.sh, if present, comes first.
if [[ -d "$REPO/.cache/cuda-13.0/root/nvidia/cu13/lib" ]]; then
  NV_LIBS="$REPO/.cache/cuda-13.0/root/nvidia/cu13/lib:$REPO/.cache/cuda-13.0/root/nvidia/nccl/lib:$NV_LIBS"
fi
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUST_LOG="${RUST_LOG:-warn}"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "sirocco: $SIROCCO"; "$SIROCCO" --version
  echo "refs: $REFS"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
} > "$OUT/env.txt" 2>&1
ldd "$SIROCCO" > "$OUT/ldd.txt" 2>&1
grep -E "cuda|cublas|curand|nvrtc|nccl|not found" "$OUT/ldd.txt" >> "$OUT/env.txt"
cat "$OUT/env.txt"
if grep -q "not found" "$OUT/ldd.txt"; then
  echo "gpu-check: the binary's libraries are not all found (see ldd above); the stages will fail" >&2
fi

declare -A RESULT
stage() { [[ "$SKIP" != *" $1 "* ]]; }

# ---------------------------------------------------------------- (a) correctness
if stage correctness; then
  echo "== (a) correctness vs $REFS"
  t0=$SECONDS
  : > "$OUT/correctness.jsonl"
  for model in tiny odd; do
    python3 -c '
import json, sys
for p in json.load(open(sys.argv[1]))["prompts"]:
    print(p["name"], ",".join(map(str, p["input_ids"])), len(p["greedy_use_cache_true"]))
' "$REFS/$model/refs.json" | while read -r name ids n; do
      for dtype in f32 bf16; do
        out="$OUT/gen-$model-$name-$dtype.json"
        if timeout 120 "$SIROCCO" generate --device "$DEVICE" --dtype "$dtype" --json --greedy --ignore-eos \
             --model "$REFS/$model" --prompt-ids "$ids" --max-new-tokens "$n" > "$out" 2> "$out.err"; then
          echo "{\"model\":\"$model\",\"prompt\":\"$name\",\"dtype\":\"$dtype\",\"file\":\"$out\"}" >> "$OUT/correctness.jsonl"
        else
          echo "{\"model\":\"$model\",\"prompt\":\"$name\",\"dtype\":\"$dtype\",\"error\":\"exit $?, see $out.err\"}" >> "$OUT/correctness.jsonl"
          tail -3 "$out.err" >&2
        fi
      done
    done
  done
  python3 - "$REFS" "$OUT" > "$OUT/correctness.txt" <<'EOF'
import json, sys, os
refs, out = sys.argv[1], sys.argv[2]
tol = {"f32": 1e-4, "bf16": 5e-2}
ok_all = True
rows = [json.loads(l) for l in open(os.path.join(out, "correctness.jsonl"))]
ref = {m: {p["name"]: p for p in json.load(open(os.path.join(refs, m, "refs.json")))["prompts"]} for m in ("tiny", "odd")}
print(f"{'model':5} {'prompt':14} {'dtype':5} {'rel_err':>9} {'tol':>7} {'greedy':>8}  verdict")
for r in rows:
    want = ref[r["model"]][r["prompt"]]
    if "error" in r:
        ok_all = False
        print(f"{r['model']:5} {r['prompt']:14} {r['dtype']:5} {'-':>9} {'-':>7} {'-':>8}  FAIL ({r['error']})")
        continue
    got = json.loads(open(r["file"]).read().strip().splitlines()[-1])
    g, w = got["prompt_last_logits"], want["last_logits"]
    err = max(abs(a - b) for a, b in zip(g, w)) / max(abs(b) for b in w) if len(g) == len(w) else float("inf")
    greedy_w = want["greedy_use_cache_true"]
    same = sum(1 for a, b in zip(got["generated_ids"], greedy_w) if a == b)
    prefix = next((i for i, (a, b) in enumerate(zip(got["generated_ids"], greedy_w)) if a != b), len(greedy_w))
    greedy_ok = got["generated_ids"] == greedy_w
    ok = err < tol[r["dtype"]] and (greedy_ok or r["dtype"] != "f32")
    ok_all &= ok
    note = "" if greedy_ok else f" (tokens agree up to {prefix})"
    print(f"{r['model']:5} {r['prompt']:14} {r['dtype']:5} {err:9.2e} {tol[r['dtype']]:7.0e} {same:>3}/{len(greedy_w):<4}  {'ok' if ok else 'FAIL'}{note}")
print("correctness:", "PASS" if ok_all and rows else "FAIL")
EOF
  cat "$OUT/correctness.txt"
  RESULT[correctness]="$(tail -1 "$OUT/correctness.txt") ($((SECONDS - t0))s)"
fi

# ---------------------------------------------------------------- (b) nccl
if stage nccl; then
  echo "== (b) nccl"
  t0=$SECONDS
  ngpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
  r="FAIL"
  if timeout 120 "$SIROCCO" nccl-check --ranks 1 > "$OUT/nccl-1.json" 2> "$OUT/nccl-1.err"; then r="PASS (1 rank)"; fi
  cat "$OUT/nccl-1.json" 2>/dev/null; tail -5 "$OUT/nccl-1.err"
  if [[ "${ngpu:-0}" -gt 1 ]]; then
    if timeout 180 "$SIROCCO" nccl-check --ranks "$ngpu" > "$OUT/nccl-$ngpu.json" 2> "$OUT/nccl-$ngpu.err"; then
      r="$r; PASS ($ngpu ranks)"; else r="$r; FAIL ($ngpu ranks)"; fi
    cat "$OUT/nccl-$ngpu.json"
  fi
  RESULT[nccl]="$r ($((SECONDS - t0))s)"
fi

# shellcheck disable=SC2206
SHAPE7B=(${SHAPE:---hidden 4096 --layers 32 --heads 32 --kv-heads 8 --intermediate 14336 --vocab 32000})

# ---------------------------------------------------------------- (c) engine bench
if stage bench; then
  echo "== (c) bench-engine, Mistral-7B shape, bf16"
  t0=$SECONDS
  # Weights are generated on the CPU (one hash per element, ~7.2e9 of them) and copied to
  # the GPU; that load time is printed separately from the measurements.
  if timeout 300 "$SIROCCO" bench-engine --device "$DEVICE" --dtype bf16 "${SHAPE7B[@]}" \
       --prompt-len 512 --context 128 --decode-steps 32 --batches 1,8,32,64 --repeat 3 --json \
       > "$OUT/bench-engine.json" 2> "$OUT/bench-engine.err"; then
    RESULT[bench]="ok ($((SECONDS - t0))s)"
  else
    RESULT[bench]="FAIL exit $? ($((SECONDS - t0))s)"
  fi
  cat "$OUT/bench-engine.err" | grep -v "^\s*$" | tail -12
fi

# ---------------------------------------------------------------- (d) serving
if stage serve; then
  echo "== (d) serve + bench, 7B shape with $SERVE_LAYERS layers, bf16"
  t0=$SECONDS
  MODEL_DIR="$OUT/model-7b-shape-L$SERVE_LAYERS"
  SERVE_SHAPE=("${SHAPE7B[@]}"); SERVE_SHAPE[3]="$SERVE_LAYERS"
  if [[ ! -f "$MODEL_DIR/config.json" ]]; then
    timeout 400 "$SIROCCO" make-model --out "$MODEL_DIR" "${SERVE_SHAPE[@]}" --max-context 4096 --dtype bf16 \
      > "$OUT/make-model.log" 2>&1 || echo "make-model failed, see $OUT/make-model.log" >&2
  fi
  PORT=$((50000 + RANDOM % 1000)); HTTP=$((PORT + 1000))
  "$SIROCCO" serve --device "$DEVICE" --dtype bf16 --tp 1 --model "$MODEL_DIR" \
    --listen "127.0.0.1:$PORT" --http-addr "127.0.0.1:$HTTP" --max-batch-size 64 \
    > "$OUT/serve.log" 2>&1 &
  SERVE_PID=$!
  ready=0
  for _ in $(seq 1 240); do
    if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
         "http://127.0.0.1:$HTTP/ready" > /dev/null 2>&1; then ready=1; break; fi
    kill -0 $SERVE_PID 2>/dev/null || break
    sleep 1
  done
  r=""
  if [[ $ready == 1 ]]; then
    for c in 8 32 64; do
      timeout 150 "$SIROCCO" bench --addr "http://127.0.0.1:$PORT" --concurrency "$c" \
        --num-requests $((c * 3)) --warmup "$c" --input-len 128 --output-len 64 --json \
        > "$OUT/bench-c$c.json" 2> "$OUT/bench-c$c.err" && r="$r c$c:ok" || r="$r c$c:FAIL"
    done
  else
    r="server not ready (see $OUT/serve.log)"
  fi
  kill $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null
  RESULT[serve]="$r ($((SECONDS - t0))s)"
  [[ "${KEEP_MODEL:-0}" == 1 ]] || rm -rf "$MODEL_DIR"
fi

# ---------------------------------------------------------------- summary
python3 - "$OUT" "$SERVE_LAYERS" > "$OUT/summary.txt" <<'EOF'
import json, os, sys, glob
out, layers = sys.argv[1], sys.argv[2]
def load(p):
    try:
        text = open(p).read().strip()
    except OSError:
        return None
    for cand in (text, text.splitlines()[-1] if text else ""):
        try:
            return json.loads(cand)
        except ValueError:
            pass
    return None
b = load(os.path.join(out, "bench-engine.json"))
def pct(v, roof):
    return f"{100 * v / roof:5.0f}% of {roof:9.1f}" if roof else ""
if b:
    m = b.get("machine") or {}
    if m:
        print(f"machine (measured): {m['bandwidth_gbs']:.0f} GB/s memory, {m['matmul_gflops'] / 1000:.0f} TFLOP/s matmul ({m['method']})")
    print(f"bench-engine 7B shape {b.get('dtype')} on {b.get('device')}, {b['weight_bytes_per_decode_step'] / 1e9:.2f} GB of weights per step:")
    print(f"  prefill {b['prompt_len']:>4} tok: {b['prefill_tokens_per_s']:9.1f} tok/s  {pct(b['prefill_tokens_per_s'], b.get('prefill_roofline_tokens_per_s'))}")
    for d in b["decode"]:
        print(f"  decode batch {d['batch']:>3}: {d['tokens_per_s']:9.1f} tok/s  {pct(d['tokens_per_s'], d.get('roofline_tokens_per_s'))}")
print(f"serve (7B shape, {layers} layers) + bench, input 128, output 64:")
print(f"  {'conc':>4} {'done':>5} {'fail':>4} {'out tok/s':>10} {'ttft p50 ms':>12} {'tpot p50 ms':>12}")
for c in (8, 32, 64):
    r = load(os.path.join(out, f"bench-c{c}.json"))
    if not r:
        print(f"  {c:>4}  (no result)"); continue
    def p50(k):
        d = r.get(k) or {}
        v = d.get("median")
        return f"{v:.1f}" if isinstance(v, (int, float)) else "-"
    print(f"  {c:>4} {r['completed']:>5} {r['failed']:>4} {r['output_throughput']:>10.1f} {p50('ttft_ms'):>12} {p50('tpot_ms'):>12}")
EOF
for k in correctness nccl bench serve; do
  [[ -n "${RESULT[$k]:-}" ]] && printf 'stage %-12s %s\n' "$k" "${RESULT[$k]}" >> "$OUT/summary.txt"
done
echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
