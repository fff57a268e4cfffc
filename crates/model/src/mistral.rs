//! The Mistral forward pass on one tensor-parallel rank.
//!
//! A step takes a batch of chunks — each a run of consecutive tokens of one sequence:
//! a prefill chunk, or a single decode token — and runs them together: the linear
//! layers see all tokens of all chunks as one matrix, attention runs per sequence over
//! that sequence's cached keys plus the chunk's own. q/k/v/gate/up are
//! column-parallel, o/down row-parallel followed by an all-reduce; the embedding and
//! lm_head are split by vocabulary rows.

use crate::config::MistralConfig;
use crate::kv_cache::{DecodeTables, KvCache, KvCacheConfig, SeqId};
use crate::linear::Linear;
use crate::partition::Partition;
use crate::weights::{Slice, WeightSource};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use sirocco_collective::Collective;
use sirocco_kernels::elementwise::QkvShape;
use std::sync::Arc;

/// A run of consecutive tokens of one sequence, continuing where its cache ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
}

/// One decoder layer. q, k and v are one matrix, and so are gate and up: a call
/// per group streams the weights with fewer, larger matmuls.
struct Layer {
    input_norm: Tensor,
    /// `[q; k; v]` rows of this rank's heads.
    qkv: Linear,
    o: Linear,
    post_norm: Tensor,
    /// `[gate; up]` rows of this rank's slice of the MLP.
    gate_up: Linear,
    down: Linear,
}

/// This rank's slice of the model.
pub struct Mistral {
    cfg: MistralConfig,
    part: Partition,
    /// The weights' (and the KV cache's) dtype.
    dtype: DType,
    /// The activations' dtype: the weights' on GPUs; f32 on the CPU, whose kernels
    /// widen half-precision weights in registers anyway and whose element-wise ops
    /// would otherwise convert every value on the way in and out.
    act: DType,
    device: Device,
    /// `None` when the embedding is tied to the lm_head, which then serves the
    /// lookups too (one copy of the matrix).
    embed: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    collective: Arc<dyn Collective>,
}

/// How one step's chunks attend, worked out once for all layers: prefill chunks one
/// by one, decode tokens (chunks of one token) together.
struct AttentionPlan {
    /// `(chunk index, first row in the step)` of each chunk of several tokens.
    prefill: Vec<(usize, usize)>,
    decode: Option<DecodePlan>,
    /// Rows of `[prefill outputs.., decode outputs]` in step order, when that differs.
    reorder: Option<Tensor>,
}

struct DecodePlan {
    /// The decode tokens' rows among the step's, unless they are all of them.
    rows_in_step: Option<Tensor>,
    /// Pool rows their keys and values go to (also on the GPU, when there).
    cache_rows: Vec<u32>,
    cache_rows_dev: Option<Tensor>,
    tables: DecodeTables,
}

