//! Quantized linear weights read from quantized Hugging Face checkpoints, brought to one
//! canonical form, [`QuantizedTensor`]: a `[n, k]` (`[out_features, in_features]`) matrix of
//! unsigned integer codes, row-major, with one zero point and one scale per row and group
//! of `group_size` consecutive input columns. This module owns that form, the reading of
//! `config.json`'s `quantization_config` ([`read_quantization`] → [`QuantScheme`]), the
//! unpacking of each supported checkpoint format ([`load_quantized`]), a reference
//! round-to-nearest quantizer ([`QuantizedTensor::quantize_rtn`]) and tensor-parallel
//! slicing. It does not compute with the weights (the kernels do). A checkpoint whose
//! config declares a supported scheme loads as [`Prequantized`] beside its float tensors
//! (`builtin`), and the model's linear layers take their weights from it (`mistral::nn`).
//! An act-order permutation is served by gathering the layer's input into the weight's
//! column order (`Linear::with_input_permutation`).
//!
//! # Supported checkpoints
//!
//! | `quant_method` | variant | tensors per linear (`n` = out, `k` = in) |
//! | --- | --- | --- |
//! | `gptq` | `bits` 4 or 8; `group_size` dividing `k` or −1 (per channel); `sym` true or false; `desc_act` true or false; `checkpoint_format` `gptq` (default: stored zero = zero − 1) or `gptq_v2` (stored zero = zero) | `qweight` i32 `[k/(32/bits), n]` packed along k (input column `j` in bits `bits*(j % (32/bits))` of row `j / (32/bits)`), `qzeros` i32 `[groups, n/(32/bits)]` packed along n the same way, `scales` `[groups, n]`, `g_idx` i32 `[k]` (optional) |
//! | `awq` | `version` `gemm`, `bits` 4, `zero_point` true, `group_size` dividing `k` | `qweight` i32 `[k, n/8]` and `qzeros` i32 `[groups, n/8]` with output column `8c + o` in nibble `[0, 4, 1, 5, 2, 6, 3, 7][o]` of word `c` (AutoAWQ's pack order `[0, 2, 4, 6, 1, 3, 5, 7]`), `scales` `[groups, n]` |
//! | `compressed-tensors` | format `pack-quantized`, `num_bits` 4 or 8, `type` int, `strategy` channel, group or tensor, symmetric or not | `weight_packed` i32 `[n, k/(32/bits)]` (input column `j` in bits `bits*(j % (32/bits))`, values offset by `2^(bits-1)`), `weight_scale` `[n, groups]`, `weight_zero_point` (asymmetric only) i32 `[n/(32/bits), groups]` packed along n, or i8 `[n, groups]`, optional `weight_shape` = `[n, k]` |
//! | `compressed-tensors` | format `int-quantized` or `naive-quantized`, `num_bits` 8 (or 4 stored in i8) | `weight` i8 `[n, k]` (signed codes), `weight_scale` `[n, 1]`, `[n, groups]` or `[1]`, optional `weight_zero_point` i8/i32 of the scale's shape |
//!
//! Scales may be stored as f16, bf16 or f32; they are widened to f32 exactly. A
//! compressed-tensors config may also quantize activations (`input_activations`, e.g. W8A8):
//! the weights load the same way and [`QuantScheme::activations_quantized`] says so.
//!
//! Refused with an error that names the field or tensor: any other `quant_method`
//! (bitsandbytes, fp8, hqq, …), other bit widths, a group size that does not divide `k`,
//! GPTQ `checkpoint_format`s other than `gptq`/`gptq_v2` (marlin, bitblas, …), AWQ versions
//! other than `gemm` (`gemv`, `gemv_fast`, `marlin`, `exllama`, …) and AWQ without zero
//! points, compressed-tensors formats other than the three above (`float-quantized`,
//! `marlin-24`, `nvfp4-pack-quantized`, sparse formats, …), float `type`s, more than one
//! config group or targets other than `Linear`, `actorder: group` (it needs `weight_g_idx`),
//! a quantized KV cache, and a v1 GPTQ zero point equal to `2^bits` (stored `2^bits - 1`:
//! not representable; re-save as `gptq_v2`). Tensors of the wrong shape or dtype are refused
//! with both shapes in the message.
//!
//! # GPTQ act order (`desc_act`)
//!
//! `g_idx[j]` is the group of input column `j`. When it is the trivial `j / group_size` (no
//! act order, or act order with static groups) the weight loads directly. When it is a real
//! permutation, [`load_quantized`] refuses it, and [`load_quantized_act_order`] permutes
//! the input columns so that each group is contiguous and returns the permutation `perm`:
//! canonical column `p` is checkpoint column `perm[p]`, so `y = W x` becomes
//! `y = W' x'` with `x'[p] = x[perm[p]]`. Each group must hold exactly `group_size` columns.
//!
//! # Tensor parallelism
//!
//! [`QuantizedTensor::slice_rows`] (column-parallel layers) takes any row range;
//! [`QuantizedTensor::slice_cols`] (row-parallel layers) refuses a range that would split a
//! quantization group, naming the TP degree as the cause. With act order, columns `a..b` of
//! the permuted weight read the input features `perm[a..b]`, not `a..b`: a row-parallel
//! rank, which holds input features `a..b` only, takes the groups whose columns all read
//! features there ([`act_order_share`]), and a degree where some group reads features of
//! two ranks is refused (real act-order checkpoints mix features across the whole range,
//! so their row-parallel layers run at tp 1; column-parallel ones split at any degree).
//!
//! # Layout conventions
//!
//! Every format is brought to `[out, in]` (GPTQ's and AWQ's `[in, out]` storage is
//! transposed) and to unsigned codes with `w = (q - zero) * scale` (compressed-tensors'
//! signed codes and zero points are shifted by `2^(bits-1)`).

