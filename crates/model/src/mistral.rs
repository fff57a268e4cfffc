//! The Mistral forward pass on one tensor-parallel rank, laid out as the
//! architecture: [`Mistral`] (embedding, decoder layers, final norm, lm_head) over
//! `DecoderLayer`s (`layer`), each a self-attention (`attention`) and an MLP (`mlp`)
//! with their norms, built from the pieces in `nn`.
//!
//! A step takes a batch of chunks — each a run of consecutive tokens of one sequence:
//! a prefill chunk, or a single decode token — and runs them together (`step`): the
//! linear layers see all tokens of all chunks as one matrix, attention runs per
//! sequence over that sequence's cached keys plus the chunk's own. q/k/v/gate/up are
//! column-parallel, o/down row-parallel followed by an all-reduce; the embedding and
//! lm_head are split by vocabulary rows.

mod attention;
mod layer;
mod mlp;
mod nn;
mod step;

pub use step::Chunk;

use crate::config::MistralConfig;
use crate::kv_cache::{KvCache, KvCacheConfig};
use crate::linear::{Linear, Quantize};
use crate::partition::Partition;
use crate::weights::{Slice, WeightSource};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use layer::DecoderLayer;
use nn::{RmsNorm, RotaryEmbedding, Weights};
use sirocco_collective::Collective;
use std::sync::Arc;
use step::Step;

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
    /// lookups too (one copy of the matrix). Its rows are what a lookup reads.
    embed: Option<Linear>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    collective: Arc<dyn Collective>,
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
        Self::load_quantized(cfg, source, part, dtype, None, device, collective)
    }

    /// [`Mistral::load`], the float weights of the linear layers quantized as they
    /// load when `quantize` says so (the embedding and lm_head to int8 whatever it
    /// says; norms stay in `dtype`). Only the CPU kernels take quantized weights.
    pub fn load_quantized(
        cfg: &MistralConfig,
        source: &dyn WeightSource,
        part: Partition,
        dtype: DType,
        quantize: Option<Quantize>,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        if quantize.is_some() && !device.is_cpu() {
            bail!("quantized weights (--quantize) run on the CPU only; the cuda build does not take them yet");
        }
        if collective.world_size() != part.world || collective.rank() != part.rank {
            bail!(
                "collective is rank {} of {}, partition is rank {} of {}",
                collective.rank(),
                collective.world_size(),
                part.rank,
                part.world
            );
        }
        let act = if device.is_cpu() { DType::F32 } else { dtype };
        let vb = Weights::new(source, dtype, act, device, quantize);
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::load(cfg, &part, act, &collective, &vb.pp(format!("model.layers.{l}"))))
            .collect::<Result<Vec<_>>>()?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let vocab = Slice::Rows(part.vocab.clone());
        // With --quantize the vocabulary matrices are int8 whatever the layers get (as
        // llama.cpp keeps its output matrix above 4 bits): on small models they are a
        // large share of the bytes; at 4 bits they cost the most quality.
        let vocab_vb = vb.with_quantize(quantize.map(|_| Quantize::Int8));
        let vocab_part = |name| nn::Part {
            name,
            shape: [v, h],
            slice: vocab.clone(),
        };
        let embed = vocab_vb.linear(&[vocab_part("model.embed_tokens.weight")], &[])?;
        let (embed, lm_head) = if cfg.tie_word_embeddings || !vb.contains("lm_head.weight") {
            if !cfg.tie_word_embeddings {
                bail!("checkpoint has no `lm_head.weight` and config.json does not set tie_word_embeddings");
            }
            (None, embed)
        } else {
            (Some(embed), vocab_vb.linear(&[vocab_part("lm_head.weight")], &[])?)
        };
        let norm = RmsNorm::load(h, cfg.rms_norm_eps, &vb.pp("model.norm"))?;
        let rope = RotaryEmbedding::new(cfg, act, device)?;
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
            rope,
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

    /// Bytes of weights this rank reads in one decode step, as they are stored
    /// (quantized values with their scales and zeros, where quantized).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self.layers.iter().map(DecoderLayer::bytes).sum();
        self.lm_head.bytes() + self.norm.bytes() + layers
    }

    /// Runs one step over `chunks` (at most one per sequence) and returns f32 logits at
    /// each chunk's last token, `[chunks, vocab]`, identical on every rank.
    ///
    /// Every rank of the group must run the same step. On error the step may have
    /// reserved cache blocks but has advanced no sequence.
    pub fn forward(&self, chunks: &[Chunk], cache: &mut KvCache) -> Result<Tensor> {
        self.check(chunks)?;
        for c in chunks {
            cache.reserve(c.seq, c.tokens.len())?;
        }
        let step = Step::new(chunks, cache, &self.rope, &self.device)?;
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let mut x = self.embed_tokens(&ids)?;
        // Each residual add is fused with the norm after it (the next layer's input
        // norm for the MLP's), so each layer gets its input normed.
        let mut h = match self.layers.first() {
            Some(l) => l.input_layernorm().forward(&x)?,
            None => x.clone(),
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let next = self.layers.get(li + 1).map(DecoderLayer::input_layernorm);
            let (sum, normed) = layer.forward(&x, &h, next, &step, cache, li)?;
            x = sum;
            if let Some(normed) = normed {
                h = normed;
            }
        }
        for c in chunks {
            cache.advance(c.seq, &c.tokens);
        }

        let x = x.index_select(&Tensor::new(step.last_rows().as_slice(), &self.device)?, 0)?;
        let x = self.norm.forward(&x)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        self.gather_vocab(logits)
    }

    /// Refuses a step that is empty, has an empty chunk or two of one sequence, or a
    /// token outside the vocabulary.
    fn check(&self, chunks: &[Chunk]) -> Result<()> {
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
        Ok(())
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
        Ok(self
            .embed
            .as_ref()
            .unwrap_or(&self.lm_head)
            .rows(ids)?
            .to_dtype(self.act)?)
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
}
