//! CPU tensors handed to `sirocco_kernels`, which work on slices: borrowing a
//! tensor's elements, and the element-wise steps the kernels do in one pass (candle's
//! ops elsewhere: on a GPU, or for activations that are not f32).

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use sirocco_kernels::elementwise::QkvShape;
use sirocco_kernels::Input;

/// A CPU tensor's elements (made contiguous first, and f32 if they are not a float
/// type the kernels read), borrowed: the kernels read them in place.
pub(crate) fn with_cpu_data<R>(t: &Tensor, f: impl FnOnce(Input<'_>) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let range = layout.start_offset()..layout.start_offset() + t.elem_count();
    Ok(match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => f(Input::F32(&v[range])),
        Storage::Cpu(CpuStorage::BF16(v)) => f(Input::BF16(&v[range])),
        Storage::Cpu(CpuStorage::F16(v)) => f(Input::F16(&v[range])),
        Storage::Cpu(_) => {
            drop(storage);
            let t = t.to_dtype(DType::F32)?;
            return with_cpu_data(&t, f);
        }
        _ => bail!("expected a CPU tensor, found one on {:?}", t.device()),
    })
}

/// The elements of f32 CPU tensors (each made contiguous first), borrowed together:
/// `None` where one of them is elsewhere or of another dtype, for candle's ops.
fn with_f32<const N: usize, R>(ts: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> R) -> Result<Option<R>> {
    if ts.iter().any(|t| !t.device().is_cpu() || t.dtype() != DType::F32) {
        return Ok(None);
    }
    let ts = ts.map(Tensor::contiguous);
    let ts: Vec<Tensor> = ts.into_iter().collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(Tensor::storage_and_layout).collect();
    let slices = std::array::from_fn(|i| match (&*guards[i].0, guards[i].1.start_offset()) {
        (Storage::Cpu(CpuStorage::F32(v)), at) => &v[at..at + ts[i].elem_count()],
        _ => unreachable!("checked above: an f32 CPU tensor"),
    });
    Ok(Some(f(slices)))
}

/// `silu(gate) · up` of a fused `[n, 2·i]` gate/up output, `[n, i]`: one pass on the
/// CPU, candle's ops elsewhere.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let (n, both) = gate_up.dims2()?;
    let i = both / 2;
    let out = with_f32([gate_up], |[x]| {
        let mut out = vec![0f32; n * i];
        sirocco_kernels::elementwise::swiglu(x, i, &mut out);
        out
    })?;
    match out {
        Some(out) => Ok(Tensor::from_vec(out, (n, i), &Device::Cpu)?),
        None => Ok((gate_up.narrow(1, 0, i)?.silu()? * gate_up.narrow(1, i, i)?)?),
    }
}

/// RMSNorm over the last dimension. On the CPU in f32 without candle's fork for one
/// row and its serial sum of squares; candle's op elsewhere.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let out = with_f32([x, weight], |[x, w]| {
        let mut out = vec![0f32; x.len()];
        sirocco_kernels::elementwise::rms_norm(x, w, eps, &mut out);
        out
    })?;
    match out {
        Some(out) => Ok(Tensor::from_vec(out, x.dims(), &Device::Cpu)?),
        None => Ok(candle_nn::ops::rms_norm(x, weight, eps)?),
    }
}

/// `x + delta` and its RMSNorm, `(sum, normed)`: a residual connection and the norm
/// after it in one pass on the CPU, candle's ops elsewhere.
pub fn add_rms_norm(x: &Tensor, delta: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    if x.dims() != delta.dims() {
        bail!("residual of shape {:?} added to {:?}", delta.dims(), x.dims());
    }
    let out = with_f32([x, delta, weight], |[x, d, w]| {
        let (mut sum, mut out) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        sirocco_kernels::elementwise::add_rms_norm(x, d, w, eps, &mut sum, &mut out);
        (sum, out)
    })?;
    match out {
        Some((sum, out)) => Ok((
            Tensor::from_vec(sum, x.dims(), &Device::Cpu)?,
            Tensor::from_vec(out, x.dims(), &Device::Cpu)?,
        )),
        None => {
            let sum = (x + delta)?;
            let out = candle_nn::ops::rms_norm(&sum, weight, eps)?;
            Ok((sum, out))
        }
    }
}