mod formats;
mod scheme;
mod source;
#[cfg(test)]
mod tests;

pub use formats::{load_quantized, load_quantized_act_order};

/// A pre-quantized checkpoint: how it is quantized, and its tensors (the integer
/// ones of its quantized linear layers, and the float rest).
pub struct Prequantized {
    pub scheme: QuantScheme,
    pub tensors: crate::weights::Checkpoint,
}
pub use scheme::{read_quantization, Granularity, QuantFormat, QuantScheme};
pub use source::{RawTensor, TensorLookup};

use anyhow::{bail, ensure, Result};
use std::ops::Range;

/// A quantized `[n, k]` weight (Hugging Face `[out_features, in_features]`, row-major),
/// unpacked: `w[i][j] = (q[i*k + j] as f32 - zeros[i*(k/group_size) + j/group_size]) * scales[same index]`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    /// 8 or 4.
    pub bits: u8,
    /// Divides `k`; `== k` means per channel.
    pub group_size: usize,
    pub n: usize,
    pub k: usize,
    /// `n*k` values in `[0, 2^bits)`.
    pub q: Vec<u8>,
    /// `n*k/group_size` values: integers in `[0, 2^bits)` for the zero-point formats
    /// (GPTQ, AWQ, symmetric ones), any finite value for min/max ones (GGUF's Q4_1:
    /// `−min/scale`).
    pub zeros: Vec<f32>,
    /// `n*k/group_size` values.
    pub scales: Vec<f32>,
}

impl QuantizedTensor {
    /// Groups per row (`k / group_size`).
    pub fn groups_per_row(&self) -> usize {
        self.k / self.group_size
    }

