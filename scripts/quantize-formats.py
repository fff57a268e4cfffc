#!/usr/bin/env python3
"""Writes a quantized copy of a float Hugging Face checkpoint, for testing the quantized loaders.

    quantize-formats.py SRC DST --format gptq|gptq-desc-act|awq|ct-w4a16|ct-int8
                        [--bits B] [--group-size G] [--asym|--sym]
                        [--gptq-calibration FILE [--act-order] [--damp D]]

SRC holds config.json and model.safetensors (or a sharded index) with float weights in the
Hugging Face [out_features, in_features] layout. DST gets:
  - model.safetensors: every linear of the decoder layers (q/k/v/o_proj, gate/up/down_proj)
    quantized (round-to-nearest, or GPTQ) and packed as the format's own tools pack it; every
    other tensor (embeddings, norms, lm_head) copied as is;
  - config.json: SRC's, plus the format's quantization_config;
  - reference.safetensors: for each quantized linear PREFIX, `PREFIX.weight`, the float32
    [out, in] weight that the stored codes, zero points and (f16) scales dequantize to, in the
    checkpoint's own column order: (q - zero) * scale computed in float32;
  - the tokenizer and generation files of SRC.

GPTQ (Frantar et al. 2022), with --gptq-calibration FILE: FILE holds token-id sequences, a JSON
array of arrays or an object whose "sequences" is one. They run through a numpy forward of
the decoder (Llama / Mistral: RMSNorm, RoPE at rope_theta, grouped-query attention, causal
within sliding_window if set, SwiGLU) layer by layer; each linear is quantized from the
Hessian 2 X^T X of its inputs X as the linears before it, already quantized, compute them
(q/k/v together, then o_proj, gate/up, down_proj), then applied quantized. Per linear:
dampening D (default 0.01) times the mean of diag(H) added to the diagonal, the upper Cholesky
factor of H^-1, columns quantized in order, each one's error spread over the columns after it
(lazily, per block of 32), a group's scale and zero taken from its columns as updated when the
group starts. The grid (scales, zeros, codes) is the format's own, as for round-to-nearest.
  --act-order    columns in decreasing order of diag(H), with static groups: every group's
                 scale and zero come from the weight before GPTQ changes it, and the groups
                 stay runs of consecutive columns (g_idx trivial). Recorded as desc_act +
                 static_groups (gptq) or actorder "weight" (compressed-tensors); AWQ has no
                 field for it.
The numpy decoder in float32: a few tens of seconds for a 135M model and 4096 tokens on 2 cores.

Formats (defaults in brackets):
  gptq           AutoGPTQ, checkpoint_format "gptq": stored zero = zero - 1; qweight int32
                 [k/(32/bits), n] packed along k, qzeros int32 [groups, n/(32/bits)] packed
                 along n, scales f16 [groups, n], g_idx int32 [k] = j // group  [4 bits, group
                 32, symmetric: scale 2*max|w|/(2^bits-1), zero 2^(bits-1)]
  gptq-desc-act  as gptq, with desc_act: columns are quantized in decreasing order of their
                 squared norm (with GPTQ: of diag(H)), groups of that order, g_idx a real
                 permutation  [4 bits, group 16, asymmetric]
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


class Grid:
    """A format's quantization grid: `bits` bits, symmetric or not, scales and zero points
    chosen from a group's min and max as the format's own tools choose them. style "gptq"
    (AutoGPTQ / AutoAWQ) or "ct" (compressed-tensors); min_zero 1 where the checkpoint stores
    zero - 1 (GPTQ), so that zero 0 cannot be stored."""

    def __init__(self, fmt, bits, sym):
        self.bits, self.sym = bits, sym
        self.maxq = 2**bits - 1
        self.style = "ct" if fmt.startswith("ct-") else "gptq"
        self.min_zero = 1 if fmt.startswith("gptq") else 0

    def params(self, w):
        """w: [..., g] float. Returns (zero int64, scale f16, scale float32), each [...]."""
        half = 2 ** (self.bits - 1)
        if self.sym:
            amax = np.abs(w).max(axis=-1)
            if self.style == "gptq":
                scale = 2 * amax / self.maxq
            else:
                scale = amax / ((self.maxq + 1) / 2 - 0.5)
            s16, s32 = f16_scale(scale)
            zero = np.full(amax.shape, half, dtype=np.int64)
        else:
            lo = np.minimum(w.min(axis=-1), 0)
            hi = np.maximum(w.max(axis=-1), 0)
            s16, s32 = f16_scale(((hi - lo) / self.maxq).astype(np.float32))
            zero = np.clip(np.rint(-lo / s32), self.min_zero, self.maxq).astype(np.int64)
        return zero, s16, s32

    def codes(self, w, zero, s32):
        """Unsigned codes of w (broadcasting against zero and s32)."""
        return np.clip(np.rint(w / s32) + zero, 0, self.maxq).astype(np.int64)


class Codes:
    """A quantized [n, k] weight: codes q [n, k], zero [n, groups], scale f16 and float32
    [n, groups], in quantization order: column j of q is column perm[j] of the weight, and
    belongs to group j // g."""

    def __init__(self, q, zero, s16, s32, perm, g):
        self.q, self.zero, self.s16, self.s32, self.perm, self.g = q, zero, s16, s32, perm, g

    def rows(self, r):
        return Codes(self.q[r], self.zero[r], self.s16[r], self.s32[r], self.perm, self.g)

    def dequantized(self):
        """The float32 [n, k] weight the codes stand for, in the weight's own column order:
        (q - zero) * scale computed in float32."""
        if not hasattr(self, "_dequantized"):
            zero = np.repeat(self.zero.astype(np.float32), self.g, axis=1)
            dq = (self.q.astype(np.float32) - zero) * np.repeat(self.s32, self.g, axis=1)
            self._dequantized = np.empty_like(dq)
            self._dequantized[:, self.perm] = dq
        return self._dequantized


