//! One step's input and what every layer shares of it: the chunks, how they attend
//! ([`AttentionPlan`], worked out once for all layers) and the RoPE angles at their
//! positions.

use super::nn::RotaryEmbedding;
use crate::kv_cache::{DecodeTables, KvCache, SeqId};
use anyhow::Result;
use candle_core::{Device, Tensor};

/// A run of consecutive tokens of one sequence, continuing where its cache ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
}

/// What the layers of one step share.
pub(super) struct Step<'a> {
    pub(super) chunks: &'a [Chunk],
    pub(super) plan: AttentionPlan,
    /// RoPE's cos and sin at each token's position, `[tokens, head_dim / 2]`.
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

impl<'a> Step<'a> {
    /// After `cache.reserve` for every chunk, before any is advanced.
    pub(super) fn new(chunks: &'a [Chunk], cache: &KvCache, rope: &RotaryEmbedding, device: &Device) -> Result<Self> {
        let positions: Vec<u32> = chunks
            .iter()
            .flat_map(|c| {
                let start = cache.seq_len(c.seq) as u32;
                start..start + c.tokens.len() as u32
            })
            .collect();
        let (cos, sin) = rope.at(&Tensor::new(positions.as_slice(), device)?)?;
        Ok(Step {
            chunks,
            plan: AttentionPlan::new(chunks, cache, device)?,
            cos,
            sin,
        })
    }

    /// Each chunk's last token's row among the step's.
    pub(super) fn last_rows(&self) -> Vec<u32> {
        let mut last = Vec::with_capacity(self.chunks.len());
        let mut end = 0u32;
        for c in self.chunks {
            end += c.tokens.len() as u32;
            last.push(end - 1);
        }
        last
    }
}

/// How one step's chunks attend, worked out once for all layers: prefill chunks one
/// by one, decode tokens (chunks of one token) together.
pub(super) struct AttentionPlan {
    /// `(chunk index, first row in the step)` of each chunk of several tokens.
    pub(super) prefill: Vec<(usize, usize)>,
    pub(super) decode: Option<DecodePlan>,
    /// Rows of `[prefill outputs.., decode outputs]` in step order, when that differs.
    pub(super) reorder: Option<Tensor>,
}

pub(super) struct DecodePlan {
    /// The decode tokens' rows among the step's, unless they are all of them.
    pub(super) rows_in_step: Option<Tensor>,
    /// Pool rows their keys and values go to (also on the GPU, when there).
    pub(super) cache_rows: Vec<u32>,
    pub(super) cache_rows_dev: Option<Tensor>,
    pub(super) tables: DecodeTables,
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
