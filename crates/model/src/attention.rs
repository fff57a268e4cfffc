//! Decode attention over the paged KV pool: one new query token per sequence, all
//! sequences of a step in one call, each reading its keys and values through its
//! block table ([`DecodeTables`]). Every slot a sequence holds is visible to its new
//! token (the rolling buffer holds exactly the window), so no mask is needed.
//!
//! The CPU version is `sirocco_kernels::attention` (f32 accumulation);
//! the CUDA version ([`cuda`]) is a kernel compiled by NVRTC at first use.

use crate::kv_cache::DecodeTables;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use sirocco_kernels::attention::DecodeAttention;
use sirocco_kernels::Input;

/// `q`: `[seqs, q_heads, head_dim]` (RoPE applied); pools: `[rows, kv_heads,
/// head_dim]`. Returns `[seqs, q_heads * head_dim]` in `q`'s dtype.
pub fn decode_attention(q: &Tensor, k_pool: &Tensor, v_pool: &Tensor, tables: &DecodeTables) -> Result<Tensor> {
    let (b, nq, hd) = q.dims3()?;
    let nkv = k_pool.dim(1)?;
    if b != tables.seqs.len() || nq % nkv != 0 || k_pool.dim(2)? != hd {
        bail!(
            "decode attention: q {:?} does not fit pool {:?}",
            q.dims(),
            k_pool.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::decode_attention(q, k_pool, v_pool, tables);
    }
    if k_pool.dtype() != v_pool.dtype() || k_pool.dims() != v_pool.dims() {
        bail!(
            "decode attention: key pool {:?} {:?} and value pool {:?} {:?} differ",
            k_pool.dtype(),
            k_pool.dims(),
            v_pool.dtype(),
            v_pool.dims()
        );
    }
    let out = cpu(q, k_pool, v_pool, tables)?;
    Ok(Tensor::from_vec(out, (b, nq * hd), q.device())?.to_dtype(q.dtype())?)
}

/// Attention of one prefill chunk on the CPU: queries `[t, q_heads, head_dim]` at
/// positions `start..start + t` over the cached `slots` (`(pool row, position)`,
/// from [`crate::kv_cache::KvCache::slots`]) and the chunk's own keys and values
/// `[t, kv_heads, head_dim]`, causal within `window`. Returns `[t, q_heads *
/// head_dim]` in `q`'s dtype.
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    slots: &[(u32, u32)],
    start: usize,
    window: usize,
) -> Result<Tensor> {
    let (t, nq, hd) = q.dims3()?;
    let nkv = k.dim(1)?;
    if k.dims() != [t, nkv, hd] || v.dims() != k.dims() || k_pool.dim(1)? != nkv || k_pool.dtype() != k.dtype() {
        bail!(
            "prefill attention: q {:?}, k {:?}, v {:?} do not fit pool {:?} {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            k_pool.dims(),
            k_pool.dtype()
        );
    }
    let qf = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let mut out = vec![0f32; qf.len()];
    with_pool(&k, |k_new| {
        with_pool(&v, |v_new| {
            with_pool(k_pool, |kp| {
                with_pool(v_pool, |vp| {
                    let a = sirocco_kernels::attention::PrefillAttention {
                        q: &qf,
                        k_new,
                        v_new,
                        k_pool: kp,
                        v_pool: vp,
                        cached: slots,
                        start,
                        window,
                        q_heads: nq,
                        kv_heads: nkv,
                        head_dim: hd,
                    };
                    sirocco_kernels::attention::prefill_attention(&a, &mut out);
                    Ok(())
                })
            })
        })
    })?;
    Ok(Tensor::from_vec(out, (t, nq * hd), q.device())?.to_dtype(q.dtype())?)
}

/// The pool (or keys) as the CPU kernels read them.
fn with_pool<R>(t: &Tensor, f: impl FnOnce(Input<'_>) -> Result<R>) -> Result<R> {
    if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        bail!("attention: unsupported KV dtype {:?}", t.dtype());
    }
    crate::cpu::with_cpu_data(t, f)?
}

