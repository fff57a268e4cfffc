//! The CUDA kernels: decode attention over the paged KV pool and the pool's row
//! scatter, compiled from their C source (`cuda.cu`) by NVRTC once per
//! process (no CUDA headers needed: 16-bit floats are converted by hand). Only
//! candle below: [`crate::attention`] and [`crate::kv_cache`] call in.

use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::Storage;
use candle_core::{DType, Tensor};
use std::sync::OnceLock;

const MODULE: &str = "sirocco_attention";

/// The kernels' C source (`cuda.cu`, beside this file).
const SRC: &str = include_str!("cuda.cu");

/// Limits the kernel's register arrays impose.
const MAX_PER_LANE: usize = 4;
const MAX_GROUP: usize = 8;
const WARPS: u32 = 8;

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SRC)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile the attention kernels: {e:?}"))
    })
    .as_deref()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("CUDA attention: unsupported dtype {d:?}"),
    })
}

/// Decode attention of `q` (`[seqs, q_heads, head_dim]`) over the pools through the
/// block tables in `meta` (`DecodeTables::meta`, on the GPU) of `block_size`-slot
/// blocks; `[seqs, q_heads * head_dim]` in the pools' dtype.
pub fn decode_attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    meta: &Tensor,
    block_size: usize,
) -> Result<Tensor> {
    let (b, nq, hd) = q.dims3()?;
    let nkv = k_pool.dim(1)?;
    let group = nq / nkv;
    if hd > 32 * MAX_PER_LANE {
        bail!("CUDA attention supports head_dim up to {}", 32 * MAX_PER_LANE);
    }
    let dtype = k_pool.dtype();
    let q = q.to_dtype(dtype)?.contiguous()?;
    let out = Tensor::zeros((b, nq, hd), dtype, q.device())?;
    let dev = q.device().as_cuda_device()?;
    let func = dev.get_or_load_custom_func(&format!("decode_attention_{}", suffix(dtype)?), MODULE, ptx()?)?;
    let cfg = LaunchConfig {
        grid_dim: (b as u32, nkv as u32, group.div_ceil(MAX_GROUP) as u32),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (nq_i, nkv_i, hd_i, bs_i) = (nq as i32, nkv as i32, hd as i32, block_size as i32);
    let scale = 1.0f32 / (hd as f32).sqrt();
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k_pool.storage_and_layout();
        let (vs, vl) = v_pool.storage_and_layout();
        let (ms, ml) = meta.storage_and_layout();
        let (os, ol) = out.storage_and_layout();
        let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs), Storage::Cuda(ms), Storage::Cuda(os)) =
            (&*qs, &*ks, &*vs, &*ms, &*os)
        else {
            bail!("CUDA attention: tensors are not on the GPU")
        };
        let span = |l: &candle_core::Layout| {
            l.contiguous_offsets()
                .ok_or_else(|| anyhow::anyhow!("CUDA attention: inputs must be contiguous"))
        };
        let (qa, kb, vb, mb, ob) = (span(ql)?, span(kl)?, span(vl)?, span(ml)?, span(ol)?);
        let meta_s = ms.as_cuda_slice::<u32>()?.slice(mb.0..mb.1);
        let mut builder = func.builder();
        macro_rules! launch {
            ($t:ty) => {{
                let (qq, kk, vv, oo) = (
                    qs.as_cuda_slice::<$t>()?.slice(qa.0..qa.1),
                    ks.as_cuda_slice::<$t>()?.slice(kb.0..kb.1),
                    vs.as_cuda_slice::<$t>()?.slice(vb.0..vb.1),
                    os.as_cuda_slice::<$t>()?.slice(ob.0..ob.1),
                );
                builder.arg(&qq).arg(&kk).arg(&vv).arg(&oo).arg(&meta_s);
                builder.arg(&nq_i).arg(&nkv_i).arg(&hd_i).arg(&bs_i).arg(&scale);
                // SAFETY: the kernel reads q/pools/meta within the bounds the tables
                // give (built from this cache's own block tables) and writes every
                // element of `out` exactly once.
                unsafe { builder.launch(cfg) }.map_err(|e| anyhow::anyhow!("decode attention launch: {e:?}"))?;
            }};
        }
        match dtype {
            DType::F32 => launch!(f32),
            DType::BF16 => launch!(half::bf16),
            DType::F16 => launch!(half::f16),
            _ => unreachable!("checked by suffix()"),
        }
    }
    Ok(out.reshape((b, nq * hd))?)
}

/// Copies row `i` of `src` (`[n, kv_heads, head_dim]`) into row `rows[i]` of `pool`,
/// in place.
pub fn scatter_rows(pool: &Tensor, rows: &Tensor, src: &Tensor) -> Result<()> {
    let n = src.dim(0)?;
    let width = src.elem_count() / n.max(1);
    let dtype = pool.dtype();
    let src = src.to_dtype(dtype)?.contiguous()?;
    let dev = pool.device().as_cuda_device()?;
    let func = dev.get_or_load_custom_func(&format!("scatter_rows_{}", suffix(dtype)?), MODULE, ptx()?)?;
    let cfg = LaunchConfig {
        grid_dim: (n.min(65535) as u32, 1, 1),
        block_dim: (width.clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_i, w_i) = (n as i32, width as i32);
    let (ps, pl) = pool.storage_and_layout();
    let (ss, sl) = src.storage_and_layout();
    let (rs, rl) = rows.storage_and_layout();
    let (Storage::Cuda(ps), Storage::Cuda(ss), Storage::Cuda(rs)) = (&*ps, &*ss, &*rs) else {
        bail!("KV scatter: tensors are not on the GPU")
    };
    let span = |l: &candle_core::Layout| {
        l.contiguous_offsets()
            .ok_or_else(|| anyhow::anyhow!("KV scatter: inputs must be contiguous"))
    };
    let (pa, sa, ra) = (span(pl)?, span(sl)?, span(rl)?);
    let rows_s = rs.as_cuda_slice::<u32>()?.slice(ra.0..ra.1);
    let mut builder = func.builder();
    macro_rules! launch {
        ($t:ty) => {{
            let pool_v = ps.as_cuda_slice::<$t>()?.slice(pa.0..pa.1);
            let src_v = ss.as_cuda_slice::<$t>()?.slice(sa.0..sa.1);
            builder.arg(&pool_v).arg(&src_v).arg(&rows_s);
            builder.arg(&n_i).arg(&w_i);
            // SAFETY: rows come from this cache's block tables, all inside the pool;
            // the pool is written in place, as the KV cache owns it and every step
            // runs on the pool's one stream.
            unsafe { builder.launch(cfg) }.map_err(|e| anyhow::anyhow!("KV scatter launch: {e:?}"))?;
        }};
    }
    match dtype {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(half::bf16),
        DType::F16 => launch!(half::f16),
        _ => unreachable!("checked by suffix()"),
    }
    Ok(())
}
