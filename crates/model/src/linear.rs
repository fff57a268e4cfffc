//! The model's linear layers, `y = x · Wᵀ` with W in Hugging Face `[out, in]`
//! layout.
//!
//! On the CPU the weight is packed once at load into [`sirocco_kernels`]' layout and
//! the candle tensor is dropped, so the weights take their size once; the matmul runs
//! through the crate's kernels. On other devices (CUDA) the tensor stays and candle
//! multiplies it.

use crate::cpu::with_cpu_data;
use anyhow::{bail, ensure, Result};
use candle_core::{Device, Tensor};
use sirocco_kernels::{Input, PackedMatrix, WeightData};

/// Float weights quantized as they load (`--quantize`), round-to-nearest, for users
/// without a pre-quantized checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quantize {
    /// 8-bit, symmetric, per group of input columns.
    Int8,
    /// 4-bit, symmetric, per group of input columns.
    Int4,
}

impl Quantize {
    pub fn name(self) -> &'static str {
        match self {
            Quantize::Int8 => "int8",
            Quantize::Int4 => "int4",
        }
    }
}

impl std::str::FromStr for Quantize {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "int8" => Ok(Quantize::Int8),
            "int4" => Ok(Quantize::Int4),
            _ => bail!("unknown quantization {s:?}: use int8 or int4"),
        }
    }
}

/// One linear layer's weight, `[out_features, in_features]`.
pub struct Linear {
    inner: Inner,
    /// GPTQ act order: the weight's column `p` multiplies input feature `perm[p]`,
    /// so the input is gathered into that order first.
    input_perm: Option<Tensor>,
}

enum Inner {
    /// CPU: the packed weight.
    Packed(PackedMatrix),
    Tensor(Tensor),
    /// Parts side by side (see [`Linear::stack`]).
    Stack(Vec<Linear>),
}

impl Linear {
    /// Takes ownership of a `[n, k]` weight: on the CPU it is packed and dropped.
    pub fn new(w: Tensor) -> Result<Self> {
        if !w.device().is_cpu() {
            return Ok(Linear {
                inner: Inner::Tensor(w),
                input_perm: None,
            });
        }
        let (n, k) = w.dims2()?;
        let packed = with_cpu_data(&w, |data| match data {
            Input::F32(d) => PackedMatrix::new(WeightData::F32(d), n, k),
            Input::BF16(d) => PackedMatrix::new(WeightData::BF16(d), n, k),
            Input::F16(d) => PackedMatrix::new(WeightData::F16(d), n, k),
        })?;
        Ok(Linear {
            inner: Inner::Packed(packed),
            input_perm: None,
        })
    }

    /// A quantized weight, packed for the CPU kernels (which unpack it in registers).
    ///
    /// `bf16_compute`: the model runs in bf16 (`--dtype bf16`), so that the weight may
    /// multiply as bf16 where that is faster (batches and prefill on CPUs with AMX,
    /// see [`PackedMatrix::with_bf16_compute`]); otherwise it computes exactly in f32.
    pub fn quantized(w: &crate::quantized::QuantizedTensor, bf16_compute: bool) -> Result<Self> {
        let data = WeightData::Quantized {
            bits: w.bits,
            group_size: w.group_size,
            q: &w.q,
            zeros: &w.zeros,
            scales: &w.scales,
        };
        let packed = PackedMatrix::try_new(data, w.n, w.k)?.with_bf16_compute(bf16_compute);
        Ok(Linear {
            inner: Inner::Packed(packed),
            input_perm: None,
        })
    }

    /// Bytes one matmul reads: the weight as stored, with any quantization scales
    /// and zeros.
    pub fn bytes(&self) -> usize {
        match &self.inner {
            Inner::Packed(w) => w.storage_bytes(),
            Inner::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Inner::Stack(parts) => parts.iter().map(Linear::bytes).sum(),
        }
    }

    /// Elements of the weight.
    pub fn elem_count(&self) -> usize {
        match &self.inner {
            Inner::Packed(w) => w.elem_count(),
            Inner::Tensor(t) => t.elem_count(),
            Inner::Stack(parts) => parts.iter().map(Linear::elem_count).sum(),
        }
    }

    /// One layer whose outputs are `parts`' outputs side by side, for weights that
    /// share an input but cannot be packed as one (act-order parts whose column
    /// orders differ).
    pub fn stack(parts: Vec<Linear>) -> Linear {
        Linear {
            inner: Inner::Stack(parts),
            input_perm: None,
        }
    }

    /// The same layer with its weight's columns in act order: column `p` multiplies
    /// input feature `perm[p]` (a permutation of `0..in_features`).
    pub fn with_input_permutation(mut self, perm: Vec<u32>) -> Result<Self> {
        let k = match &self.inner {
            Inner::Packed(w) => w.k(),
            Inner::Tensor(t) => t.dim(1)?,
            Inner::Stack(_) => bail!("an input permutation applies to each stacked part"),
        };
        let mut seen = vec![false; k];
        for &f in &perm {
            ensure!(
                (f as usize) < k && !std::mem::replace(&mut seen[f as usize], true),
                "input permutation of {} entries is not a permutation of 0..{k}",
                perm.len()
            );
        }
        ensure!(
            perm.len() == k,
            "input permutation of {} entries for {k} inputs",
            perm.len()
        );
        self.input_perm = Some(Tensor::from_vec(perm, k, &Device::Cpu)?);
        Ok(self)
    }