impl AttentionPlan {
    /// After `cache.reserve` for every chunk, before any is advanced.
    fn new(chunks: &[Chunk], cache: &KvCache, device: &Device) -> Result<Self> {
        let mut prefill = Vec::new();
        let (mut dec_seqs, mut dec_rows) = (Vec::new(), Vec::new());
        let mut row = 0;
        for (i, c) in chunks.iter().enumerate() {
            if c.tokens.len() == 1 {
                dec_seqs.push(c.seq);
                dec_rows.push(row as u32);
            } else {
                prefill.push((i, row));
            }
            row += c.tokens.len();
        }
        let decode = if dec_seqs.is_empty() {
            None
        } else {
            let cache_rows = cache.decode_rows(&dec_seqs)?;
            let mut tables = cache.decode_tables(&dec_seqs)?;
            // Uploaded once per step rather than once per layer.
            let on_gpu = !device.is_cpu();
            if on_gpu {
                tables.device_meta = Some(Tensor::new(tables.meta().as_slice(), device)?);
            }
            Some(DecodePlan {
                rows_in_step: (!prefill.is_empty())
                    .then(|| Tensor::new(dec_rows.as_slice(), device))
                    .transpose()?,
                cache_rows_dev: on_gpu.then(|| Tensor::new(cache_rows.as_slice(), device)).transpose()?,
                cache_rows,
                tables,
            })
        };
        // Outputs come as [prefill chunks in order, then decode tokens]; map back.
        let mut order: Vec<u32> = Vec::with_capacity(row);
        for &(i, r) in &prefill {
            order.extend((r..r + chunks[i].tokens.len()).map(|x| x as u32));
        }
        order.extend_from_slice(&dec_rows);
        let mut inverse = vec![0u32; row];
        for (pos, &r) in order.iter().enumerate() {
            inverse[r as usize] = pos as u32;
        }
        let identity = inverse.iter().enumerate().all(|(i, &p)| i as u32 == p);
        let reorder = (!identity)
            .then(|| Tensor::new(inverse.as_slice(), device))
            .transpose()?;
        Ok(AttentionPlan {
            prefill,
            decode,
            reorder,
        })
    }
}

