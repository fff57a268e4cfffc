#!/usr/bin/env python3
"""Write a Hugging Face Mistral/Llama checkpoint (config.json, *.safetensors,
tokenizer.json with a SentencePiece-style vocabulary) as a llama.cpp GGUF file of
one weight type (f32, bf16, q8_0, q4_0), so that llama.cpp runs the same weights
sirocco does (scripts/llamacpp-compare.sh). numpy and llama.cpp's own gguf-py only.

q and k projections are permuted from Hugging Face's rotate-half rope layout to the
interleaved one llama.cpp's "llama" architecture expects, as llama.cpp's converter
does. Norms stay f32; 1-D tensors are never quantized.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("to-gguf.py needs llama.cpp's gguf-py (pip install -e <llama.cpp>/gguf-py)")

TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}


def read_safetensors(path: Path) -> dict:
    """The tensors of one .safetensors file as f32 arrays (f32, f16, bf16 stored)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a : base + b]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(buf, dtype=np.float32)
        elif dt == "F16":
            arr = np.frombuffer(buf, dtype=np.float16).astype(np.float32)
        elif dt == "BF16":
            arr = (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            sys.exit(f"{path}: tensor {name} has dtype {dt}; f32, f16 or bf16 expected")
        out[name] = arr.reshape(info["shape"])
    return out


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rotate-half rows (Hugging Face) to interleaved pairs (llama.cpp)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def token_type(tok: str, special: set) -> int:
    if tok == "<unk>":
        return gguf.TokenType.UNKNOWN
    if tok in special:
        return gguf.TokenType.CONTROL
    if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="checkpoint directory")
    ap.add_argument("out", type=Path, help="the .gguf file to write")
    ap.add_argument("--type", choices=sorted(TYPES), default="q8_0")
    args = ap.parse_args()

    cfg = json.loads((args.model / "config.json").read_text())
    tok = json.loads((args.model / "tokenizer.json").read_text())
    tensors = {}
    for f in sorted(args.model.glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    if not tensors:
        sys.exit(f"{args.model}: no .safetensors files")

    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    w = gguf.GGUFWriter(str(args.out), "llama")
    w.add_name(args.model.name)
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(FILE_TYPES[args.type])

    vocab = tok["model"]["vocab"]
    added = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()} | added
    if sorted(by_id) != list(range(len(by_id))):
        sys.exit("tokenizer.json: token ids are not 0..n-1")
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    tokens = [by_id[i] for i in range(len(by_id))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([token_type(t, special) for t in tokens])
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    qtype = TYPES[args.type]
    for name, arr in tensors.items():
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            if parts[:2] != ["model", "layers"] or parts[-1] != "weight":
                sys.exit(f"unexpected tensor {name}")
            key = ".".join(parts[3:-1])
            if key not in layer:
                sys.exit(f"unexpected tensor {name}")
            gname = f"blk.{parts[2]}.{layer[key]}.weight"
            if key == "self_attn.q_proj":
                arr = permute(arr, heads)
            elif key == "self_attn.k_proj":
                arr = permute(arr, kv_heads)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, arr)
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        print(f"{gname}: {arr.shape} {args.type if arr.ndim > 1 else 'f32'}", file=sys.stderr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
