#!/usr/bin/env python3
"""Reference outputs for the SmolLM2 GGUF tests, from an implementation sirocco did
not write: transformers loads the same GGUF file (dequantized to float32) and runs it
in float32 on the CPU.

Usage: smollm2-refs.py MODEL.gguf OUT_DIR
Needs torch, transformers, gguf (PyPI). Writes OUT_DIR/refs.json (prompts, their ids,
32 greedy tokens each, the perplexity of a fixed paragraph) and OUT_DIR/logits.f32
(the last prompt position's logits per prompt, little-endian float32, in order).
"""
import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Water boils at a temperature of",
]
PARAGRAPH = (
    "The sun rose slowly over the quiet town, casting long shadows across the empty streets. "
    "Shopkeepers began to open their doors, and the smell of fresh bread drifted from the bakery "
    "on the corner. Children hurried to school with their bags on their backs, while their parents "
    "stopped to talk with neighbours about the weather and the news of the day."
)
CHAT = "What is the capital of France?"


def greedy(model, ids, n):
    """n argmax tokens, end-of-sequence tokens included like any other (generate's
    min_new_tokens would mask them instead, which is not what ignoring EOS means)."""
    out = []
    seq = ids
    for _ in range(n):
        nxt = int(model(seq).logits[0, -1].argmax())
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


def main():
    path, out = sys.argv[1], sys.argv[2]
    d, f = os.path.split(os.path.abspath(path))
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    os.makedirs(out, exist_ok=True)
    prompts = []
    logits_out = bytearray()
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt").input_ids
            logits = model(ids).logits[0, -1].float()
            logits_out += logits.numpy().astype("<f4").tobytes()
            prompts.append(
                {
                    "text": text,
                    "input_ids": ids[0].tolist(),
                    "greedy": greedy(model, ids, 32),
                }
            )
        ids = tok(PARAGRAPH, return_tensors="pt").input_ids
        loss = model(ids, labels=ids).loss.item()
        chat_ids = tok.apply_chat_template(
            [{"role": "user", "content": CHAT}], add_generation_prompt=True, return_tensors="pt"
        )
        if not torch.is_tensor(chat_ids):
            chat_ids = chat_ids["input_ids"]
        chat = model.generate(chat_ids, max_new_tokens=24, do_sample=False)
        answer = tok.decode(chat[0, chat_ids.shape[1]:], skip_special_tokens=True)
    refs = {
        "model": f,
        "generator": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, float32, CPU",
        "vocab_size": model.config.vocab_size,
        "prompts": prompts,
        "paragraph": {"text": PARAGRAPH, "ids": ids[0].tolist(), "perplexity": math.exp(loss)},
        "chat": {"question": CHAT, "prompt_ids": chat_ids[0].tolist(), "answer": answer},
    }
    with open(os.path.join(out, "refs.json"), "w") as fh:
        json.dump(refs, fh, indent=1)
    with open(os.path.join(out, "logits.f32"), "wb") as fh:
        fh.write(logits_out)
    print(json.dumps({k: v for k, v in refs.items() if k != "prompts"}, indent=1)[:2000])


if __name__ == "__main__":
    main()
