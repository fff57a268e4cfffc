//! Self-attention of one decoder layer: the fused q/k/v projection with RoPE, each
//! chunk's attention over its sequence's cached keys plus its own (the paged kernels
//! in [`crate::attention`] on the CPU and for decode on CUDA), and the row-parallel
//! output projection.

use super::nn::{Part, RowParallel, Weights};
use super::step::Step;
use crate::config::MistralConfig;
use crate::cpu;
use crate::kv_cache::{KvCache, SeqId};
use crate::linear::Linear;
use crate::partition::{column_splits, Partition};
use crate::weights::Slice;
use anyhow::Result;
use candle_core::{DType, Tensor};
use sirocco_collective::Collective;
use sirocco_kernels::elementwise::QkvShape;
use std::sync::Arc;

/// A layer's self-attention on this rank: its query heads and their KV heads.
pub(super) struct Attention {
    /// `[q; k; v]` rows of this rank's heads: one matmul streams all three.
    qkv: Linear,
    o: RowParallel,
    /// This rank's heads.
    shape: QkvShape,
    /// How far back a query sees (`usize::MAX` without a sliding window).
    window: usize,
    /// The activations' dtype.
    act: DType,
}

impl Attention {
    /// The rank's heads of `self_attn` under `vb`: q/k/v rows and o columns.
    pub(super) fn load(
        cfg: &MistralConfig,
        part: &Partition,
        act: DType,
        collective: Arc<dyn Collective>,
        vb: &Weights<'_>,
    ) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_rows = part.q_heads.start * hd..part.q_heads.end * hd;
        let kv_rows = part.kv_heads.start * hd..part.kv_heads.end * hd;
        let (q_all, kv_all) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let qkv = vb.linear(
            &[
                Part {
                    name: "q_proj.weight",
                    shape: [q_all, h],
                    slice: Slice::Rows(q_rows.clone()),
                },
                Part {
                    name: "k_proj.weight",
                    shape: [kv_all, h],
                    slice: Slice::Rows(kv_rows.clone()),
                },
                Part {
                    name: "v_proj.weight",
                    shape: [kv_all, h],
                    slice: Slice::Rows(kv_rows),
                },
            ],
            &[],
        )?;
        let o_splits = column_splits(cfg, |p| p.q_heads.start * hd);
        let o = vb.linear(
            &[Part {
                name: "o_proj.weight",
                shape: [h, q_all],
                slice: Slice::Cols(q_rows),
            }],
            &o_splits,
        )?;
        Ok(Attention {
            qkv,
            o: RowParallel::new(o, collective),
            shape: QkvShape {
                heads: part.num_q_heads(),
                kv_heads: part.num_kv_heads(),
                head_dim: hd,
            },
            window: cfg.sliding_window.unwrap_or(usize::MAX),
            act,
        })
    }

    /// Bytes of the weights as stored.
    pub(super) fn bytes(&self) -> usize {
        self.qkv.bytes() + self.o.bytes()
    }

    /// Attention of the step's tokens `h` (normed, `[tokens, hidden]`) at `layer`;
    /// writes their keys and values to `cache`.
    ///
    /// Prefill chunks attend one by one over their cached keys plus their own; decode
    /// tokens are written first, then attend together in one kernel.
    pub(super) fn forward(&self, h: &Tensor, step: &Step<'_>, cache: &mut KvCache, layer: usize) -> Result<Tensor> {
        let qkv = self.qkv.forward(h)?;
        let (q, k, v) = cpu::split_qkv_rope(&qkv, &step.cos, &step.sin, self.shape)?;
        let plan = &step.plan;
        let mut outs = Vec::with_capacity(plan.prefill.len() + 1);
        for &(ci, row) in &plan.prefill {
            let c = &step.chunks[ci];
            let t = c.tokens.len();
            let (qc, kc, vc) = (q.narrow(0, row, t)?, k.narrow(0, row, t)?, v.narrow(0, row, t)?);
            outs.push(self.prefill(c.seq, layer, &qc, &kc, &vc, cache)?);
            cache.write(c.seq, layer, &kc, &vc)?;
        }
        if let Some(d) = &plan.decode {
            let pick = |t: &Tensor| -> Result<Tensor> {
                Ok(match &d.rows_in_step {
                    Some(rows) => t.index_select(rows, 0)?,
                    None => t.clone(),
                })
            };
            let (qd, kd, vd) = (pick(&q)?, pick(&k)?, pick(&v)?);
            cache.write_rows_of(layer, &d.cache_rows, d.cache_rows_dev.as_ref(), &kd, &vd)?;
            let (kp, vp) = cache.pool(layer);
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
        self.o.forward(&attn)
    }

    /// Attention of one chunk's queries `[t, nq, hd]` over the sequence's cached keys
    /// and the chunk's own `[t, nkv, hd]`, with the causal sliding-window mask: the
    /// kernels' tiled attention on the CPU, candle's matmuls over a gathered copy and
    /// an explicit mask elsewhere.
    fn prefill(&self, seq: SeqId, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, cache: &KvCache) -> Result<Tensor> {
        let (t, nq, hd) = q.dims3()?;
        let nkv = k.dim(1)?;
        let group = nq / nkv;
        let start = cache.seq_len(seq);
        let window = self.window;
        if q.device().is_cpu() {
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
            let mask = Tensor::from_vec(mask, (t, l), q.device())?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv, group * t, l))?;
        let out = probs.matmul(&v)?.reshape((nq, t, hd))?.transpose(0, 1)?;
        Ok(out.reshape((t, nq * hd))?.to_dtype(self.act)?)
    }
}
