//! The SwiGLU MLP of one decoder layer: `down(silu(gate(x)) · up(x))`, gate and up
//! column-parallel, down row-parallel.

use super::nn::{RowParallel, Weights};
use crate::config::MistralConfig;
use crate::cpu;
use crate::linear::Linear;
use crate::partition::Partition;
use crate::weights::Slice;
use anyhow::Result;
use candle_core::Tensor;
use sirocco_collective::Collective;
use std::sync::Arc;

/// This rank's slice of a layer's MLP.
pub(super) struct Mlp {
    /// `[gate; up]` rows of this rank's slice: one matmul streams both.
    gate_up: Linear,
    down: RowParallel,
}

impl Mlp {
    pub(super) fn load(
        cfg: &MistralConfig,
        part: &Partition,
        collective: Arc<dyn Collective>,
        vb: &Weights<'_>,
    ) -> Result<Self> {
        let (h, i_all) = (cfg.hidden_size, cfg.intermediate_size);
        let gate_up = Linear::new(Tensor::cat(
            &[
                vb.load("gate_proj.weight", &[i_all, h], Slice::Rows(part.mlp.clone()))?,
                vb.load("up_proj.weight", &[i_all, h], Slice::Rows(part.mlp.clone()))?,
            ],
            0,
        )?)?;
        let down = Linear::new(vb.load("down_proj.weight", &[h, i_all], Slice::Cols(part.mlp.clone()))?)?;
        Ok(Mlp {
            gate_up,
            down: RowParallel::new(down, collective),
        })
    }

    /// Elements of the weights.
    pub(super) fn elem_count(&self) -> usize {
        self.gate_up.elem_count() + self.down.elem_count()
    }

    /// `h`: the normed `[tokens, hidden]` input.
    pub(super) fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let act = cpu::swiglu(&self.gate_up.forward(h)?)?;
        self.down.forward(&act)
    }
}
