#!/usr/bin/env bash
# Interactive latency beside an offline batch, and a batch file's resume, on one
# cluster serving the built-in model on this machine (loopback ports only; it kills
# only the processes it started). Bounded: a fixed number of requests and lines.
#
#   scripts/batch-interactive.sh
#
# 1. `sirocco bench` runs $STREAMS interactive streams ($REQUESTS requests, priority 0)
#    alone, and reports TTFT p99;
# 2. `sirocco batch` starts on a $LINES-line file (priority 10, $BATCH_CONCURRENCY in
#    flight); once it is under way the same bench runs again beside it;
# 3. the batch is interrupted (SIGINT) and run again to the end; the output must hold
#    each input line exactly once.
# Prints TTFT p99 alone and beside the batch, their ratio, and the batch's counts.
# With BATCH_API=1 the batch runs inside the router instead, through OpenAI's Batch
# API (/v1/files, /v1/batches: 256 lines in flight at priority 10), and step 3 waits
# for it to complete (its resume after a router restart is tested in tests/batch.rs).
# Environment: SIROCCO (the binary; default: cargo build --release), STREAMS (64),
# REQUESTS (256), LINES (10000), BATCH_CONCURRENCY (512: more than a replica's 128
# batch slots, so that the two compete), BATCH_PRIORITY (10; 0 puts the batch level
# with the interactive streams, for comparison), TP (1).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
STREAMS="${STREAMS:-64}"
REQUESTS="${REQUESTS:-256}"
LINES="${LINES:-10000}"
BATCH_CONCURRENCY="${BATCH_CONCURRENCY:-512}"
BATCH_PRIORITY="${BATCH_PRIORITY:-10}"
TP="${TP:-1}"
if [ -z "${SIROCCO:-}" ]; then
    (cd "$REPO" && cargo build --release --locked -p sirocco >&2)
    SIROCCO="${CARGO_TARGET_DIR:-$REPO/target}/release/sirocco"
fi
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
grpc="127.0.0.1:$(port)"
http="127.0.0.1:$(port)"
"$SIROCCO" serve --tp "$TP" --listen "$grpc" --http-addr "$http" >"$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
    curl -sf "http://$http/ready" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -sf "http://$http/ready" >/dev/null || { cat "$work/serve.log" >&2; echo "error: the cluster did not come up" >&2; exit 1; }

python3 - "$LINES" >"$work/in.jsonl" <<'EOF'
import json, sys
for i in range(int(sys.argv[1])):
    body = {"model": "sirocco-builtin", "prompt": f"Batch line {i}: once upon a time", "max_tokens": 32,
            "temperature": 0, "ignore_eos": True}
    print(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body}))
EOF

ttft_p99() {
    "$SIROCCO" bench --addr "http://$grpc" --concurrency "$STREAMS" --num-requests "$REQUESTS" \
        --input-len 64 --output-len 32 --seed 7 --json 2>/dev/null \
        | python3 -c 'import json, sys; print(round(json.load(sys.stdin)["ttft_ms"]["p99"], 1))'
}
batch_args=(batch --url "http://$http" --input "$work/in.jsonl" --output "$work/out.jsonl"
    --concurrency "$BATCH_CONCURRENCY" --priority "$BATCH_PRIORITY")
lines_done() { [ -f "$work/out.jsonl" ] && wc -l <"$work/out.jsonl" || echo 0; }

alone=$(ttft_p99)
if [ "${BATCH_API:-0}" = 1 ]; then
    file=$(curl -sf "http://$http/v1/files" -F purpose=batch -F "file=@$work/in.jsonl" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
    batch=$(curl -sf "http://$http/v1/batches" -H 'content-type: application/json' \
        -d "{\"input_file_id\": \"$file\", \"endpoint\": \"/v1/completions\", \"completion_window\": \"24h\"}" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
    state() {
        curl -sf "http://$http/v1/batches/$batch" | python3 -c '
import json, sys
b = json.load(sys.stdin); c = b["request_counts"]
print(b["status"], c["completed"] + c["failed"], b.get("output_file_id") or "-")'
    }
    for _ in $(seq 600); do
        read -r _ n _ < <(state)
        [ "$n" -ge 200 ] && break
        sleep 0.1
    done
    read -r _ before _ < <(state)
    beside=$(ttft_p99)
    read -r _ after _ < <(state)
    start=$(date +%s.%N)
    for _ in $(seq 6000); do
        read -r status n out < <(state)
        [ "$status" = completed ] && break
        sleep 0.2
    done
    rest_s=$(python3 -c "import time; print(round(time.time() - $start, 1))")
    curl -sf "http://$http/v1/files/$out/content" >"$work/out.jsonl"
    python3 - "$work/out.jsonl" "$LINES" "$alone" "$beside" "$before" "$after" "$status" "$rest_s" <<'EOF2'
import json, sys
path, total, alone, beside, before, after, status, rest_s = sys.argv[1:]
lines = [json.loads(l) for l in open(path)]
ids = [l["custom_id"] for l in lines]
print(f"interactive TTFT p99: {alone} ms alone, {beside} ms beside the API batch ({float(beside) / float(alone):.2f}x)")
print(f"batch lines done while the bench ran: {int(after) - int(before)}")
print(f"batch {status}; the rest took {rest_s} s; output: {len(lines)} lines, {len(set(ids))} distinct, "
      f"missing {int(total) - len(set(ids))}")
EOF2
    exit 0
fi
# Job control: a background job of a script otherwise ignores SIGINT.
set -m
"$SIROCCO" "${batch_args[@]}" 2>"$work/batch.err" &
bpid=$!
set +m
pids+=("$bpid")
for _ in $(seq 600); do
    [ "$(lines_done)" -ge 200 ] && break
    sleep 0.1
done
before=$(lines_done)
beside=$(ttft_p99)
after=$(lines_done)
kill -INT "$bpid"
status=0
wait "$bpid" || status=$?
interrupted=$(lines_done)
start=$(date +%s.%N)
"$SIROCCO" "${batch_args[@]}" 2>>"$work/batch.err"
resume_s=$(python3 -c "import time; print(round(time.time() - $start, 1))")
python3 - "$work/out.jsonl" "$LINES" "$alone" "$beside" "$before" "$after" "$interrupted" "$status" "$resume_s" <<'EOF'
import json, sys
path, total, alone, beside, before, after, interrupted, status, resume_s = sys.argv[1:]
lines = [json.loads(l) for l in open(path)]
numbers = [l["line"] for l in lines]
ok = sum(1 for l in lines if (l.get("response") or {}).get("status_code") == 200)
print(f"interactive TTFT p99: {alone} ms alone, {beside} ms beside the batch ({float(beside) / float(alone):.2f}x)")
print(f"batch lines done while the bench ran: {int(after) - int(before)}")
print(f"batch interrupted (exit {status}) at {interrupted} of {total} lines; the resumed run took {resume_s} s")
print(f"output: {len(lines)} lines, {len(set(numbers))} distinct input lines, {ok} answered 200, "
      f"missing {int(total) - len(set(numbers))}, duplicated {len(lines) - len(set(numbers))}")
EOF