impl Mistral {
    /// Loads the slice of the model that `part` describes.
    pub fn load(
        cfg: &MistralConfig,
        source: &dyn WeightSource,
        part: Partition,
        dtype: DType,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        if collective.world_size() != part.world || collective.rank() != part.rank {
            bail!(
                "collective is rank {} of {}, partition is rank {} of {}",
                collective.rank(),
                collective.world_size(),
                part.rank,
                part.world
            );
        }
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let load = |name: &str, shape: &[usize], slice: Slice| source.load(name, shape, &slice, dtype, device);
        let act = if device.is_cpu() { DType::F32 } else { dtype };
        let norm = |name: &str| -> Result<Tensor> { Ok(load(name, &[h], Slice::Full)?.to_dtype(act)?) };
        let linear = |name: &str, shape: &[usize], slice: Slice| Linear::new(load(name, shape, slice)?);
        let q_rows = part.q_heads.start * hd..part.q_heads.end * hd;
        let kv_rows = part.kv_heads.start * hd..part.kv_heads.end * hd;
        let (q_all, kv_all) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let i_all = cfg.intermediate_size;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                qkv: Linear::new(Tensor::cat(
                    &[
                        load(
                            &format!("{p}.self_attn.q_proj.weight"),
                            &[q_all, h],
                            Slice::Rows(q_rows.clone()),
                        )?,
                        load(
                            &format!("{p}.self_attn.k_proj.weight"),
                            &[kv_all, h],
                            Slice::Rows(kv_rows.clone()),
                        )?,
                        load(
                            &format!("{p}.self_attn.v_proj.weight"),
                            &[kv_all, h],
                            Slice::Rows(kv_rows.clone()),
                        )?,
                    ],
                    0,
                )?)?,
                o: linear(
                    &format!("{p}.self_attn.o_proj.weight"),
                    &[h, q_all],
                    Slice::Cols(q_rows.clone()),
                )?,
                post_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_up: Linear::new(Tensor::cat(
                    &[
                        load(
                            &format!("{p}.mlp.gate_proj.weight"),
                            &[i_all, h],
                            Slice::Rows(part.mlp.clone()),
                        )?,
                        load(
                            &format!("{p}.mlp.up_proj.weight"),
                            &[i_all, h],
                            Slice::Rows(part.mlp.clone()),
                        )?,
                    ],
                    0,
                )?)?,
                down: linear(
                    &format!("{p}.mlp.down_proj.weight"),
                    &[h, i_all],
                    Slice::Cols(part.mlp.clone()),
                )?,
            });
        }
        let vocab = Slice::Rows(part.vocab.clone());
        let v = cfg.vocab_size;
        let embed = load("model.embed_tokens.weight", &[v, h], vocab.clone())?;
        let (embed, lm_head) = if cfg.tie_word_embeddings || !source.contains("lm_head.weight") {
            if !cfg.tie_word_embeddings {
                bail!("checkpoint has no `lm_head.weight` and config.json does not set tie_word_embeddings");
            }
            (None, Linear::new(embed)?)
        } else {
            (Some(embed), linear("lm_head.weight", &[v, h], vocab)?)
        };
        let norm = norm("model.norm.weight")?;
        let (cos, sin) = rope_tables(cfg, act, device)?;
        Ok(Mistral {
            cfg: cfg.clone(),
            part,
            dtype,
            act,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            collective,
        })
    }

    pub fn config(&self) -> &MistralConfig {
        &self.cfg
    }

    pub fn partition(&self) -> &Partition {
        &self.part
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A cache for this rank's KV heads holding up to `capacity_tokens` slots.
    pub fn new_cache(&self, capacity_tokens: usize, block_size: usize) -> Result<KvCache> {
        KvCache::new(self.cache_config(capacity_tokens, block_size))
    }

    pub fn cache_config(&self, capacity_tokens: usize, block_size: usize) -> KvCacheConfig {
        KvCacheConfig {
            layers: self.cfg.num_hidden_layers,
            kv_heads: self.part.num_kv_heads(),
            head_dim: self.cfg.head_dim,
            dtype: self.dtype,
            device: self.device.clone(),
            block_size: block_size.max(1),
            positions_per_seq: self.cfg.kv_positions(),
            max_context: self.cfg.max_context(),
            capacity_tokens,
        }
    }

    /// Bytes of weights this rank reads in one decode step.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.lm_head.elem_count() + self.norm.elem_count();
        for l in &self.layers {
            n += l.input_norm.elem_count() + l.post_norm.elem_count();
            for w in [&l.qkv, &l.o, &l.gate_up, &l.down] {
                n += w.elem_count();
            }
        }
        n * self.dtype.size_in_bytes()
    }

    /// Runs one step over `chunks` (at most one per sequence) and returns f32 logits at
    /// each chunk's last token, `[chunks, vocab]`, identical on every rank.
    ///
    /// Every rank of the group must run the same step. On error the step may have
    /// reserved cache blocks but has advanced no sequence.
    pub fn forward(&self, chunks: &[Chunk], cache: &mut KvCache) -> Result<Tensor> {
        if chunks.is_empty() {
            bail!("a step needs at least one chunk");
        }
        for (i, c) in chunks.iter().enumerate() {
            if c.tokens.is_empty() {
                bail!("chunk {i} (sequence {}) has no tokens", c.seq);
            }
            if chunks[..i].iter().any(|o| o.seq == c.seq) {
                bail!("sequence {} appears twice in one step", c.seq);
            }
            if let Some(&bad) = c.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                bail!(
                    "token id {bad} is outside the vocabulary (size {})",
                    self.cfg.vocab_size
                );
            }
        }
        for c in chunks {
            cache.reserve(c.seq, c.tokens.len())?;
        }

        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let positions: Vec<u32> = chunks
            .iter()
            .flat_map(|c| {
                let start = cache.seq_len(c.seq) as u32;
                start..start + c.tokens.len() as u32
            })
            .collect();
        let positions_t = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&positions_t, 0)?;
        let sin = self.sin.index_select(&positions_t, 0)?;

        let mut x = self.embed_tokens(&ids)?;
        let (nq, nkv, hd) = (self.part.num_q_heads(), self.part.num_kv_heads(), self.cfg.head_dim);
        let plan = AttentionPlan::new(chunks, cache, &self.device)?;
        let eps = self.cfg.rms_norm_eps as f32;
        let shape = QkvShape {
            heads: nq,
            kv_heads: nkv,
            head_dim: hd,
        };
        // Each residual add is fused with the norm after it (the next layer's input
        // norm for the MLP's).
        let mut h = match self.layers.first() {
            Some(l) => crate::cpu::rms_norm(&x, &l.input_norm, eps)?,
            None => x.clone(),
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let qkv = layer.qkv.forward(&h)?;
            let (q, k, v) = crate::cpu::split_qkv_rope(&qkv, &cos, &sin, shape)?;

            // Prefill chunks attend one by one over their cached keys plus their own;
            // decode tokens are written first, then attend together in one kernel.
            let mut outs = Vec::with_capacity(plan.prefill.len() + 1);
            for &(ci, row) in &plan.prefill {
                let c = &chunks[ci];
                let t = c.tokens.len();
                let (qc, kc, vc) = (q.narrow(0, row, t)?, k.narrow(0, row, t)?, v.narrow(0, row, t)?);
                outs.push(self.attention(c.seq, li, &qc, &kc, &vc, cache)?);
                cache.write(c.seq, li, &kc, &vc)?;
            }
            if let Some(d) = &plan.decode {
                let pick = |t: &Tensor| -> Result<Tensor> {
                    Ok(match &d.rows_in_step {
                        Some(rows) => t.index_select(rows, 0)?,
                        None => t.clone(),
                    })
                };
                let (qd, kd, vd) = (pick(&q)?, pick(&k)?, pick(&v)?);
                cache.write_rows_of(li, &d.cache_rows, d.cache_rows_dev.as_ref(), &kd, &vd)?;
                let (kp, vp) = cache.pool(li);
                outs.push(crate::attention::decode_attention(&qd, kp, vp, &d.tables)?);
            }
            let attn = if outs.len() == 1 {
                outs.pop().expect("one output")
            } else {
                Tensor::cat(&outs, 0)?
            };
            let attn = match &plan.reorder {
                Some(order) => attn.index_select(order, 0)?,
                None => attn,
            };
            let attn = self.collective.all_reduce_sum(&layer.o.forward(&attn)?)?;
            let (sum, h_mlp) = crate::cpu::add_rms_norm(&x, &attn, &layer.post_norm, eps)?;
            x = sum;

            let act = crate::cpu::swiglu(&layer.gate_up.forward(&h_mlp)?)?;
            let mlp = self.collective.all_reduce_sum(&layer.down.forward(&act)?)?;
            match self.layers.get(li + 1) {
                Some(next) => (x, h) = crate::cpu::add_rms_norm(&x, &mlp, &next.input_norm, eps)?,
                None => x = (x + mlp)?,
            }
        }
        for c in chunks {
            cache.advance(c.seq, c.tokens.len());
        }

        let mut last = Vec::with_capacity(chunks.len());
        let mut end = 0u32;
        for c in chunks {
            end += c.tokens.len() as u32;
            last.push(end - 1);
        }
        let x = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let x = crate::cpu::rms_norm(&x, &self.norm, eps)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        self.gather_vocab(logits)
    }

    /// Embedding rows for `ids`; each rank holds a vocab slice and contributes zeros
    /// for ids outside it, so a sum over ranks gives every row.
    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        if self.part.world == 1 {
            return self.embed_rows(ids);
        }
        let r = &self.part.vocab;
        let local: Vec<u32> = ids
            .iter()
            .map(|&t| {
                if r.contains(&(t as usize)) {
                    t - r.start as u32
                } else {
                    0
                }
            })
            .collect();
        let mask: Vec<f32> = ids
            .iter()
            .map(|&t| if r.contains(&(t as usize)) { 1.0 } else { 0.0 })
            .collect();
        let rows = self.embed_rows(&local)?;
        let mask = Tensor::from_vec(mask, (ids.len(), 1), &self.device)?.to_dtype(self.act)?;
        Ok(self.collective.all_reduce_sum(&rows.broadcast_mul(&mask)?)?)
    }

    /// Rows of this rank's embedding slice.
    fn embed_rows(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.embed {
            Some(e) => Ok(e
                .index_select(&Tensor::new(ids, &self.device)?, 0)?
                .to_dtype(self.act)?),
            None => self.lm_head.rows(ids),
        }
    }

    /// Joins the ranks' vocab slices of `[b, vocab_slice]` logits into `[b, vocab]`.
    fn gather_vocab(&self, logits: Tensor) -> Result<Tensor> {
        if self.part.world == 1 {
            return Ok(logits);
        }
        let b = logits.dim(0)?;
        let pad = self.part.vocab_padded - self.part.vocab.len();
        let logits = if pad > 0 {
            Tensor::cat(&[logits, Tensor::zeros((b, pad), DType::F32, &self.device)?], 1)?
        } else {
            logits
        };
        // Vocab first so that the all-gather concatenates slices.
        let all = self.collective.all_gather(&logits.t()?.contiguous()?)?;
        let v = self.cfg.vocab_size;
        let parts: Vec<Tensor> = (0..self.part.world)
            .map(|r| {
                let len = crate::partition::even_split(v, r, self.part.world).len();
                all.narrow(0, r * self.part.vocab_padded, len)
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&parts, 0)?.t()?.contiguous()?)
    }

    /// Attention of one chunk's queries `[t, nq, hd]` over the sequence's cached keys
    /// and the chunk's own `[t, nkv, hd]`, with the causal sliding-window mask: the
    /// kernels' tiled attention on the CPU, candle's matmuls over a gathered copy and
    /// an explicit mask elsewhere.
    fn attention(
        &self,
        seq: SeqId,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &KvCache,
    ) -> Result<Tensor> {
        let (t, nq, hd) = q.dims3()?;
        let nkv = k.dim(1)?;
        let group = nq / nkv;
        let start = cache.seq_len(seq);
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
        if self.device.is_cpu() {
            let (kp, vp) = cache.pool(layer);
            let (k, v) = (k.to_dtype(kp.dtype())?, v.to_dtype(vp.dtype())?);
            return crate::attention::prefill_attention_cpu(q, &k, &v, kp, vp, &cache.slots(seq), start, window);
        }
        let (k_all, v_all, key_pos) = match cache.read(seq, layer)? {
            Some((ck, cv, pos)) => {
                let mut key_pos = pos;
                key_pos.extend(start..start + t);
                (Tensor::cat(&[&ck, k], 0)?, Tensor::cat(&[&cv, v], 0)?, key_pos)
            }
            None => (k.clone(), v.clone(), (start..start + t).collect()),
        };
        let l = key_pos.len();
        let mut mask = Vec::with_capacity(t * l);
        let mut masked = false;
        for i in 0..t {
            let qp = start + i;
            for &kp in &key_pos {
                let visible = kp <= qp && qp - kp < window;
                masked |= !visible;
                mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        let f32_ = |x: &Tensor| x.to_dtype(DType::F32);
        // [nkv, group*t, hd]: the query heads of one KV group are consecutive.
        let q = f32_(q)?.transpose(0, 1)?.contiguous()?.reshape((nkv, group * t, hd))?;
        let k = f32_(&k_all)?.transpose(0, 1)?.contiguous()?;
        let v = f32_(&v_all)?.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?.reshape((nkv, group, t, l))?;
        if masked {
            let mask = Tensor::from_vec(mask, (t, l), &self.device)?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv, group * t, l))?;
        let out = probs.matmul(&v)?.reshape((nq, t, hd))?.transpose(0, 1)?;
        Ok(out.reshape((t, nq * hd))?.to_dtype(self.act)?)
    }
}

/// cos and sin of every position's RoPE angles, `[max_context, head_dim / 2]`,
/// computed in f64 for accuracy at long positions.
fn rope_tables(cfg: &MistralConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let n = cfg.max_context();
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let mk = |d: Vec<f32>| -> Result<Tensor> {
        Tensor::from_vec(d, (n, half), device)?
            .to_dtype(dtype)
            .context("rope table")
    };
    Ok((mk(cos)?, mk(sin)?))
}