    /// The float `[n, k]` weight, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let gpr = self.groups_per_row();
        let mut out = Vec::with_capacity(self.n * self.k);
        for i in 0..self.n {
            let row = &self.q[i * self.k..(i + 1) * self.k];
            for (j, &q) in row.iter().enumerate() {
                let g = i * gpr + j / self.group_size;
                out.push((q as f32 - self.zeros[g]) * self.scales[g]);
            }
        }
        out
    }

    /// Checks lengths, value ranges and that the group size divides `k`; errors name `name`.
    pub fn validate(&self, name: &str) -> Result<()> {
        ensure!(
            self.bits == 4 || self.bits == 8,
            "quantized tensor `{name}`: bits = {}, supported: 4, 8",
            self.bits
        );
        ensure!(
            self.group_size > 0 && self.k > 0 && self.k.is_multiple_of(self.group_size),
            "quantized tensor `{name}`: group_size {} does not divide k = {}",
            self.group_size,
            self.k
        );
        ensure!(
            self.q.len() == self.n * self.k,
            "quantized tensor `{name}`: q has {} values, expected n*k = {}*{}",
            self.q.len(),
            self.n,
            self.k
        );
        let groups = self.n * self.groups_per_row();
        ensure!(
            self.zeros.len() == groups && self.scales.len() == groups,
            "quantized tensor `{name}`: {} zeros and {} scales, expected n*k/group_size = {groups}",
            self.zeros.len(),
            self.scales.len()
        );
        let limit = 1u16 << self.bits;
        if let Some(p) = self.q.iter().position(|&v| v as u16 >= limit) {
            bail!(
                "quantized tensor `{name}`: q[{p}] = {} is out of range for {} bits",
                self.q[p],
                self.bits
            );
        }
        if let Some(p) = self.zeros.iter().position(|v| !v.is_finite()) {
            bail!(
                "quantized tensor `{name}`: zeros[{p}] = {} is not finite",
                self.zeros[p]
            );
        }
        if let Some(p) = self.scales.iter().position(|s| !s.is_finite()) {
            bail!(
                "quantized tensor `{name}`: scales[{p}] = {} is not finite",
                self.scales[p]
            );
        }
        Ok(())
    }

    /// Round-to-nearest quantization of the row-major `[n, k]` weight `w`.
    ///
    /// Symmetric: zero `2^(bits-1)` (128 or 8), scale `max|w| / (2^(bits-1) - 1)` per group
    /// (127 or 7). Asymmetric: the group's range `[min(w, 0), max(w, 0)]` (zero included, so
    /// that the zero point is representable) spread over `2^bits - 1` steps, zero =
    /// `round(-min / scale)` clamped. Either way `|w - dequantized| <= scale / 2` (up to f32
    /// rounding). An all-zero group gets scale 0.
    ///
    /// Panics if `bits` is not 4 or 8, `group_size` does not divide `k` or `w.len() != n*k`.
    pub fn quantize_rtn(
        w: &[f32],
        n: usize,
        k: usize,
        bits: u8,
        group_size: usize,
        symmetric: bool,
    ) -> QuantizedTensor {
        assert!(bits == 4 || bits == 8, "quantize_rtn: bits must be 4 or 8, got {bits}");
        assert!(
            group_size > 0 && k.is_multiple_of(group_size),
            "quantize_rtn: group_size {group_size} must divide k = {k}"
        );
        assert_eq!(
            w.len(),
            n * k,
            "quantize_rtn: w has {} values, expected {n}*{k}",
            w.len()
        );
        let maxq = ((1u32 << bits) - 1) as f32;
        let gpr = k / group_size;
        let mut q = vec![0u8; n * k];
        let mut zeros = Vec::with_capacity(n * gpr);
        let mut scales = Vec::with_capacity(n * gpr);
        for i in 0..n {
            for g in 0..gpr {
                let start = i * k + g * group_size;
                let vals = &w[start..start + group_size];
                let (scale, zero) = if symmetric {
                    let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let half = (1u32 << (bits - 1)) as f32;
                    (amax / (half - 1.0), half)
                } else {
                    let lo = vals.iter().fold(0f32, |m, &v| m.min(v));
                    let hi = vals.iter().fold(0f32, |m, &v| m.max(v));
                    let scale = (hi - lo) / maxq;
                    let zero = if scale > 0.0 {
                        (-lo / scale).round().clamp(0.0, maxq)
                    } else {
                        0.0
                    };
                    (scale, zero)
                };
                for (d, &v) in q[start..start + group_size].iter_mut().zip(vals) {
                    let code = if scale > 0.0 {
                        ((v / scale).round() + zero).clamp(0.0, maxq)
                    } else {
                        zero
                    };
                    *d = code as u8;
                }
                zeros.push(zero);
                scales.push(scale);
            }
        }
        QuantizedTensor {
            bits,
            group_size,
            n,
            k,
            q,
            zeros,
            scales,
        }
    }

    /// `parts` stacked by rows (q/k/v or gate/up, which share one matmul): they must
    /// agree on bits, columns and group size.
    pub fn concat_rows(parts: &[QuantizedTensor]) -> Result<QuantizedTensor> {
        let Some((first, rest)) = parts.split_first() else {
            bail!("no quantized tensors to stack");
        };
        let mut out = first.clone();
        for p in rest {
            out.extend_rows(p)?;
        }
        Ok(out)
    }

    /// Appends `more`'s rows below these (a weight quantized a block of rows at a
    /// time grows without a copy of the whole): the two must agree on bits, columns
    /// and group size.
    pub fn extend_rows(&mut self, more: &QuantizedTensor) -> Result<()> {
        if (more.bits, more.k, more.group_size) != (self.bits, self.k, self.group_size) {
            bail!(
                "cannot stack a {}-bit [{}, {}] weight in groups of {} with a {}-bit one of {} columns in groups of {}",
                more.bits,
                more.n,
                more.k,
                more.group_size,
                self.bits,
                self.k,
                self.group_size
            );
        }
        self.n += more.n;
        self.q.extend_from_slice(&more.q);
        self.zeros.extend_from_slice(&more.zeros);
        self.scales.extend_from_slice(&more.scales);
        Ok(())
    }

    /// Rows `range` (output features): column-parallel layers.
    pub fn slice_rows(&self, range: Range<usize>) -> Result<QuantizedTensor> {
        ensure!(
            range.start <= range.end && range.end <= self.n,
            "row slice {range:?} is outside the weight's {} rows",
            self.n
        );
        let gpr = self.groups_per_row();
        Ok(QuantizedTensor {
            bits: self.bits,
            group_size: self.group_size,
            n: range.len(),
            k: self.k,
            q: self.q[range.start * self.k..range.end * self.k].to_vec(),
            zeros: self.zeros[range.start * gpr..range.end * gpr].to_vec(),
            scales: self.scales[range.start * gpr..range.end * gpr].to_vec(),
        })
    }

    /// Columns `range` (input features): row-parallel layers. The range must start and end
    /// on quantization-group boundaries, except for a per-channel weight (`group_size == k`),
    /// whose slice is per channel again (`group_size` = the slice's width).
    pub fn slice_cols(&self, range: Range<usize>) -> Result<QuantizedTensor> {
        ensure!(
            range.start < range.end && range.end <= self.k,
            "column slice {range:?} is empty or outside the weight's {} columns",
            self.k
        );
        let gs = self.group_size;
        if gs == self.k {
            // Per channel: one scale and zero per row, whatever the columns.
            let mut q = Vec::with_capacity(self.n * range.len());
            for i in 0..self.n {
                q.extend_from_slice(&self.q[i * self.k + range.start..i * self.k + range.end]);
            }
            return Ok(QuantizedTensor {
                bits: self.bits,
                group_size: range.len(),
                n: self.n,
                k: range.len(),
                q,
                zeros: self.zeros.clone(),
                scales: self.scales.clone(),
            });
        }
        if !range.start.is_multiple_of(gs) || !range.end.is_multiple_of(gs) {
            bail!(
                "column slice {range:?} of a weight with k = {} would split a quantization group of {gs} \
                 input columns: this tensor-parallel degree cannot shard this quantized checkpoint \
                 (each rank's share of the input features must be a multiple of the group size)",
                self.k
            );
        }
        let gpr = self.groups_per_row();
        let (g0, g1) = (range.start / gs, range.end / gs);
        let mut q = Vec::with_capacity(self.n * range.len());
        let mut zeros = Vec::with_capacity(self.n * (g1 - g0));
        let mut scales = Vec::with_capacity(self.n * (g1 - g0));
        for i in 0..self.n {
            q.extend_from_slice(&self.q[i * self.k + range.start..i * self.k + range.end]);
            zeros.extend_from_slice(&self.zeros[i * gpr + g0..i * gpr + g1]);
            scales.extend_from_slice(&self.scales[i * gpr + g0..i * gpr + g1]);
        }
        Ok(QuantizedTensor {
            bits: self.bits,
            group_size: gs,
            n: self.n,
            k: range.len(),
            q,
            zeros,
            scales,
        })
    }

    /// Rows `order` (output features), in that order.
    pub fn select_rows(&self, order: &[usize]) -> QuantizedTensor {
        let gpr = self.groups_per_row();
        let mut t = QuantizedTensor {
            n: order.len(),
            q: Vec::with_capacity(order.len() * self.k),
            zeros: Vec::with_capacity(order.len() * gpr),
            scales: Vec::with_capacity(order.len() * gpr),
            ..*self
        };
        for &i in order {
            t.q.extend_from_slice(&self.q[i * self.k..(i + 1) * self.k]);
            t.zeros.extend_from_slice(&self.zeros[i * gpr..(i + 1) * gpr]);
            t.scales.extend_from_slice(&self.scales[i * gpr..(i + 1) * gpr]);
        }
        t
    }

    /// The columns of whole groups `groups` (ascending), side by side: a rank's share
    /// of an act-order weight, whose input features are scattered over the groups.
    pub fn select_groups(&self, groups: &[usize]) -> QuantizedTensor {
        let (gs, gpr) = (self.group_size, self.groups_per_row());
        let k = groups.len() * gs;
        let mut q = Vec::with_capacity(self.n * k);
        let mut zeros = Vec::with_capacity(self.n * groups.len());
        let mut scales = Vec::with_capacity(self.n * groups.len());
        for i in 0..self.n {
            for &g in groups {
                q.extend_from_slice(&self.q[i * self.k + g * gs..i * self.k + (g + 1) * gs]);
                zeros.push(self.zeros[i * gpr + g]);
                scales.push(self.scales[i * gpr + g]);
            }
        }
        QuantizedTensor {
            bits: self.bits,
            group_size: gs,
            n: self.n,
            k,
            q,
            zeros,
            scales,
        }
    }
}

/// The share of an act-order weight (`perm`: canonical column `p` reads input feature
/// `perm[p]`) that reads the input features `features`, the slice of the input a
/// row-parallel rank holds: the groups whose columns all read features in that range,
/// and their permutation relative to `features.start`. `None` when a group mixes
/// features inside and outside the range (the rank would need input it does not have).
pub fn act_order_share(
    t: &QuantizedTensor,
    perm: &[u32],
    features: Range<usize>,
) -> Option<(QuantizedTensor, Vec<u32>)> {
    let gs = t.group_size;
    let mut groups = Vec::new();
    for (g, cols) in perm.chunks_exact(gs).enumerate() {
        let inside = cols.iter().filter(|&&f| features.contains(&(f as usize))).count();
        match inside {
            0 => {}
            n if n == gs => groups.push(g),
            _ => return None,
        }
    }
    let local = groups
        .iter()
        .flat_map(|&g| &perm[g * gs..(g + 1) * gs])
        .map(|&f| f - features.start as u32)
        .collect();
    Some((t.select_groups(&groups), local))
}
