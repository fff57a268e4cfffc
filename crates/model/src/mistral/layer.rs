//! One decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

use super::attention::Attention;
use super::mlp::Mlp;
use super::nn::{RmsNorm, Weights};
use super::step::Step;
use crate::config::MistralConfig;
use crate::kv_cache::KvCache;
use crate::partition::Partition;
use anyhow::Result;
use candle_core::{DType, Tensor};
use sirocco_collective::Collective;
use std::sync::Arc;

pub(super) struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// The layer under `vb` (`model.layers.N`).
    pub(super) fn load(
        cfg: &MistralConfig,
        part: &Partition,
        act: DType,
        collective: &Arc<dyn Collective>,
        vb: &Weights<'_>,
    ) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(h, eps, &vb.pp("input_layernorm"))?,
            self_attn: Attention::load(cfg, part, act, collective.clone(), &vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::load(h, eps, &vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::load(cfg, part, collective.clone(), &vb.pp("mlp"))?,
        })
    }

    /// The norm of the layer's input, which the layer before applies (fused into its
    /// last residual add).
    pub(super) fn input_layernorm(&self) -> &RmsNorm {
        &self.input_layernorm
    }

    /// Bytes of the weights as stored.
    pub(super) fn bytes(&self) -> usize {
        self.input_layernorm.bytes() + self.post_attention_layernorm.bytes() + self.self_attn.bytes() + self.mlp.bytes()
    }

    /// Runs layer `layer` on the residual stream `x`, given `h`, `x` normed by
    /// [`Self::input_layernorm`]. Returns the stream after the layer and, with `next`
    /// (the next layer's input norm), the stream normed by it: each residual add is
    /// fused with the norm after it.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        h: &Tensor,
        next: Option<&RmsNorm>,
        step: &Step<'_>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let attn = self.self_attn.forward(h, step, cache, layer)?;
        let (x, h_mlp) = self.post_attention_layernorm.add_forward(x, &attn)?;
        let mlp = self.mlp.forward(&h_mlp)?;
        Ok(match next {
            Some(norm) => {
                let (x, h) = norm.add_forward(&x, &mlp)?;
                (x, Some(h))
            }
            None => ((x + mlp)?, None),
        })
    }
}