fn cpu(q: &Tensor, k_pool: &Tensor, v_pool: &Tensor, t: &DecodeTables) -> Result<Vec<f32>> {
    let (_, nq, hd) = q.dims3()?;
    let q = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; q.len()];
    with_pool(k_pool, |k| {
        with_pool(v_pool, |v| {
            let a = DecodeAttention {
                q: &q,
                k,
                v,
                q_heads: nq,
                kv_heads: k_pool.dim(1)?,
                head_dim: hd,
                seqs: &t.seqs,
                tables: &t.tables,
                block_size: t.block_size,
            };
            sirocco_kernels::attention::decode_attention(&a, &mut out);
            Ok(())
        })
    })?;
    Ok(out)
}

/// The CUDA kernels: decode attention and the KV pool's row scatter, compiled from
/// C source by NVRTC once per process (no CUDA headers needed: 16-bit floats are
/// converted by hand).
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::Storage;
    use std::sync::OnceLock;

    const MODULE: &str = "sirocco_attention";

    const SRC: &str = r#"
struct bf16_t { unsigned short x; };
struct f16_t { unsigned short x; };
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16_t v) { return __uint_as_float(((unsigned int)v.x) << 16); }
__device__ __forceinline__ float to_f(f16_t v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x)); return f; }
__device__ __forceinline__ void from_f(float v, float* o) { *o = v; }
__device__ __forceinline__ void from_f(float v, bf16_t* o) {
  unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) { o->x = 0x7fc0; return; }
  u += 0x7fffu + ((u >> 16) & 1u);
  o->x = (unsigned short)(u >> 16);
}
__device__ __forceinline__ void from_f(float v, f16_t* o) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); o->x = h; }

#define NEG_INF (-__int_as_float(0x7f800000))
#define MAX_GROUP 8
#define MAX_PER_LANE 4
#define WARPS 8

// Grid: (seqs, kv_heads, ceil(group / MAX_GROUP)); block: WARPS warps. Each warp runs an
// online softmax over a strided share of the sequence's slots for up to MAX_GROUP query
// heads of one KV head (keys and values are read once for the whole group); the warps'
// partial results are merged at the end. Lane l holds head dims l, l+32, ...
template <typename T>
__device__ void decode_attention(const T* q, const T* kp, const T* vp, T* out, const unsigned int* meta,
                                 int nq, int nkv, int hd, int bs, float scale) {
  const int s = blockIdx.x, g = blockIdx.y;
  const int group = nq / nkv;
  const int h0 = blockIdx.z * MAX_GROUP;
  const int nh = min(MAX_GROUP, group - h0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned int off = meta[2 * s], held = meta[2 * s + 1];
  const unsigned int* table = meta + 2 * gridDim.x + off;
  const int row = nkv * hd;
  float qr[MAX_GROUP][MAX_PER_LANE], acc[MAX_GROUP][MAX_PER_LANE], m[MAX_GROUP], l[MAX_GROUP];
  for (int h = 0; h < MAX_GROUP; h++) {
    m[h] = NEG_INF; l[h] = 0.f;
    for (int i = 0; i < MAX_PER_LANE; i++) {
      int d = lane + 32 * i;
      int head = g * group + h0 + h;
      qr[h][i] = (h < nh && d < hd) ? to_f(q[((long)s * nq + head) * hd + d]) * scale : 0.f;
      acc[h][i] = 0.f;
    }
  }
  for (unsigned int j = warp; j < held; j += WARPS) {
    long r = (long)table[j / bs] * bs + j % bs;
    const T* kr = kp + r * row + g * hd;
    const T* vr = vp + r * row + g * hd;
    float kv[MAX_PER_LANE], vv[MAX_PER_LANE];
    for (int i = 0; i < MAX_PER_LANE; i++) {
      int d = lane + 32 * i;
      kv[i] = d < hd ? to_f(kr[d]) : 0.f;
      vv[i] = d < hd ? to_f(vr[d]) : 0.f;
    }
    for (int h = 0; h < MAX_GROUP; h++) {
      if (h >= nh) break;
      float dot = 0.f;
      for (int i = 0; i < MAX_PER_LANE; i++) dot += qr[h][i] * kv[i];
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      float mn = fmaxf(m[h], dot);
      float c = __expf(m[h] - mn), p = __expf(dot - mn);
      l[h] = l[h] * c + p;
      for (int i = 0; i < MAX_PER_LANE; i++) acc[h][i] = acc[h][i] * c + p * vv[i];
      m[h] = mn;
    }
  }
  __shared__ float sm[WARPS][MAX_GROUP], sl[WARPS][MAX_GROUP];
  __shared__ float sacc[WARPS][MAX_GROUP][32 * MAX_PER_LANE];
  for (int h = 0; h < nh; h++) {
    if (lane == 0) { sm[warp][h] = m[h]; sl[warp][h] = l[h]; }
    for (int i = 0; i < MAX_PER_LANE; i++) sacc[warp][h][lane + 32 * i] = acc[h][i];
  }
  __syncthreads();
  // Thread t merges head dims t, t + blockDim.x, ... of every head.
  for (int h = 0; h < nh; h++) {
    float mx = NEG_INF;
    for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm[w][h]);
    float sum = 0.f;
    for (int w = 0; w < WARPS; w++) sum += sm[w][h] == NEG_INF ? 0.f : sl[w][h] * __expf(sm[w][h] - mx);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      float a = 0.f;
      for (int w = 0; w < WARPS; w++)
        if (sm[w][h] != NEG_INF) a += sacc[w][h][d] * __expf(sm[w][h] - mx);
      int head = g * group + h0 + h;
      from_f(a / sum, &out[((long)s * nq + head) * hd + d]);
    }
  }
}

