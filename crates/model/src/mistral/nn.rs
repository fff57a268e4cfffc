//! What the layers are built from: weights loaded under a name prefix
//! ([`Weights`], as candle's `VarBuilder::pp`), RMSNorm, rotary embeddings and the
//! row-parallel linear layer that ends each half of a decoder layer.

use crate::config::MistralConfig;
use crate::cpu;
use crate::linear::{Linear, Quantize};
use crate::quantized::{act_order_share, load_quantized_act_order, Prequantized, QuantizedTensor, TensorLookup};
use crate::weights::{Slice, WeightSource};
use anyhow::{bail, Context, Result};
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
    /// Float linear weights are quantized as they load.
    quantize: Option<Quantize>,
}

/// One weight of a linear layer: the `slice` of weight `name` (under the prefix),
/// whose full shape is `shape` (`[out, in]`).
pub(super) struct Part<'n> {
    pub(super) name: &'n str,
    pub(super) shape: [usize; 2],
    pub(super) slice: Slice,
}

impl<'a> Weights<'a> {
    pub(super) fn new(
        source: &'a dyn WeightSource,
        dtype: DType,
        act: DType,
        device: &'a Device,
        quantize: Option<Quantize>,
    ) -> Self {
        Weights {
            source,
            prefix: String::new(),
            dtype,
            act,
            device,
            quantize,
        }
    }

