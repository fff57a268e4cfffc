"""Talks to a sirocco router's OpenAI-compatible HTTP API with the official `openai` package.

    .venv/bin/python examples/python/openai_client.py --prompt "The wind" --max-tokens 32
    .venv/bin/python examples/python/openai_client.py --mode chat --prompt "Hello" --stream
    .venv/bin/python examples/python/openai_client.py --token-ids 1,5,9 --temperature 0 \\
        --extra-body '{"ignore_eos": true, "return_token_ids": true}' --json
    .venv/bin/python examples/python/openai_client.py --mode chat --prompt "Weather in Paris?" \\
        --tools '[{"type": "function", "function": {"name": "get_weather", "strict": true,
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]' \\
        --tool-choice required --stream

--mode completion (default) calls /v1/completions, --mode chat /v1/chat/completions with
--prompt as the user message. Without --json the text is printed (as it streams with
--stream). With --json one JSON object is printed: the response as the client parsed it
(non-streaming), or {"text", "finish_reason", "token_ids", "usage", "chunks"} gathered
from the chunks (streaming). An error (an error answer, or no connection) prints
{"error": {"type", "status", "message", "body"}} with --json, and exits with status 1.

With --tools (chat), the answer's tool calls are parsed: printed one a line as
name(arguments) without --json, and with --json added as "calls": [{"id", "name",
"arguments"}], the arguments decoded from their JSON string. Streamed, the client's
stream helper (client.chat.completions.stream) puts the calls together from the deltas,
and "events" lists the types of the events it raised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import openai
from openai import OpenAI


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:8080", help="the router's HTTP host:port (--http-addr)")
    p.add_argument("--api-key", default=os.environ.get("SIROCCO_API_KEY", "none"), help="sent as a Bearer token")
    p.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    p.add_argument("--mode", choices=["completion", "chat"], default="completion")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="The wind", help="the prompt, or the user message in chat mode")
    src.add_argument("--token-ids", help="completion mode: comma-separated token ids as the prompt")
    p.add_argument("--stream", action="store_true", help="stream (server-sent events)")
    p.add_argument("--no-usage", action="store_true", help="streaming: do not ask for the usage chunk")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    p.add_argument(
        "--extra-body", type=json.loads, default=None, help='JSON merged into the body, e.g. {"ignore_eos": true}'
    )
    p.add_argument(
        "--param", action="append", default=[], metavar="NAME=JSON", help="any other create() argument, e.g. n=2"
    )
    p.add_argument("--tools", type=json.loads, help="chat: the tools offered, as OpenAI's JSON list")
    p.add_argument(
        "--tool-choice", help='chat: "none", "auto", "required", or the name of the function to call'
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = p.parse_args()
    if args.mode == "chat" and args.token_ids is not None:
        p.error("--token-ids is for --mode completion; chat takes --prompt as the user message")
    if args.mode != "chat" and (args.tools is not None or args.tool_choice is not None):
        p.error("--tools and --tool-choice are for --mode chat")
    return args


def create_kwargs(args: argparse.Namespace, model: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens}
    if args.mode == "chat":
        kw["messages"] = [{"role": "user", "content": args.prompt}]
    elif args.token_ids is not None:
        kw["prompt"] = [int(t) for t in args.token_ids.split(",") if t.strip()]
    else:
        kw["prompt"] = args.prompt
    for name in ("temperature", "top_p", "seed", "stop", "extra_body", "tools"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.tool_choice in ("none", "auto", "required"):
        kw["tool_choice"] = args.tool_choice
    elif args.tool_choice is not None:
        kw["tool_choice"] = {"type": "function", "function": {"name": args.tool_choice}}
    if args.stream:
        kw["stream"] = True
        if not args.no_usage:
            kw["stream_options"] = {"include_usage": True}
    for param in args.param:
        name, _, value = param.partition("=")
        kw[name] = json.loads(value)
    return kw


def piece(choice: Any, chat: bool) -> str:
    """The text a (streamed) choice carries."""
    if chat:
        part = choice.delta if hasattr(choice, "delta") else choice.message
        return part.content or ""
    return choice.text or ""


def gather(stream: Any, chat: bool, echo: bool) -> dict[str, Any]:
    """Reads a stream to the end: its text, finish reason, token ids, usage and chunks."""
    text: list[str] = []
    token_ids: list[int] = []
    finish_reason = None
    usage = None
    chunks: list[dict[str, Any]] = []
    for chunk in stream:
        chunks.append(chunk.model_dump(mode="json"))
        for choice in chunk.choices:
            t = piece(choice, chat)
            text.append(t)
            if echo:
                print(t, end="", flush=True)
            token_ids.extend((choice.model_extra or {}).get("token_ids") or [])
            finish_reason = choice.finish_reason or finish_reason
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(mode="json")
    if echo:
        print()
    return {
        "text": "".join(text),
        "finish_reason": finish_reason,
        "token_ids": token_ids,
        "usage": usage,
        "chunks": chunks,
    }


def parsed_calls(message: Any) -> list[dict[str, Any]]:
    """A message's tool calls, their arguments decoded (which fails on arguments that are not JSON)."""
    return [
        {"id": c.id, "name": c.function.name, "arguments": json.loads(c.function.arguments)}
        for c in message.tool_calls or []
    ]


def gather_calls(client: OpenAI, kw: dict[str, Any]) -> dict[str, Any]:
    """Streams a chat answer through the client's stream helper, which puts tool calls together."""
    kw = {k: v for k, v in kw.items() if k != "stream"}
    chunks: list[dict[str, Any]] = []
    events: list[str] = []
    with client.chat.completions.stream(**kw) as stream:
        for event in stream:
            events.append(event.type)
            if event.type == "chunk":
                chunks.append(event.chunk.model_dump(mode="json"))
        final = stream.get_final_completion()
    choice = final.choices[0]
    return {
        "text": choice.message.content or "",
        "finish_reason": choice.finish_reason,
        "calls": parsed_calls(choice.message),
        "parsed_arguments": [c.function.parsed_arguments for c in choice.message.tool_calls or []],
        "usage": final.usage.model_dump(mode="json") if final.usage else None,
        "chunks": chunks,
        "events": events,
    }


def main() -> int:
    args = parse_args()
    client = OpenAI(base_url=f"http://{args.addr}/v1", api_key=args.api_key, max_retries=0, timeout=args.timeout)
    chat = args.mode == "chat"
    try:
        model = args.model or client.models.list().data[0].id
        kw = create_kwargs(args, model)
        if args.tools is not None and args.stream:
            result = gather_calls(client, kw)
            if not args.json:
                print(result["text"])
        else:
            create = client.chat.completions.create if chat else client.completions.create
            response = create(**kw)
            if args.stream:
                result = gather(response, chat, echo=not args.json)
            else:
                result = response.model_dump(mode="json")
                if args.tools is not None:
                    result["calls"] = parsed_calls(response.choices[0].message)
                if not args.json:
                    print(piece(response.choices[0], chat))
        if not args.json:
            for call in result.get("calls", []):
                print(f"{call['name']}({json.dumps(call['arguments'])})")
    except openai.APIError as e:
        status = e.status_code if isinstance(e, openai.APIStatusError) else None
        if args.json:
            error = {"type": type(e).__name__, "status": status, "message": e.message, "body": e.body}
            print(json.dumps({"error": error}))
        else:
            print(f"error: {type(e).__name__}: {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    elif result.get("usage"):
        u = result["usage"]
        print(f"[{u['prompt_tokens']} prompt tokens, {u['completion_tokens']} completion tokens]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