// Copies row i of src ([n, width]) to row rows[i] of pool.
template <typename T>
__device__ void scatter_rows(T* pool, const T* src, const unsigned int* rows, int n, int width) {
  for (int i = blockIdx.x; i < n; i += gridDim.x) {
    long to = (long)rows[i] * width, from = (long)i * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) pool[to + c] = src[from + c];
  }
}

#define INSTANCES(NAME, T) \
  extern "C" __global__ void decode_attention_##NAME(const T* q, const T* kp, const T* vp, T* out, \
      const unsigned int* meta, int nq, int nkv, int hd, int bs, float scale) { \
    decode_attention<T>(q, kp, vp, out, meta, nq, nkv, hd, bs, scale); } \
  extern "C" __global__ void scatter_rows_##NAME(T* pool, const T* src, const unsigned int* rows, int n, int width) { \
    scatter_rows<T>(pool, src, rows, n, width); }
INSTANCES(f32, float)
INSTANCES(bf16, bf16_t)
INSTANCES(f16, f16_t)
"#;

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

    pub fn decode_attention(q: &Tensor, k_pool: &Tensor, v_pool: &Tensor, t: &DecodeTables) -> Result<Tensor> {
        let (b, nq, hd) = q.dims3()?;
        let nkv = k_pool.dim(1)?;
        let group = nq / nkv;
        if hd > 32 * MAX_PER_LANE {
            bail!("CUDA attention supports head_dim up to {}", 32 * MAX_PER_LANE);
        }
        let dtype = k_pool.dtype();
        let q = q.to_dtype(dtype)?.contiguous()?;
        let meta = match &t.device_meta {
            Some(m) => m.clone(),
            None => Tensor::new(t.meta().as_slice(), q.device())?,
        };
        let out = Tensor::zeros((b, nq, hd), dtype, q.device())?;
        let dev = q.device().as_cuda_device()?;
        let func = dev.get_or_load_custom_func(&format!("decode_attention_{}", suffix(dtype)?), MODULE, ptx()?)?;
        let cfg = LaunchConfig {
            grid_dim: (b as u32, nkv as u32, group.div_ceil(MAX_GROUP) as u32),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (nq_i, nkv_i, hd_i, bs_i) = (nq as i32, nkv as i32, hd as i32, t.block_size as i32);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvCache, KvCacheConfig};
    use candle_core::Device;

    /// Softmax(q·kᵀ/√d)·v over explicit rows, head by head.
    fn naive(q: &[f32], keys: &[Vec<f32>], vals: &[Vec<f32>], hd: usize) -> Vec<f32> {
        let scores: Vec<f32> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt())
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        (0..hd)
            .map(|d| e.iter().zip(vals).map(|(p, v)| p * v[d]).sum::<f32>() / sum)
            .collect()
    }

    #[test]
    fn decode_attention_matches_a_naive_one_through_rolling_block_tables() {
        // Sequences of different lengths, some past the window, interleaved; head
        // sizes below and above the kernel's vector width; one sequence alone (a
        // task per KV head) and several (a task per sequence).
        let many = [(1u64, 3usize), (2, 12), (3, 1), (4, 7)];
        for (hd, lens) in [(5, &many[..]), (37, &many[..]), (37, &many[1..2]), (128, &many[..])] {
            check(2, 3, hd, lens);
        }
    }

    fn check(nkv: usize, group: usize, hd: usize, lens: &[(u64, usize)]) {
        let window = 7;
        let nq = nkv * group;
        let mut cache = KvCache::new(KvCacheConfig {
            layers: 1,
            kv_heads: nkv,
            head_dim: hd,
            dtype: DType::F32,
            device: Device::Cpu,
            block_size: 3,
            positions_per_seq: window,
            max_context: 100,
            capacity_tokens: 1000,
        })
        .unwrap();
        let val = |seq: u64, p: usize, h: usize, d: usize, kind: f32| {
            ((seq as f32 + 1.0) * 0.37 + p as f32 * 0.11 + h as f32 * 0.7 + d as f32 * 0.05 + kind).sin()
        };
        let max_len = lens.iter().map(|l| l.1).max().unwrap();
        for p in 0..max_len {
            for &(seq, len) in lens {
                if p + 1 >= len {
                    continue;
                }
                cache.reserve(seq, 1).unwrap();
                let mk = |kind: f32| {
                    let data: Vec<f32> = (0..nkv * hd).map(|i| val(seq, p, i / hd, i % hd, kind)).collect();
                    Tensor::from_vec(data, (1, nkv, hd), &Device::Cpu).unwrap()
                };
                cache.write(seq, 0, &mk(0.0), &mk(1.0)).unwrap();
                cache.advance(seq, 1);
            }
        }
        // Every sequence's last token: written first, then attended.
        let seqs: Vec<u64> = lens.iter().map(|l| l.0).collect();
        for &s in &seqs {
            cache.reserve(s, 1).unwrap();
        }
        let rows = cache.decode_rows(&seqs).unwrap();
        let last = |kind: f32| {
            let data: Vec<f32> = lens
                .iter()
                .flat_map(|&(seq, len)| (0..nkv * hd).map(move |i| val(seq, len - 1, i / hd, i % hd, kind)))
                .collect();
            Tensor::from_vec(data, (seqs.len(), nkv, hd), &Device::Cpu).unwrap()
        };
        cache.write_rows_of(0, &rows, None, &last(0.0), &last(1.0)).unwrap();
        let qdata: Vec<f32> = (0..seqs.len() * nq * hd).map(|i| (i as f32 * 0.3).cos()).collect();
        let q = Tensor::from_vec(qdata.clone(), (seqs.len(), nq, hd), &Device::Cpu).unwrap();
        let tables = cache.decode_tables(&seqs).unwrap();
        let (kp, vp) = cache.pool(0);
        let got = decode_attention(&q, kp, vp, &tables).unwrap().to_vec2::<f32>().unwrap();
        for (b, &(seq, len)) in lens.iter().enumerate() {
            // The window's positions, whatever slots they landed in.
            let visible = len.saturating_sub(window)..len;
            for h in 0..nq {
                let g = h / group;
                let keys: Vec<Vec<f32>> = visible
                    .clone()
                    .map(|p| (0..hd).map(|d| val(seq, p, g, d, 0.0)).collect())
                    .collect();
                let vals: Vec<Vec<f32>> = visible
                    .clone()
                    .map(|p| (0..hd).map(|d| val(seq, p, g, d, 1.0)).collect())
                    .collect();
                let want = naive(&qdata[(b * nq + h) * hd..][..hd], &keys, &vals, hd);
                for d in 0..hd {
                    let x = got[b][h * hd + d];
                    assert!(
                        (x - want[d]).abs() < 1e-5,
                        "seq {seq} head {h} dim {d}: {x} vs {}",
                        want[d]
                    );
                }
            }
        }
    }
}
