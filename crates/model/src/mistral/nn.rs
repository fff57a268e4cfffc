//! What the layers are built from: weights loaded under a name prefix
//! ([`Weights`], as candle's `VarBuilder::pp`), RMSNorm, rotary embeddings and the
//! row-parallel linear layer that ends each half of a decoder layer.

use crate::config::MistralConfig;
use crate::cpu;
use crate::linear::Linear;
use crate::weights::{Slice, WeightSource};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use sirocco_collective::Collective;
use std::sync::Arc;

/// A rank's view of the checkpoint under a name prefix: `vb.pp("mlp").load("up_proj.weight", ..)`
/// reads `<prefix>.mlp.up_proj.weight`.
#[derive(Clone)]
pub(super) struct Weights<'a> {
    source: &'a dyn WeightSource,
    prefix: String,
    /// The weights' dtype.
    dtype: DType,
    /// The activations' dtype, which norm weights are kept in.
    act: DType,
    device: &'a Device,
}

impl<'a> Weights<'a> {
    pub(super) fn new(source: &'a dyn WeightSource, dtype: DType, act: DType, device: &'a Device) -> Self {
        Weights {
            source,
            prefix: String::new(),
            dtype,
            act,
            device,
        }
    }

    /// The same weights under `<prefix>.name`.
    pub(super) fn pp(&self, name: impl std::fmt::Display) -> Self {
        Weights {
            prefix: self.name(&name.to_string()),
            ..self.clone()
        }
    }

    fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The `slice` of weight `name`, whose full shape is `shape`, in the weights'
    /// dtype.
    pub(super) fn load(&self, name: &str, shape: &[usize], slice: Slice) -> Result<Tensor> {
        self.source
            .load(&self.name(name), shape, &slice, self.dtype, self.device)
    }

    pub(super) fn contains(&self, name: &str) -> bool {
        self.source.contains(&self.name(name))
    }
}

/// RMSNorm over the last dimension (the kernels' fused pass on the CPU).
pub(super) struct RmsNorm {
    /// In the activations' dtype.
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// `weight` of `size` elements under `vb`.
    pub(super) fn load(size: usize, eps: f64, vb: &Weights<'_>) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.load("weight", &[size], Slice::Full)?.to_dtype(vb.act)?,
            eps: eps as f32,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        cpu::rms_norm(x, &self.weight, self.eps)
    }

    /// `x + delta` and its norm, `(sum, normed)`: a residual connection and the norm
    /// after it in one pass.
    pub(super) fn add_forward(&self, x: &Tensor, delta: &Tensor) -> Result<(Tensor, Tensor)> {
        cpu::add_rms_norm(x, delta, &self.weight, self.eps)
    }

    pub(super) fn elem_count(&self) -> usize {
        self.weight.elem_count()
    }
}

/// A row-parallel linear layer (o_proj, down_proj): this rank holds a slice of the
/// input features, so its product is a partial sum, all-reduced over the ranks.
pub(super) struct RowParallel {
    linear: Linear,
    collective: Arc<dyn Collective>,
}

impl RowParallel {
    pub(super) fn new(linear: Linear, collective: Arc<dyn Collective>) -> Self {
        RowParallel { linear, collective }
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.collective.all_reduce_sum(&self.linear.forward(x)?)?)
    }

    pub(super) fn elem_count(&self) -> usize {
        self.linear.elem_count()
    }
}

/// cos and sin of every position's RoPE angles, `[max_context, head_dim / 2]`,
/// computed in f64 for accuracy at long positions.
pub(super) struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    pub(super) fn new(cfg: &MistralConfig, dtype: DType, device: &Device) -> Result<Self> {
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
        Ok(RotaryEmbedding {
            cos: mk(cos)?,
            sin: mk(sin)?,
        })
    }

    /// cos and sin at `positions`, `[n, head_dim / 2]` each.
    pub(super) fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }
}