    /// `x · Wᵀ` for `x` of shape `[..., in_features]`: in f32 on the CPU (see
    /// `Mistral`'s activation dtype), in the weight's dtype elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gathered;
        let x = match &self.input_perm {
            Some(p) => {
                gathered = x.index_select(&p.to_device(x.device())?, x.rank() - 1)?;
                &gathered
            }
            None => x,
        };
        let w = match &self.inner {
            Inner::Tensor(w) => return Ok(x.broadcast_matmul(&w.t()?)?),
            Inner::Packed(w) => w,
            Inner::Stack(parts) => {
                let outs = parts.iter().map(|p| p.forward(x)).collect::<Result<Vec<_>>>()?;
                return Ok(Tensor::cat(&outs, x.rank() - 1)?);
            }
        };
        let (n, k) = (w.n(), w.k());
        let mut shape = x.dims().to_vec();
        match shape.last_mut() {
            Some(last) if *last == k => *last = n,
            _ => bail!(
                "linear layer with {k} inputs applied to a tensor of shape {:?}",
                x.dims()
            ),
        }
        let m = x.elem_count() / k.max(1);
        let out = with_cpu_data(x, |input| sirocco_kernels::matmul_to_vec(input, m, w))?;
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
    }

    /// Rows `ids` of the weight, `[ids.len(), in_features]` (f32 on the CPU, as
    /// [`Linear::forward`]): the
    /// embedding lookup when the lm_head is tied to the embedding, so that the one
    /// packed copy serves both.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let w = match &self.inner {
            Inner::Tensor(w) => return Ok(w.index_select(&Tensor::new(ids, w.device())?, 0)?),
            Inner::Packed(w) => w,
            Inner::Stack(_) => bail!("row lookups of stacked weights"),
        };
        let k = w.k();
        let mut out = vec![0f32; ids.len() * k];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
            if id as usize >= w.n() {
                bail!("row {id} of a weight with {} rows", w.n());
            }
            w.row_f32(id as usize, row);
        }
        Ok(Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// Act order: weights whose columns are permuted (each its own way), stacked,
    /// compute what the unpermuted floats do.
    #[test]
    fn permuted_and_stacked_weights_compute_their_floats() -> Result<()> {
        use crate::quantized::QuantizedTensor;
        let (m, k) = (3, 64);
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let mut floats = Vec::new();
        let mut parts = Vec::new();
        for (n, stride) in [(40usize, 7usize), (24, 13)] {
            // perm[p] = p·stride mod k: a permutation (stride coprime with 64).
            let perm: Vec<u32> = (0..k).map(|p| (p * stride % k) as u32).collect();
            let w: Vec<f32> = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?
                .flatten_all()?
                .to_vec1()?;
            let q = QuantizedTensor::quantize_rtn(&w, n, k, 8, 16, true);
            // The float weight in input-feature order: column perm[p] is q's column p.
            let d = q.dequantize();
            let mut f = vec![0f32; n * k];
            for i in 0..n {
                for p in 0..k {
                    f[i * k + perm[p] as usize] = d[i * k + p];
                }
            }
            floats.push(Tensor::from_vec(f, (n, k), &Device::Cpu)?);
            parts.push(Linear::quantized(&q, false)?.with_input_permutation(perm)?);
        }
        let lin = Linear::stack(parts);
        let want = Linear::new(Tensor::cat(&floats, 0)?)?.forward(&x)?;
        let got = lin.forward(&x)?;
        assert_eq!(got.dims(), &[m, 64]);
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= 1e-5 * scale, "err {err} at scale {scale}");
        let bad = Linear::quantized(&QuantizedTensor::quantize_rtn(&[0.0; 8], 2, 4, 8, 4, true), false)?;
        assert!(bad.with_input_permutation(vec![0, 1, 1, 3]).is_err());
        Ok(())
    }

    #[test]
    fn a_quantized_weight_multiplies_as_its_dequantized_floats() -> Result<()> {
        use crate::quantized::QuantizedTensor;
        let (m, n, k) = (3, 45, 96);
        let w: Vec<f32> = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        for (bits, group, symmetric) in [(8, 32, true), (4, 32, false), (4, 96, true)] {
            let q = QuantizedTensor::quantize_rtn(&w, n, k, bits, group, symmetric);
            let lin = Linear::quantized(&q, false)?;
            let float = Linear::new(Tensor::from_vec(q.dequantize(), (n, k), &Device::Cpu)?)?;
            let (got, want) = (lin.forward(&x)?, float.forward(&x)?);
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err <= 1e-4 * scale,
                "{bits}-bit groups of {group}: err {err} at scale {scale}"
            );
            // What a matmul reads: a byte (or half of one) per weight, and the scales.
            assert!(lin.bytes() < n * k * 2, "{} bytes", lin.bytes());
        }
        Ok(())
    }

    #[test]
    fn matches_candle_matmul_in_every_dtype() -> Result<()> {
        let (m, n, k) = (5, 37, 29);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (1, m, k), &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (w, x) = (w.to_dtype(dtype)?, x.to_dtype(dtype)?);
            let want = x.broadcast_matmul(&w.t()?)?.to_dtype(DType::F32)?;
            let lin = Linear::new(w.clone())?;
            assert_eq!(lin.elem_count(), n * k);
            let got = lin.forward(&x)?;
            assert_eq!(got.dims(), &[1, m, n]);
            // The CPU computes activations in f32 whatever the weights' dtype.
            assert_eq!(got.dtype(), DType::F32);
            let err = (got.to_dtype(DType::F32)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            // Half-precision activations are rounded to 8 (bf16) or 11 (f16) bits.
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(err <= tol * scale, "{dtype:?}: max abs err {err} at scale {scale}");

            let rows = lin.rows(&[3, 0, 36])?;
            let want = w.index_select(&Tensor::new(&[3u32, 0, 36], &Device::Cpu)?, 0)?;
            assert_eq!(
                rows.to_dtype(DType::F32)?.to_vec2::<f32>()?,
                want.to_dtype(DType::F32)?.to_vec2::<f32>()?
            );
        }
        Ok(())
    }
}