def rtn(w, g, grid, perm):
    """Round-to-nearest codes of w [n, k] (float32), columns in the order perm."""
    n, k = w.shape
    wp = w[:, perm].reshape(n, k // g, g)
    zero, s16, s32 = grid.params(wp)
    q = grid.codes(wp, zero[:, :, None], s32[:, :, None]).reshape(n, k)
    return Codes(q, zero, s16, s32, perm, g)


def upper_inverse(v):
    """The inverse of an upper triangular matrix, by halves (numpy has no triangular
    inverse, and its general one is several times slower than these products)."""
    n = v.shape[0]
    if n <= 128:
        return np.linalg.inv(v)
    m = n // 2
    a, c = upper_inverse(v[:m, :m]), upper_inverse(v[m:, m:])
    out = np.zeros_like(v)
    out[:m, :m], out[m:, m:] = a, c
    out[:m, m:] = -(a @ v[:m, m:]) @ c
    return out


def gptq(w, hessian, g, grid, damp, act_order=False, static_groups=False, block=32):
    """GPTQ codes of w [n, k] (Frantar et al. 2022) for the inputs whose Hessian is
    `hessian` [k, k] (2 X^T X / tokens): columns are quantized one at a time, each one's
    rounding error, weighted by the inverse Hessian's Cholesky factor, moved onto the
    columns not yet quantized; updates to later blocks of columns are applied lazily, once
    per block. A group's scale and zero come from its columns as updated when the group
    starts, or with static_groups from the weight before any update. act_order: columns
    in decreasing order of the Hessian's diagonal; the groups are then runs of that order
    (the codes' perm), or with static_groups the weight's own consecutive columns."""
    n, k = w.shape
    groups = k // g
    h = hessian.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w = w.astype(np.float32)
    w[:, dead] = 0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    # Transposed, so that a column of w (in quantization order) is a contiguous row.
    wt = np.ascontiguousarray(w.T[perm])
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    # Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j says how column j's error
    # spreads over the columns after it. U = V^-1 for the upper V with H = V V^T, which is
    # the lower Cholesky factor of H with rows and columns reversed.
    v = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    u = upper_inverse(np.ascontiguousarray(v)).astype(np.float32)
    qt = np.zeros((k, n), dtype=np.float32)
    if static_groups:
        zero, s16, s32 = grid.params(w.reshape(n, groups, g))
        group_of = perm // g
    else:
        zero = np.zeros((n, groups), dtype=np.int64)
        s16 = np.zeros((n, groups), dtype=np.float16)
        s32 = np.zeros((n, groups), dtype=np.float32)
        group_of = np.arange(k) // g
    zf = zero.astype(np.float32)
    # Whole groups per block, so that a group's columns are all current when it starts
    # (small blocks: the updates within a block are done a column at a time).
    block = max(block // g, 1) * g if g < k else block
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        wb = wt[i1:i2]
        err = np.empty_like(wb)
        for i in range(i2 - i1):
            j = i1 + i
            if not static_groups and j % g == 0:
                cols = (wt[j:] if g == k else wb[i : i + g]).T
                zero[:, j // g], s16[:, j // g], s32[:, j // g] = grid.params(cols)
                zf[:, j // g] = zero[:, j // g]
            z, s = zf[:, group_of[j]], s32[:, group_of[j]]
            # grid.codes, in float32 (and ufuncs: np.clip costs more than these).
            qc = np.minimum(np.maximum(np.rint(wb[i] / s) + z, 0), grid.maxq, out=qt[j])
            e = np.divide(wb[i] - (qc - z) * s, u[j, j], out=err[i])
            wb[i + 1 :] -= u[j, j + 1 : i2, None] * e
        wt[i2:] -= u[i1:i2, i2:].T @ err
    if static_groups:
        q = np.empty((n, k), dtype=np.int64)
        q[:, perm] = qt.T
        return Codes(q, zero, s16, s32, np.arange(k), g)
    return Codes(qt.T.astype(np.int64), zero, s16, s32, perm, g)


def pack_along_last(v, bits):
    """Unsigned values [..., m] -> uint32 [..., m / (32/bits)], value j in bits bits*(j % pf)."""
    pf = 32 // bits
    v = v.astype(np.uint32).reshape(*v.shape[:-1], v.shape[-1] // pf, pf)
    shifts = (np.arange(pf, dtype=np.uint32) * bits).astype(np.uint32)
    return np.bitwise_or.reduce(v << shifts, axis=-1).view(np.int32)


def pack_linear(c, fmt, bits, sym):
    """Codes of one [n, k] weight -> the format's stored tensors by suffix."""
    n, k = c.q.shape
    groups = k // c.g
    out = {}
    if fmt in ("gptq", "gptq-desc-act"):
        q = np.empty_like(c.q)
        q[:, c.perm] = c.q
        g_idx = np.empty(k, dtype=np.int32)
        g_idx[c.perm] = np.arange(k) // c.g
        out["qweight"] = pack_along_last(q, bits).T.copy()
        out["qzeros"] = pack_along_last((c.zero - 1).T, bits)
        out["scales"] = c.s16.T.copy()
        out["g_idx"] = g_idx
        return out
    if fmt == "awq":
        order = np.array(AWQ_ORDER)

        def awq_pack(v):  # v: [rows, n] unsigned -> [rows, n/8], nibble s = column 8c + order[s]
            rows = v.shape[0]
            v = v.reshape(rows, n // 8, 8)[:, :, order]
            return pack_along_last(v.reshape(rows, n), 4)

        out["qweight"] = awq_pack(c.q.T)
        out["qzeros"] = awq_pack(c.zero.T)
        out["scales"] = c.s16.T.copy()
        return out
    # compressed-tensors: signed codes; canonical = signed + 2^(bits-1).
    half = 2 ** (bits - 1)
    out["weight_scale"] = c.s16
    if fmt == "ct-w4a16":
        out["weight_packed"] = pack_along_last(c.q, bits)
        out["weight_shape"] = np.array([n, k], dtype=np.int64)
        if not sym:
            pf = 32 // bits
            rows = -(-n // pf)
            zp = np.zeros((rows * pf, groups), dtype=np.int64)
            zp[:n] = c.zero
            out["weight_zero_point"] = pack_along_last(zp.T, bits).T.copy()
    else:
        out["weight"] = (c.q - half).astype(np.int8)
        if not sym:
            out["weight_zero_point"] = (c.zero - half).astype(np.int8)
    return out


def rtn_codes(tensors, fmt, grid, group):
    """Round-to-nearest codes of every decoder linear, by weight name."""
    out = {}
    for name in sorted(n for n in tensors if is_linear(n)):
        w = tensors[name].astype(np.float32)
        k = w.shape[1]
        if fmt == "gptq-desc-act":
            perm = np.argsort(-(w.astype(np.float64) ** 2).sum(axis=0), kind="stable")
        else:
            perm = np.arange(k)
        out[name] = rtn(w, k if group == -1 else group, grid, perm)
    return out


# The decoder, in numpy, for GPTQ's calibration pass (Llama / Mistral: RMSNorm, RoPE, grouped
# query attention, causal within sliding_window if set, SwiGLU).


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, cos, sin):
    """x [t, heads, d], rotating halves as Hugging Face does."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Decoder:
    def __init__(self, config):
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or self.hidden // self.heads
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.window = config.get("sliding_window")
        rope_params = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or rope_params
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            sys.exit(f"GPTQ calibration: rope type {scaling} is not supported")
        self.theta = config.get("rope_theta") or rope_params.get("rope_theta", 10000.0)
        self.layers = config["num_hidden_layers"]

    def rope_tables(self, t):
        inv = self.theta ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
        return np.cos(ang).astype(np.float32)[:, None, :], np.sin(ang).astype(np.float32)[:, None, :]

    def attention(self, q, k, v):
        """Sequences of one length: q [b, t, heads, d], k and v [b, t, kv_heads, d] ->
        [b, t, heads * d]."""
        b, t = q.shape[:2]
        rep = self.heads // self.kv_heads
        q = q.reshape(b, t, self.kv_heads, rep, self.head_dim).transpose(0, 2, 3, 1, 4)
        k = k.transpose(0, 2, 3, 1)[:, :, None]  # [b, kv, 1, d, t]
        p = q @ k  # [b, kv, rep, t, t], then softmax in place
        i, j = np.arange(t)[:, None], np.arange(t)[None, :]
        visible = j <= i
        if self.window:
            visible &= i - j < self.window
        p *= np.float32(1 / np.sqrt(self.head_dim))
        p += np.where(visible, np.float32(0), np.float32(-np.inf))
        p -= p.max(axis=-1, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=-1, keepdims=True)
        out = p @ v.transpose(0, 2, 1, 3)[:, :, None]  # [b, kv, rep, t, d]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, self.heads * self.head_dim)


def hessian(x):
    """2 X^T X / tokens of a linear's inputs x [tokens, k] (float32 products, float64 sum)."""
    return (2.0 / x.shape[0]) * (x.T @ x).astype(np.float64)


def gptq_codes(tensors, config, sequences, fmt, grid, group, damp, static_act_order=False):
    """GPTQ codes of every decoder linear, by weight name: the calibration sequences run
    through the decoder layer by layer, each linear quantized from the Hessian of its inputs
    as the already quantized linears before it (in this layer and the ones before) compute
    them, and then applied quantized to give the next linear's inputs."""
    m = Decoder(config)
    act_order = fmt == "gptq-desc-act" or static_act_order
    # Tokens ordered by sequence length, so that sequences of one length run attention as
    # one batch: by_length[t] = (first token, number of sequences).
    sequences = sorted(sequences, key=len)
    by_length, start = {}, 0
    for s in sequences:
        first, count = by_length.get(len(s), (start, 0))
        by_length[len(s)] = (first, count + 1)
        start += len(s)
    tables = {t: m.rope_tables(t) for t in by_length}
    x = tensors["model.embed_tokens.weight"][np.concatenate(sequences)].astype(np.float32)
    out = {}

    def quantize(names, inputs):
        """GPTQ of the linears `names` (all reading `inputs`), stacked: rows are independent."""
        ws = [tensors[n].astype(np.float32) for n in names]
        k = inputs.shape[1]
        c = gptq(np.concatenate(ws), hessian(inputs), k if group == -1 else group, grid, damp, act_order, static_act_order)
        row = 0
        deq = []
        for n, w in zip(names, ws):
            out[n] = c.rows(slice(row, row + w.shape[0]))
            row += w.shape[0]
            deq.append(out[n].dequantized())
        return deq

    for layer in range(m.layers):
        p = f"model.layers.{layer}."
        h = rms_norm(x, tensors[p + "input_layernorm.weight"], m.eps).astype(np.float32)
        wq, wk, wv = quantize([p + f"self_attn.{n}_proj.weight" for n in "qkv"], h)
        attn = np.empty((x.shape[0], m.heads * m.head_dim), dtype=np.float32)
        for t, (first, count) in by_length.items():
            cos, sin = tables[t]
            # Batches of about 2^24 attention scores.
            per = max(1, 2**24 // (m.heads * t * t))
            for s0 in range(first, first + count * t, per * t):
                s1 = min(s0 + per * t, first + count * t)
                hs, b = h[s0:s1], (s1 - s0) // t
                q = rope((hs @ wq.T).reshape(b, t, m.heads, m.head_dim), cos, sin)
                k = rope((hs @ wk.T).reshape(b, t, m.kv_heads, m.head_dim), cos, sin)
                v = (hs @ wv.T).reshape(b, t, m.kv_heads, m.head_dim)
                attn[s0:s1] = m.attention(q, k, v).reshape(s1 - s0, -1)
        (wo,) = quantize([p + "self_attn.o_proj.weight"], attn)
        x = x + attn @ wo.T
        h = rms_norm(x, tensors[p + "post_attention_layernorm.weight"], m.eps).astype(np.float32)
        wg, wu = quantize([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], h)
        gate = h @ wg.T
        act = (gate * 0.5 * (1 + np.tanh(gate / 2)) * (h @ wu.T)).astype(np.float32)  # silu(gate) * up
        (wd,) = quantize([p + "mlp.down_proj.weight"], act)
        x = x + act @ wd.T
        print(f"GPTQ: layer {layer + 1}/{m.layers}", file=sys.stderr, flush=True)
    return out


def quantization_config(fmt, bits, group, sym, damp, act_order):
    if fmt in ("gptq", "gptq-desc-act"):
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group,
            "desc_act": fmt == "gptq-desc-act" or act_order,
            "sym": sym,
            "static_groups": act_order,
            "true_sequential": True,
            "damp_percent": damp,
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
        "actorder": "weight" if act_order else None,
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
    ap.add_argument("--gptq-calibration", metavar="FILE", help="token ids: GPTQ instead of round-to-nearest")
    ap.add_argument("--act-order", action="store_true", help="GPTQ: act order with static groups")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening, a fraction of the mean Hessian diagonal")
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
    if args.act_order and not args.gptq_calibration:
        sys.exit("--act-order needs --gptq-calibration")
    if args.act_order and args.format == "gptq-desc-act":
        sys.exit("--act-order: gptq-desc-act orders its columns already (with groups of that order)")

    with open(os.path.join(args.src, "config.json")) as f:
        config = json.load(f)
    tensors = load_checkpoint(args.src)
    for name in tensors:
        if is_linear(name) and group != -1 and tensors[name].shape[1] % group:
            sys.exit(f"group size {group} does not divide in_features {tensors[name].shape[1]} of {name}")
    grid = Grid(args.format, bits, sym)
    if args.gptq_calibration:
        with open(args.gptq_calibration) as f:
            data = json.load(f)
        if isinstance(data, dict):
            data = data.get("sequences")
        vocab = tensors["model.embed_tokens.weight"].shape[0]
        try:
            sequences = [np.asarray(s, dtype=np.int64) for s in data]
            ok = sequences and all(s.ndim == 1 and len(s) and 0 <= s.min() and s.max() < vocab for s in sequences)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            sys.exit(f"{args.gptq_calibration}: want non-empty arrays of token ids below {vocab}")
        codes = gptq_codes(tensors, config, sequences, args.format, grid, group, args.damp, args.act_order)
        method = f"GPTQ over {sum(map(len, sequences))} calibration tokens"
        if args.act_order:
            method += ", act order"
    else:
        codes = rtn_codes(tensors, args.format, grid, group)
        method = "round-to-nearest"
    os.makedirs(args.dst, exist_ok=True)
    stored, reference = {}, {}
    for name in sorted(tensors):
        if name not in codes:
            stored[name] = tensors[name]
            continue
        prefix = name[: -len(".weight")]
        for suffix, t in pack_linear(codes[name], args.format, bits, sym).items():
            stored[f"{prefix}.{suffix}"] = np.ascontiguousarray(t)
        # save_file writes an array's memory as is: make it C-ordered first.
        reference[name] = np.ascontiguousarray(codes[name].dequantized(), dtype=np.float32)
    save_file(stored, os.path.join(args.dst, "model.safetensors"), metadata={"format": "pt"})
    save_file(reference, os.path.join(args.dst, "reference.safetensors"))
    config["quantization_config"] = quantization_config(args.format, bits, group, sym, args.damp, args.act_order)
    with open(os.path.join(args.dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(args.src, extra)):
            shutil.copy(os.path.join(args.src, extra), os.path.join(args.dst, extra))
    print(f"{args.format}: {len(reference)} linears quantized to {bits} bits (group {group}, "
          f"{'symmetric' if sym else 'asymmetric'}, {method}) in {args.dst}")


if __name__ == "__main__":
    main()