/// Splits the fused `[n, (nq + 2·nkv) · hd]` projection into q `[n, nq, hd]`, k and v
/// `[n, nkv, hd]`, q and k rotated by RoPE with `cos`/`sin` `[n, hd / 2]`: one pass
/// on the CPU, candle's copies and `rope_thd` elsewhere.
pub fn split_qkv_rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, shape: QkvShape) -> Result<(Tensor, Tensor, Tensor)> {
    let QkvShape {
        heads: nq,
        kv_heads: nkv,
        head_dim: hd,
    } = shape;
    let n = qkv.dim(0)?;
    let parts = with_f32([qkv, cos, sin], |[x, cos, sin]| {
        let (mut q, mut k, mut v) = (
            vec![0f32; n * nq * hd],
            vec![0f32; n * nkv * hd],
            vec![0f32; n * nkv * hd],
        );
        sirocco_kernels::elementwise::split_qkv_rope(x, shape, cos, sin, &mut q, &mut k, &mut v);
        (q, k, v)
    })?;
    if let Some((q, k, v)) = parts {
        return Ok((
            Tensor::from_vec(q, (n, nq, hd), &Device::Cpu)?,
            Tensor::from_vec(k, (n, nkv, hd), &Device::Cpu)?,
            Tensor::from_vec(v, (n, nkv, hd), &Device::Cpu)?,
        ));
    }
    let q = qkv.narrow(1, 0, nq * hd)?.reshape((1, n, nq, hd))?;
    let k = qkv.narrow(1, nq * hd, nkv * hd)?.reshape((1, n, nkv, hd))?;
    let v = qkv.narrow(1, (nq + nkv) * hd, nkv * hd)?.reshape((n, nkv, hd))?;
    let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.squeeze(0)?;
    let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?.squeeze(0)?;
    Ok((q, k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[usize], seed: usize) -> Result<Tensor> {
        let len: usize = dims.iter().product();
        let v: Vec<f32> = (0..len)
            .map(|i| (((i + seed) * 7919 % 2001) as f32 - 1000.0) * 1e-3)
            .collect();
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    #[test]
    fn the_cpu_passes_match_candles_ops() -> Result<()> {
        for n in [1, 5, 33] {
            let (x, w) = (tensor(&[n, 96], 1)?, tensor(&[96], 2)?);
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5)?;
            assert!(max_diff(&rms_norm(&x, &w, 1e-5)?, &want)? < 1e-5, "rms_norm, {n} rows");
            let d = tensor(&[n, 96], 7)?;
            let (sum, normed) = add_rms_norm(&x, &d, &w, 1e-5)?;
            let want_sum = (&x + &d)?;
            assert_eq!(max_diff(&sum, &want_sum)?, 0.0, "add_rms_norm sum, {n} rows");
            let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5)?;
            assert!(max_diff(&normed, &want)? < 1e-5, "add_rms_norm, {n} rows");

            let (nq, nkv, hd) = (4, 2, 16);
            let qkv = tensor(&[n, (nq + 2 * nkv) * hd], 3)?;
            let (cos, sin) = (tensor(&[n, hd / 2], 4)?.cos()?, tensor(&[n, hd / 2], 4)?.sin()?);
            let shape = QkvShape {
                heads: nq,
                kv_heads: nkv,
                head_dim: hd,
            };
            let (q, k, v) = split_qkv_rope(&qkv, &cos, &sin, shape)?;
            let wq = qkv.narrow(1, 0, nq * hd)?.reshape((1, n, nq, hd))?;
            let wk = qkv.narrow(1, nq * hd, nkv * hd)?.reshape((1, n, nkv, hd))?;
            let wq = candle_nn::rotary_emb::rope_thd(&wq, &cos, &sin)?.squeeze(0)?;
            let wk = candle_nn::rotary_emb::rope_thd(&wk, &cos, &sin)?.squeeze(0)?;
            let wv = qkv.narrow(1, (nq + nkv) * hd, nkv * hd)?.reshape((n, nkv, hd))?;
            assert!(max_diff(&q, &wq)? < 1e-6, "q, {n} rows");
            assert!(max_diff(&k, &wk)? < 1e-6, "k, {n} rows");
            assert_eq!(max_diff(&v, &wv)?, 0.0, "v, {n} rows");
        }
        Ok(())
    }
}
