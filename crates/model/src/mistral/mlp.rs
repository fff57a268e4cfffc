//! The SwiGLU MLP of one decoder layer: `down(silu(gate(x)) · up(x))`, gate and up
//! column-parallel, down row-parallel.

use super::nn::{Part, RowParallel, Weights};
use crate::config::MistralConfig;
use crate::cpu;
use crate::linear::Linear;
use crate::partition::{column_splits, Partition};
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
        let gate_up = vb.linear(
            &[
                Part {
                    name: "gate_proj.weight",
                    shape: [i_all, h],
                    slice: Slice::Rows(part.mlp.clone()),
                },
                Part {
                    name: "up_proj.weight",
                    shape: [i_all, h],
                    slice: Slice::Rows(part.mlp.clone()),
                },
            ],
            &[],
        )?;
        let down = vb.linear(
            &[Part {
                name: "down_proj.weight",
                shape: [h, i_all],
                slice: Slice::Cols(part.mlp.clone()),
            }],
            &column_splits(cfg, |p| p.mlp.start),
        )?;
        Ok(Mlp {
            gate_up,
            down: RowParallel::new(down, collective),
        })
    }

    /// Bytes of the weights as stored.
    pub(super) fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    /// `h`: the normed `[tokens, hidden]` input.
    pub(super) fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let act = cpu::swiglu(&self.gate_up.forward(h)?)?;
        self.down.forward(&act)
    }
}
