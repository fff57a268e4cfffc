"""Runs a batch file through a sirocco router's OpenAI Batch API with the official `openai` package.

    .venv/bin/python examples/python/openai_batch.py --input prompts.jsonl --output results.jsonl

The input is OpenAI's batch format: one JSON object per line, {"custom_id", "method": "POST",
"url": "/v1/completions" or "/v1/chat/completions", "body"}. The file is uploaded
(client.files.create, purpose "batch"), a batch is created for it (client.batches.create),
polled until it ends (client.batches.retrieve, with a progress line on stderr), and its
output and error files are downloaded (client.files.content) into --output, one result line
per input line. The router runs the lines at a low priority, so interactive traffic keeps
its latency.

With --json, one JSON object is printed instead: {"batch": the final batch object,
"listed": whether client.batches.list() shows it, "file": the uploaded file's object,
"output": [result lines], "errors": [error lines]}. --cancel-after N cancels the batch
(client.batches.cancel) once N lines are done. A failed batch exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from openai import OpenAI

TERMINAL = {"completed", "failed", "cancelled", "expired"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:8080", help="the router's HTTP host:port (--http-addr)")
    p.add_argument("--api-key", default=os.environ.get("SIROCCO_API_KEY", "none"), help="sent as a Bearer token")
    p.add_argument("--input", required=True, help="the batch input file (JSONL)")
    p.add_argument("--output", help="where the result lines go (default: stdout unless --json)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the batch")
    p.add_argument("--cancel-after", type=int, help="cancel the batch once this many lines are done")
    p.add_argument("--json", action="store_true", help="print one JSON object (see above)")
    return p.parse_args()


def lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main() -> int:
    args = parse_args()
    client = OpenAI(base_url=f"http://{args.addr}/v1", api_key=args.api_key, max_retries=0)
    with open(args.input, "rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=args.endpoint, completion_window="24h")
    deadline = time.monotonic() + args.timeout
    cancelled = False
    while batch.status not in TERMINAL:
        if time.monotonic() > deadline:
            print(f"batch {batch.id} still {batch.status} after {args.timeout}s", file=sys.stderr)
            return 1
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        if counts is not None:
            done = counts.completed + counts.failed
            print(f"batch {batch.id}: {batch.status}, {done}/{counts.total} lines", file=sys.stderr)
            if args.cancel_after is not None and not cancelled and done >= args.cancel_after:
                client.batches.cancel(batch.id)
                cancelled = True
    output = client.files.content(batch.output_file_id).text if batch.output_file_id else ""
    errors = client.files.content(batch.error_file_id).text if batch.error_file_id else ""
    if args.json:
        listed = any(b.id == batch.id for b in client.batches.list(limit=100))
        print(
            json.dumps(
                {
                    "batch": batch.model_dump(),
                    "listed": listed,
                    "file": uploaded.model_dump(),
                    "output": lines(output),
                    "errors": lines(errors),
                }
            )
        )
    else:
        out = open(args.output, "w") if args.output else sys.stdout
        out.write(output + errors)
        print(f"batch {batch.id}: {batch.status}, {batch.request_counts}", file=sys.stderr)
    return 1 if batch.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
