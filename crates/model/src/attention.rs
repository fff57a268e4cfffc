//! Decode attention over the paged KV pool: one new query token per sequence, all
//! sequences of a step in one call, each reading its keys and values through its
//! block table ([`DecodeTables`]). Every slot a sequence holds is visible to its new
//! token (the rolling buffer holds exactly the window), so no mask is needed.
//!
//! The CPU version is `sirocco_kernels::attention` (f32 accumulation);
//! the CUDA version ([`crate::cuda`]) is a kernel compiled by NVRTC at first use.

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
        let meta = match &tables.device_meta {
            Some(m) => m.clone(),
            None => Tensor::new(tables.meta().as_slice(), q.device())?,
        };
        return crate::cuda::decode_attention(q, k_pool, v_pool, &meta, tables.block_size);
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
                cache.advance(seq, &[0]);
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
