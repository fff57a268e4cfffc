#!/usr/bin/env python3
"""Writes a quantized copy of a float Hugging Face checkpoint, for testing the quantized loaders.

    quantize-formats.py SRC DST --format gptq|gptq-desc-act|awq|ct-w4a16|ct-int8
                        [--bits B] [--group-size G] [--asym|--sym] [--seed S]

SRC holds config.json and model.safetensors (or a sharded index) with float weights in the
Hugging Face [out_features, in_features] layout. DST gets:
  - model.safetensors: every linear of the decoder layers (q/k/v/o_proj, gate/up/down_proj)
    quantized round-to-nearest and packed as the format's own tools pack it; every other tensor
    (embeddings, norms, lm_head) copied as is;
  - config.json: SRC's, plus the format's quantization_config;
  - reference.safetensors: for each quantized linear PREFIX, `PREFIX.weight`, the float32
    [out, in] weight that the stored codes, zero points and (f16) scales dequantize to, in the
    checkpoint's own column order: (q - zero) * scale computed in float32;
  - the tokenizer and generation files of SRC.

Formats (defaults in brackets):
  gptq           AutoGPTQ, checkpoint_format "gptq": stored zero = zero - 1; qweight int32
                 [k/(32/bits), n] packed along k, qzeros int32 [groups, n/(32/bits)] packed
                 along n, scales f16 [groups, n], g_idx int32 [k] = j // group  [4 bits, group
                 32, symmetric: scale 2*max|w|/(2^bits-1), zero 2^(bits-1)]
  gptq-desc-act  as gptq, with desc_act: columns are quantized in decreasing order of their
                 squared norm, groups of that order, g_idx a real permutation  [4 bits, group
                 16, asymmetric]
  awq            AutoAWQ GEMM: qweight int32 [k, n/8], qzeros int32 [groups, n/8], output
                 columns packed in the order [0, 2, 4, 6, 1, 3, 5, 7], scales f16 [groups, n]
                 [4 bits, group 32, asymmetric (zero_point)]
  ct-w4a16       compressed-tensors pack-quantized: signed codes + 2^(bits-1) packed along k
                 into weight_packed int32 [n, k/(32/bits)], weight_scale f16 [n, groups],
                 weight_shape int64 [2], asymmetric: weight_zero_point int32
                 [n/(32/bits), groups] packed along n  [4 bits, group 32, symmetric: scale
                 max|w|/(2^(bits-1) - 0.5)]
  ct-int8        compressed-tensors int-quantized: weight int8 [n, k] signed codes,
                 weight_scale f16 [n, 1] (channel) or [n, groups] (--group-size), asymmetric:
                 weight_zero_point int8 of the scale's shape  [8 bits, channel, symmetric]

Needs numpy and safetensors (scripts/python-env.sh installs them in .venv).
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

DEFAULTS = {
    "gptq": dict(bits=4, group=32, sym=True),
    "gptq-desc-act": dict(bits=4, group=16, sym=False),
    "awq": dict(bits=4, group=32, sym=False),
    "ct-w4a16": dict(bits=4, group=32, sym=True),
    "ct-int8": dict(bits=8, group=-1, sym=True),
}


def load_checkpoint(src):
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(src, name)))
    return tensors


def is_linear(name):
    parts = name.split(".")
    return (
        name.endswith(".weight")
        and ".layers." in name
        and len(parts) >= 2
        and parts[-2] in LINEARS
    )


def f16_scale(scale):
    """Scales as stored (f16) and as float32 for computing: both sides then agree exactly."""
    s16 = scale.astype(np.float16)
    s16 = np.where(s16 == 0, np.float16(1), s16)
    return s16, s16.astype(np.float32)


def quantize_groups(w, bits, sym, style, min_zero=0):
    """w: [n, groups, g] float32. Returns (q unsigned [n, groups, g], zero unsigned [n, groups],
    scale f16 [n, groups], scale float32 [n, groups]). style "gptq" (AutoGPTQ / AutoAWQ min-max)
    or "ct" (compressed-tensors)."""
    maxq = 2**bits - 1
    half = 2 ** (bits - 1)
    if sym:
        amax = np.abs(w).max(axis=2)
        if style == "gptq":
            scale = 2 * amax / maxq
        else:
            scale = amax / ((maxq + 1) / 2 - 0.5)
        s16, s32 = f16_scale(scale)
        zero = np.full(amax.shape, half, dtype=np.int64)
    else:
        lo = np.minimum(w.min(axis=2), 0)
        hi = np.maximum(w.max(axis=2), 0)
        s16, s32 = f16_scale((hi - lo) / maxq)
        zero = np.clip(np.rint(-lo / s32), min_zero, maxq).astype(np.int64)
    q = np.clip(np.rint(w / s32[:, :, None]) + zero[:, :, None], 0, maxq).astype(np.int64)
    return q, zero, s16, s32


def pack_along_last(v, bits):
    """Unsigned values [..., m] -> uint32 [..., m / (32/bits)], value j in bits bits*(j % pf)."""
    pf = 32 // bits
    v = v.astype(np.uint32).reshape(*v.shape[:-1], v.shape[-1] // pf, pf)
    shifts = (np.arange(pf, dtype=np.uint32) * bits).astype(np.uint32)
    return np.bitwise_or.reduce(v << shifts, axis=-1).view(np.int32)


def quantize_linear(w, fmt, bits, group, sym):
    """w: float32 [n, k]. Returns (stored tensors by suffix, reference float32 [n, k])."""
    n, k = w.shape
    g = k if group == -1 else group
    if k % g:
        sys.exit(f"group size {g} does not divide in_features {k}")
    groups = k // g
    out = {}
    if fmt in ("gptq", "gptq-desc-act"):
        if fmt == "gptq-desc-act":
            perm = np.argsort(-(w.astype(np.float64) ** 2).sum(axis=0), kind="stable")
        else:
            perm = np.arange(k)
        wp = w[:, perm].reshape(n, groups, g)
        # checkpoint_format "gptq" stores zero - 1, so it cannot hold zero 0: min_zero=1.
        qp, zero, s16, s32 = quantize_groups(wp, bits, sym, "gptq", min_zero=1)
        qp = qp.reshape(n, k)
        q = np.empty_like(qp)
        q[:, perm] = qp
        g_idx = np.empty(k, dtype=np.int32)
        g_idx[perm] = np.arange(k) // g
        ref = (q.astype(np.float32) - zero[:, g_idx].astype(np.float32)) * s32[:, g_idx]
        out["qweight"] = pack_along_last(q, bits).T.copy()
        out["qzeros"] = pack_along_last((zero - 1).T, bits)
        out["scales"] = s16.T.copy()
        out["g_idx"] = g_idx
        return out, ref
    if fmt == "awq":
        q, zero, s16, s32 = quantize_groups(w.reshape(n, groups, g), bits, sym, "gptq")
        q = q.reshape(n, k)
        gi = np.arange(k) // g
        ref = (q.astype(np.float32) - zero[:, gi].astype(np.float32)) * s32[:, gi]
        order = np.array(AWQ_ORDER)

        def awq_pack(v):  # v: [rows, n] unsigned -> [rows, n/8], nibble s = column 8c + order[s]
            rows = v.shape[0]
            v = v.reshape(rows, n // 8, 8)[:, :, order]
            return pack_along_last(v.reshape(rows, n), 4)

        out["qweight"] = awq_pack(q.T)
        out["qzeros"] = awq_pack(zero.T)
        out["scales"] = s16.T.copy()
        return out, ref
    # compressed-tensors: signed codes; canonical = signed + 2^(bits-1).
    half = 2 ** (bits - 1)
    q, zero, s16, s32 = quantize_groups(w.reshape(n, groups, g), bits, sym, "ct")
    q = q.reshape(n, k)
    gi = np.arange(k) // g
    ref = (q.astype(np.float32) - zero[:, gi].astype(np.float32)) * s32[:, gi]
    out["weight_scale"] = s16
    if fmt == "ct-w4a16":
        out["weight_packed"] = pack_along_last(q, bits)
        out["weight_shape"] = np.array([n, k], dtype=np.int64)
        if not sym:
            pf = 32 // bits
            rows = -(-n // pf)
            zp = np.zeros((rows * pf, groups), dtype=np.int64)
            zp[:n] = zero
            out["weight_zero_point"] = pack_along_last(zp.T, bits).T.copy()
    else:
        out["weight"] = (q - half).astype(np.int8)
        if not sym:
            out["weight_zero_point"] = (zero - half).astype(np.int8)
    return out, ref


def quantization_config(fmt, bits, group, sym):
    if fmt in ("gptq", "gptq-desc-act"):
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group,
            "desc_act": fmt == "gptq-desc-act",
            "sym": sym,
            "static_groups": False,
            "true_sequential": True,
            "damp_percent": 0.01,
            "checkpoint_format": "gptq",
        }
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": bits,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": "channel" if group == -1 else "group",
        "group_size": None if group == -1 else group,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if fmt == "ct-w4a16" else "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--format", required=True, choices=sorted(DEFAULTS))
    ap.add_argument("--bits", type=int)
    ap.add_argument("--group-size", type=int, help="-1: per channel")
    sym = ap.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None)
    sym.add_argument("--asym", dest="sym", action="store_false")
    args = ap.parse_args()
    d = DEFAULTS[args.format]
    bits = args.bits or d["bits"]
    group = args.group_size if args.group_size is not None else d["group"]
    sym = d["sym"] if args.sym is None else args.sym
    if args.format == "awq" and (bits != 4 or sym):
        sys.exit("awq: 4 bits with zero points (asymmetric) only")
    if args.format == "ct-int8" and bits != 8:
        sys.exit("ct-int8: 8 bits only")
    if bits not in (4, 8):
        sys.exit("--bits must be 4 or 8")

    with open(os.path.join(args.src, "config.json")) as f:
        config = json.load(f)
    tensors = load_checkpoint(args.src)
    os.makedirs(args.dst, exist_ok=True)
    stored, reference = {}, {}
    for name in sorted(tensors):
        w = tensors[name]
        if not is_linear(name):
            stored[name] = w
            continue
        prefix = name[: -len(".weight")]
        out, ref = quantize_linear(w.astype(np.float32), args.format, bits, group, sym)
        for suffix, t in out.items():
            stored[f"{prefix}.{suffix}"] = np.ascontiguousarray(t)
        # save_file writes an array's memory as is: make it C-ordered first.
        reference[name] = np.ascontiguousarray(ref, dtype=np.float32)
    save_file(stored, os.path.join(args.dst, "model.safetensors"), metadata={"format": "pt"})
    save_file(reference, os.path.join(args.dst, "reference.safetensors"))
    config["quantization_config"] = quantization_config(args.format, bits, group, sym)
    with open(os.path.join(args.dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(args.src, extra)):
            shutil.copy(os.path.join(args.src, extra), os.path.join(args.dst, extra))
    print(f"{args.format}: {len(reference)} linears quantized to {bits} bits (group {group}, "
          f"{'symmetric' if sym else 'asymmetric'}) in {args.dst}")


if __name__ == "__main__":
    main()
