//! CPU tensors handed to `sirocco_kernels`, which work on slices: borrowing a
//! tensor's elements, and the element-wise steps the kernels do in one pass.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
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

/// `silu(gate) · up` of a fused `[n, 2·i]` gate/up output, `[n, i]`: one pass on the
/// CPU, candle's ops elsewhere.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let (n, both) = gate_up.dims2()?;
    let i = both / 2;
    if !gate_up.device().is_cpu() || gate_up.dtype() != DType::F32 {
        return Ok((gate_up.narrow(1, 0, i)?.silu()? * gate_up.narrow(1, i, i)?)?);
    }
    let mut out = vec![0f32; n * i];
    with_cpu_data(gate_up, |x| match x {
        Input::F32(x) => sirocco_kernels::elementwise::swiglu(x, i, &mut out),
        _ => unreachable!("an f32 tensor"),
    })?;
    Ok(Tensor::from_vec(out, (n, i), &Device::Cpu)?)
}