    /// The same weights, quantized as `quantize` says when they load.
    pub(super) fn with_quantize(&self, quantize: Option<Quantize>) -> Self {
        Weights {
            quantize,
            ..self.clone()
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

    /// A linear layer of `parts` stacked by rows (q/k/v, gate/up share one matmul).
    /// Its columns are cut at `col_splits` for some TP degree (row-parallel layers;
    /// empty for column-parallel ones). With `--quantize` each whole float weight is
    /// quantized before it is sliced, so that every TP degree quantizes alike.
    pub(super) fn linear(&self, parts: &[Part<'_>], col_splits: &[usize]) -> Result<Linear> {
        if let Some(pq) = self.source.prequantized() {
            let modules: Vec<String> = parts
                .iter()
                .map(|p| self.name(p.name).trim_end_matches(".weight").to_string())
                .collect();
            // A module counts as quantized when the scheme says so and the checkpoint
            // holds its scales (embeddings are no linear layer, whatever the scheme).
            let stored = |m: &String| {
                ["scales", "weight_scale"]
                    .iter()
                    .any(|t| pq.tensors.raw(&format!("{m}.{t}")).is_some())
            };
            let quantized = modules
                .iter()
                .filter(|m| pq.scheme.is_quantized(m) && stored(m))
                .count();
            if quantized == parts.len() {
                return self.prequantized_linear(pq, parts, &modules);
            }
            if quantized > 0 {
                bail!("{} mix quantized and float weights in one matmul", modules.join(", "));
            }
        }
        if self.quantize.is_none() && self.device.is_cpu() {
            if let Some(lin) = self.native_quantized_linear(parts)? {
                return Ok(lin);
            }
        }
        let Some(q) = self.quantize.filter(|_| self.device.is_cpu()) else {
            let tensors = parts
                .iter()
                .map(|p| self.load(p.name, &p.shape, p.slice.clone()))
                .collect::<Result<Vec<_>>>()?;
            return Linear::new(Tensor::cat(&tensors, 0)?);
        };
        let bits = match q {
            Quantize::Int8 => 8,
            Quantize::Int4 => 4,
        };
        // The parts' rows, stacked as they are quantized (no copy of a whole weight).
        let mut stacked: Option<QuantizedTensor> = None;
        let mut stack = |t: QuantizedTensor| match stacked.as_mut() {
            Some(s) => s.extend_rows(&t),
            None => {
                stacked = Some(t);
                Ok(())
            }
        };
        for p in parts {
            let [n, k] = p.shape;
            let name = self.name(p.name);
            let group = rtn_group_size(k, col_splits, q);
            // Groups run along a row, so rows quantize alone: only the rows this rank
            // keeps are read, a block at a time (no float copy of a whole vocabulary).
            let rows = match &p.slice {
                Slice::Rows(r) => r.clone(),
                _ => 0..n,
            };
            let cols = match &p.slice {
                Slice::Cols(c) => Some(c.clone()),
                _ => None,
            };
            for start in rows.clone().step_by(QUANTIZE_ROWS) {
                let block = start..(start + QUANTIZE_ROWS).min(rows.end);
                let w = self
                    .load(p.name, &p.shape, Slice::Rows(block.clone()))?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                // 4 bits leave too few levels for a symmetric range to waste half of
                // one side: int4 is asymmetric (a zero point per group), as GPTQ and
                // AWQ are.
                let t = QuantizedTensor::quantize_rtn(&w, block.len(), k, bits, group, q == Quantize::Int8);
                let t = match &cols {
                    Some(c) => t
                        .slice_cols(c.clone())
                        .with_context(|| format!("{name}, quantized in groups of {group} columns"))?,
                    None => t,
                };
                stack(t)?;
            }
        }
        match stacked {
            Some(w) => Linear::quantized(&w, self.dtype == DType::BF16),
            None => bail!("a linear layer of no weights"),
        }
    }
}

impl Weights<'_> {
    /// [`Weights::linear`] of weights the checkpoint stores in block formats the
    /// quantized kernels take as they are (a GGUF's Q4_1, say): `None` when a part is
    /// stored otherwise, or when this rank's columns would cut its blocks, and then
    /// every part loads as floats.
    fn native_quantized_linear(&self, parts: &[Part<'_>]) -> Result<Option<Linear>> {
        let mut tensors = Vec::with_capacity(parts.len());
        for p in parts {
            let name = self.name(p.name);
            let Some(full) = self.source.native_quantized(&name, &p.shape)? else {
                return Ok(None);
            };
            tensors.push(match &p.slice {
                Slice::Full => full,
                Slice::Rows(r) => full.slice_rows(r.clone())?,
                Slice::Cols(c) => {
                    let gs = full.group_size;
                    if !c.start.is_multiple_of(gs) || !c.end.is_multiple_of(gs) {
                        tracing::warn!(
                            "{name}: this tensor-parallel rank's input columns {c:?} cut its blocks of {gs}; \
                             it runs dequantized to floats"
                        );
                        return Ok(None);
                    }
                    full.slice_cols(c.clone())?
                }
            });
        }
        let bf16 = self.dtype == DType::BF16;
        let kind = |t: &QuantizedTensor| (t.bits, t.group_size);
        if tensors.iter().all(|t| kind(t) == kind(&tensors[0])) {
            return Ok(Some(Linear::quantized(&QuantizedTensor::concat_rows(&tensors)?, bf16)?));
        }
        // Parts of different block types (a Q4_K q beside a Q6_K v) multiply apart.
        let parts = tensors
            .iter()
            .map(|t| Linear::quantized(t, bf16))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Linear::stack(parts)))
    }

    /// [`Weights::linear`] of a pre-quantized checkpoint's weights `modules`.
    fn prequantized_linear(&self, pq: &Prequantized, parts: &[Part<'_>], modules: &[String]) -> Result<Linear> {
        if !self.device.is_cpu() {
            bail!(
                "{}: quantized checkpoints run on the CPU only; the cuda build does not take them yet",
                modules[0]
            );
        }
        if self.quantize.is_some() {
            bail!(
                "the checkpoint is quantized already ({:?}): drop --quantize",
                pq.scheme.format
            );
        }
        let bf16 = self.dtype == DType::BF16;
        let mut slices = Vec::with_capacity(parts.len());
        for (p, module) in parts.iter().zip(modules) {
            let [n, k] = p.shape;
            let (full, order) = load_quantized_act_order(&pq.tensors, module, &pq.scheme, n, k)?;
            let grouped = || {
                format!(
                    "{module}, quantized in groups of {} columns",
                    pq.scheme.group_size_for(k)
                )
            };
            slices.push(match (&p.slice, order) {
                (Slice::Full, order) => (full, order),
                (Slice::Rows(r), order) => (full.slice_rows(r.clone()).with_context(grouped)?, order),
                (Slice::Cols(c), None) => (full.slice_cols(c.clone()).with_context(grouped)?, None),
                (Slice::Cols(c), Some(order)) => {
                    let (share, local) = act_order_share(&full, &order, c.clone()).with_context(|| {
                        format!(
                            "{module}: its act-order (desc_act) groups mix input features {c:?}, this \
                             tensor-parallel rank's share, with others'; run it with --tp 1, or use a \
                             checkpoint without desc_act (or with static_groups)"
                        )
                    })?;
                    (share, Some(local))
                }
            });
        }
        // Parts in one column order pack as one weight; act-order parts whose orders
        // differ (each layer's own) multiply apart.
        let quantized = |t: &QuantizedTensor, order: Option<Vec<u32>>| {
            let lin = Linear::quantized(t, bf16)?;
            match order {
                Some(o) => lin.with_input_permutation(o),
                None => Ok(lin),
            }
        };
        if slices.iter().all(|(_, o)| *o == slices[0].1) {
            let order = slices[0].1.clone();
            let tensors: Vec<QuantizedTensor> = slices.into_iter().map(|(t, _)| t).collect();
            return quantized(&QuantizedTensor::concat_rows(&tensors)?, order);
        }
        let parts = slices
            .into_iter()
            .map(|(t, o)| quantized(&t, o))
            .collect::<Result<Vec<_>>>()?;
        Ok(Linear::stack(parts))
    }
}

/// Rows of a float weight read and quantized at a time as it loads.
const QUANTIZE_ROWS: usize = 1024;

/// The group size of load-time quantization for a weight of `k` columns that
/// tensor parallelism cuts at `splits` (over every degree the model allows): the
/// largest of 128..8 that divides k and every cut; else the largest that divides k
/// (the degrees whose cuts would split a group are refused at load); else one group
/// per row, which any cut keeps whole. It depends on the model alone, so every TP
/// degree quantizes the same weights alike.
pub(crate) fn rtn_group_size(k: usize, splits: &[usize], q: Quantize) -> usize {
    // Groups of 32 for int4, as llama.cpp's Q4 formats: 64 or 128 lost too much.
    let sizes: &[usize] = match q {
        Quantize::Int8 => &[128, 64, 32, 16, 8],
        Quantize::Int4 => &[32, 16, 8],
    };
    let fits_k = sizes.iter().copied().filter(|&g| k.is_multiple_of(g));
    fits_k
        .clone()
        .find(|&g| splits.iter().all(|s| s.is_multiple_of(g)))
        .or_else(|| fits_k.clone().next())
        .unwrap_or(k)
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

    pub(super) fn bytes(&self) -> usize {
        self.weight.elem_count() * self.weight.dtype().size_in_bytes()
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

    pub(super) fn bytes(&self) -> usize {
        self.linear.bytes()
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

#[cfg(test)]
mod tests {
    use super::{rtn_group_size, Quantize::*};

    #[test]
    fn group_sizes_keep_every_cut_on_a_group_boundary_when_they_can() {
        assert_eq!(rtn_group_size(4096, &[], Int8), 128);
        assert_eq!(rtn_group_size(4096, &[0, 1024, 2048], Int8), 128);
        // Cuts every 448 columns (14336 over 32 ranks): groups of 64.
        assert_eq!(rtn_group_size(14336, &[0, 448, 896], Int8), 64);
        // No size fits a cut at 86: the largest dividing k (that degree is refused).
        assert_eq!(rtn_group_size(256, &[0, 86, 128], Int8), 128);
        assert_eq!(rtn_group_size(96, &[0, 8, 48], Int8), 8);
        // Nothing divides 100 columns: one group per row.
        assert_eq!(rtn_group_size(100, &[0, 50], Int8), 100);
        assert_eq!(rtn_group_size(4096, &[0, 2048], Int4), 32);
        assert_eq!(rtn_group_size(96, &[0, 8, 48], Int4), 8);
    }
}
