//! Host-side tensor plumbing shared by the collective implementations: every
//! implementation moves data as flat f32 on the CPU and converts back to the caller's
//! dtype and device, so all of them produce the same bits for the same inputs.

use crate::Result;
use candle_core::{DType, Device, Tensor};

/// Flattens `t` to f32 on the host, returning the data and the original dims.
pub(crate) fn to_host(t: &Tensor) -> Result<(Vec<f32>, Vec<usize>)> {
    let dims = t.dims().to_vec();
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((data, dims))
}

/// Rebuilds a tensor of `dims` from host f32 data, in `dtype` on `device`.
pub(crate) fn from_host(data: Vec<f32>, dims: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, dims, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// Shape of an all-gather result: dim 0 grows `world` times; a scalar becomes `[world]`.
pub(crate) fn gathered_dims(dims: &[usize], world: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    match out.first_mut() {
        Some(d0) => *d0 *= world,
        None => out.push(world),
    }
    out
}
