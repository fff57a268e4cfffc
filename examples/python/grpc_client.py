"""Streams a completion from a sirocco router over gRPC (service sirocco.v1.Sirocco).

Uses the stubs that scripts/python-env.sh generates into examples/python/generated/.

    .venv/bin/python examples/python/grpc_client.py --prompt "The wind" --max-new-tokens 32
    .venv/bin/python examples/python/grpc_client.py --token-ids 1,5,9 --ignore-eos --json
    .venv/bin/python examples/python/grpc_client.py --info --prompt "The wind"

Without --json the text is printed as it streams; with --json one JSON object is
printed at the end: {"token_ids", "text", "finish_reason", "prompt_tokens",
"generated_tokens"}. --info prints ModelInfo (and the Tokenize result of --prompt)
as JSON instead of generating.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent / "generated"))
try:
    from sirocco.v1 import sirocco_pb2 as pb
    from sirocco.v1 import sirocco_pb2_grpc as pb_grpc
except ImportError as e:
    sys.exit(f"error: gRPC stubs missing ({e}); run scripts/python-env.sh first")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="the router's gRPC host:port")
    p.add_argument("--api-key", default=os.environ.get("SIROCCO_API_KEY"), help="for a router run with --api-key")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text, tokenized by the router (BOS added)")
    src.add_argument("--token-ids", help="comma-separated token ids, used as given")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--info", action="store_true", help="print ModelInfo (and Tokenize of --prompt)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    args = p.parse_args()
    if not args.info and args.prompt is None and args.token_ids is None:
        p.error("one of --prompt or --token-ids is required")
    return args


def to_dict(msg: Any) -> dict[str, Any]:
    """A protobuf message's fields (every one, defaults included) as a plain dict."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        out[field.name] = value if isinstance(value, (str, bytes, int, float, bool)) else list(value)
    return out


def call_options(args: argparse.Namespace) -> dict[str, Any]:
    """Per-call keyword arguments: the deadline, and the API key as `authorization` metadata."""
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    return {"timeout": args.timeout, "metadata": metadata}


def info(stub: pb_grpc.SiroccoStub, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"model_info": to_dict(stub.ModelInfo(pb.ModelInfoRequest(), **call_options(args)))}
    if args.prompt is not None:
        tok = stub.Tokenize(pb.TokenizeRequest(text=args.prompt), **call_options(args))
        result["tokenize"] = to_dict(tok)
    return result


def request(args: argparse.Namespace) -> pb.GenerateRequest:
    params = pb.SamplingParameters(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
    )
    if args.top_p is not None:
        params.top_p = args.top_p
    if args.seed is not None:
        params.seed = args.seed
    if args.token_ids is not None:
        ids = [int(t) for t in args.token_ids.split(",") if t.strip()]
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), parameters=params)
    return pb.GenerateRequest(text=args.prompt, parameters=params)


def generate(stub: pb_grpc.SiroccoStub, args: argparse.Namespace) -> dict[str, Any]:
    ids: list[int] = []
    text: list[str] = []
    for event in stub.GenerateStream(request(args), **call_options(args)):
        kind = event.WhichOneof("event")
        if kind == "token":
            ids.append(event.token.id)
            text.append(event.token.text)
            if not args.json:
                print(event.token.text, end="", flush=True)
        elif kind == "finished":
            f = event.finished
            reason = pb.FinishReason.Name(f.reason).removeprefix("FINISH_REASON_").lower()
            if not args.json:
                print()
            return {
                "token_ids": ids,
                "text": "".join(text),
                "finish_reason": reason,
                "prompt_tokens": f.prompt_tokens,
                "generated_tokens": f.generated_tokens,
            }
    raise RuntimeError("the stream ended without a finish event")


def main() -> int:
    args = parse_args()
    with grpc.insecure_channel(args.addr) as channel:
        stub = pb_grpc.SiroccoStub(channel)
        try:
            if args.info:
                print(json.dumps(info(stub, args)))
                return 0
            result = generate(stub, args)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"[{result['finish_reason']}: {result['prompt_tokens']} prompt tokens, "
            f"{result['generated_tokens']} generated]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
