//! Attention on the CPU. Decode (here): one new query token per sequence over the keys and
//! values that sequence holds in a paged pool, read through its block table. Each
//! sequence (or, when there are few, each range of a sequence's slots, merged after)
//! is a task over [`crate::parallel`] that reads its key and value rows whole, once
//! for all query heads.
//!
//! The loops are written over 16-lane arrays so that the compiler turns them into
//! AVX-512 where the CPU has it (a copy compiled for it is chosen at run time) and
//! into SSE elsewhere; sums are f32, in a different order than a sequential loop.
//!
//! Beside it: prefill attention (`prefill`), the AVX-512 decode for head sizes that
//! are a multiple of 16 (`x86`), and what the three share (`common`).

mod common;
mod prefill;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use prefill::{prefill_attention, PrefillAttention};

use crate::elementwise::exp_nonpositive;
#[cfg(target_arch = "x86_64")]
use crate::isa::avx512;
use crate::operands::Input;
use crate::parallel::for_each_chunk_mut;
use common::{prefetch, Elem, Heads};
use std::cell::RefCell;

/// One step's decode attention: queries, pools and block tables.
#[derive(Clone, Copy)]
pub struct DecodeAttention<'a> {
    /// `[seqs, q_heads, head_dim]`, RoPE applied.
    pub q: &'a [f32],
    /// The key and value pools, `[rows, kv_heads, head_dim]`, in the cache's dtype.
    pub k: Input<'a>,
    pub v: Input<'a>,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Per sequence `(offset into tables, slots held)`: slot `j` of a sequence is
    /// pool row `tables[offset + j / block_size] * block_size + j % block_size`.
    pub seqs: &'a [(u32, u32)],
    pub tables: &'a [u32],
    pub block_size: usize,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Pool offsets of a task's slots, worked out once for keys and values.
    static ROWS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// `out` (`[seqs, q_heads * head_dim]`) = softmax(q·kᵀ / √head_dim)·v for every
/// sequence over every slot it holds (a rolling window holds exactly the visible
/// keys, so there is no mask).
///
/// Panics if the shapes disagree or the pools differ in dtype.
pub fn decode_attention(a: &DecodeAttention<'_>, out: &mut [f32]) {
    let (nq, nkv, hd) = (a.q_heads, a.kv_heads, a.head_dim);
    assert!(nkv > 0 && nq % nkv == 0, "{nq} query heads over {nkv} KV heads");
    assert_eq!(a.q.len(), a.seqs.len() * nq * hd, "q is not [seqs, q_heads, head_dim]");
    assert_eq!(out.len(), a.q.len(), "out is not [seqs, q_heads * head_dim]");
    assert_eq!(a.k.len(), a.v.len(), "key and value pools differ in size");
    let group = nq / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    if out.is_empty() {
        return;
    }
    // A task per sequence reads its pool rows whole and in order. With fewer
    // sequences than would keep the threads busy, each sequence's slots are split
    // into ranges (still whole rows, in order) whose partial softmaxes are merged
    // after: splitting by KV head instead would read every row in strided pieces,
    // which the hardware prefetchers do not follow.
    let threads = rayon::current_num_threads();
    let longest = a.seqs.iter().map(|s| s.1 as usize).max().unwrap_or(0);
    let pieces = if a.seqs.len() >= 2 * threads {
        1
    } else {
        (4 * threads)
            .div_ceil(a.seqs.len())
            .min(longest.div_ceil(MIN_PIECE))
            .max(1)
    };
    let task = |s: usize, piece: usize, out: &mut [f32], stats: Option<&mut [f32]>| {
        let (off, held) = (a.seqs[s].0 as usize, a.seqs[s].1 as usize);
        let range = held * piece / pieces..held * (piece + 1) / pieces;
        let job = Heads {
            q: &a.q[s * nq * hd..][..nq * hd],
            tables: &a.tables[off..off + held.div_ceil(a.block_size)],
            block_size: a.block_size,
            from: range.start,
            held: range.len(),
            heads: nkv,
            hd,
            group,
            scale,
        };
        SCORES.with(|sc| {
            let mut sc = sc.borrow_mut();
            let len = nq * range.len();
            if sc.len() < len {
                sc.resize(len, 0.0);
            }
            let sc = &mut sc[..len];
            match (a.k, a.v) {
                (Input::F32(k), Input::F32(v)) => job.run(k, v, sc, out, stats),
                (Input::BF16(k), Input::BF16(v)) => job.run(k, v, sc, out, stats),
                (Input::F16(k), Input::F16(v)) => job.run(k, v, sc, out, stats),
                _ => panic!("key and value pools differ in dtype"),
            }
        })
    };
    if pieces == 1 {
        return for_each_chunk_mut(out, nq * hd, |s, out| task(s, 0, out, None));
    }
    // Per (sequence, piece): its normalised output, then (max, sum) per query head.
    let each = nq * hd + 2 * nq;
    let mut partial = vec![0f32; a.seqs.len() * pieces * each];
    for_each_chunk_mut(&mut partial, each, |i, p| {
        let (o, stats) = p.split_at_mut(nq * hd);
        task(i / pieces, i % pieces, o, Some(stats))
    });
    for (s, out) in out.chunks_exact_mut(nq * hd).enumerate() {
        let parts = &partial[s * pieces * each..][..pieces * each];
        for (h, out) in out.chunks_exact_mut(hd).enumerate() {
            let stat = |p: usize| (parts[p * each + nq * hd + 2 * h], parts[p * each + nq * hd + 2 * h + 1]);
            // An empty piece (sum 0) has no keys and no max: left out, or its 0 could
            // stand for the max and underflow the others' weights.
            let full = || (0..pieces).map(stat).filter(|&(_, l)| l > 0.0);
            let max = full().map(|(m, _)| m).fold(f32::NEG_INFINITY, f32::max);
            out.fill(0.0);
            let mut total = 0.0;
            for p in 0..pieces {
                let (m, l) = stat(p);
                if l == 0.0 {
                    continue;
                }
                let w = l * (m - max).exp();
                total += w;
                axpy(w, &parts[p * each + h * hd..][..hd], out);
            }
            if total > 0.0 {
                let inv = 1.0 / total;
                out.iter_mut().for_each(|x| *x *= inv);
            }
        }
    }
}

/// The fewest slots worth a task of their own.
const MIN_PIECE: usize = 32;

impl Heads<'_> {
    /// Normalised outputs into `out`, and with `stats` each query head's score max
    /// and sum of weights (for merging with other ranges of the same sequence).
    fn run<T: Elem>(&self, k: &[T], v: &[T], scores: &mut [f32], out: &mut [f32], stats: Option<&mut [f32]>) {
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            if self.hd.is_multiple_of(16) {
                return ROWS.with(|rows| {
                    let mut rows = rows.borrow_mut();
                    rows.clear();
                    rows.extend((0..self.held).map(|j| self.slot(j)));
                    let end = rows.iter().max().map_or(0, |&r| r + self.heads * self.hd);
                    assert!(end <= k.len().min(v.len()), "a block table points past the pool");
                    // SAFETY: the CPU has the features, hd is a multiple of 16, and
                    // every slot's row is inside the pools (the tables index them).
                    unsafe { self.run_blocks(k, v, &rows, scores, out, stats) }
                });
            }
            // SAFETY: the CPU has the features the copy is compiled for.
            return unsafe { self.run_avx512(k, v, scores, out, stats) };
        }
        self.body(k, v, scores, out, stats)
    }

    /// # Safety
    /// The CPU has AVX-512F/BW/VL, AVX2, FMA and F16C (this is [`Self::body`]
    /// compiled for them).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn run_avx512<T: Elem>(
        &self,
        k: &[T],
        v: &[T],
        scores: &mut [f32],
        out: &mut [f32],
        stats: Option<&mut [f32]>,
    ) {
        self.body(k, v, scores, out, stats)
    }

    /// Scores are `[heads * group][held]`; each pool row is read once, for all the
    /// query heads of all the KV heads.
    #[inline(always)]
    fn body<T: Elem>(&self, k: &[T], v: &[T], scores: &mut [f32], out: &mut [f32], stats: Option<&mut [f32]>) {
        let (hd, held, group) = (self.hd, self.held, self.group);
        let len = self.heads * hd;
        for j in 0..held {
            // Slots are scattered over the pool: fetch ahead what the hardware
            // prefetchers cannot guess.
            if j + PREFETCH_SLOTS < held {
                prefetch(&k[self.slot(j + PREFETCH_SLOTS)..][..len]);
            }
            let at = self.slot(j);
            for (g, key) in k[at..at + len].chunks_exact(hd).enumerate() {
                for h in 0..group {
                    let qh = g * group + h;
                    scores[qh * held + j] = dot(&self.q[qh * hd..(qh + 1) * hd], key) * self.scale;
                }
            }
        }
        softmax_rows(scores, held, stats);
        out.fill(0.0);
        for j in 0..held {
            if j + PREFETCH_SLOTS < held {
                prefetch(&v[self.slot(j + PREFETCH_SLOTS)..][..len]);
            }
            let at = self.slot(j);
            for (g, val) in v[at..at + len].chunks_exact(hd).enumerate() {
                for h in 0..group {
                    let qh = g * group + h;
                    axpy(scores[qh * held + j], val, &mut out[qh * hd..(qh + 1) * hd]);
                }
            }
        }
    }
}

/// How many slots ahead decode attention prefetches.
const PREFETCH_SLOTS: usize = 2;

const LANES: usize = 16;

#[inline(always)]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y.f()).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l].f();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `o += p · x`.
#[inline(always)]
fn axpy<T: Elem>(p: f32, x: &[T], o: &mut [f32]) {
    for (o, x) in o.iter_mut().zip(x) {
        *o += p * x.f();
    }
}

/// Softmax of each `held`-long row of `scores`; with `stats`, each row's max and
/// sum of exponentials (a sum of 0 for no keys).
#[inline(always)]
fn softmax_rows(scores: &mut [f32], held: usize, stats: Option<&mut [f32]>) {
    if held == 0 {
        if let Some(s) = stats {
            s.fill(0.0);
        }
        return;
    }
    match stats {
        Some(st) => {
            for (sc, st) in scores.chunks_exact_mut(held).zip(st.chunks_exact_mut(2)) {
                (st[0], st[1]) = softmax(sc);
            }
        }
        None => scores.chunks_exact_mut(held).for_each(|sc| {
            softmax(sc);
        }),
    }
}

/// Softmax in place; returns the max and the sum of exponentials.
#[inline(always)]
fn softmax(sc: &mut [f32]) -> (f32, f32) {
    let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = [0f32; LANES];
    let mut chunks = sc.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_nonpositive(c[l] - max);
            sum[l] += c[l];
        }
    }
    let mut total: f32 = sum.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - max);
        total += *x;
    }
    let inv = 1.0 / total;
    sc.iter_mut().for_each(|x| *x *= inv);
    (max, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Softmax(q·kᵀ/√d)·v in f64 over explicit rows.
    fn naive(q: &[f32], keys: &[Vec<f64>], vals: &[Vec<f64>]) -> Vec<f64> {
        let hd = q.len();
        let s: Vec<f64> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(&a, b)| f64::from(a) * b).sum::<f64>() / (hd as f64).sqrt())
            .collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = e.iter().sum();
        (0..hd)
            .map(|d| e.iter().zip(vals).map(|(p, v)| p * v[d]).sum::<f64>() / total)
            .collect()
    }

    #[test]
    fn decode_matches_a_naive_attention_over_scattered_blocks() {
        // Held lengths below, at and past the 16-key blocks; head sizes on and off the
        // AVX-512 path; groups up to past four heads; many sequences (a task each)
        // and few (tasks over ranges of slots); every pool dtype.
        for (hd, group, nkv, lens) in [
            (64, 4, 4, &[1usize, 15, 16, 17, 40][..]),
            (128, 4, 2, &[33][..]),
            (16, 6, 3, &[5, 47, 2, 31, 16][..]),
            (24, 2, 2, &[9, 20][..]),
            // Few sequences: slot ranges merged, some of them empty.
            (64, 4, 2, &[1, 200][..]),
            (16, 6, 3, &[300][..]),
            (40, 1, 2, &[70][..]),
        ] {
            for dtype in 0..3 {
                check(hd, group, nkv, lens, 3, dtype, 0.0);
            }
        }
        // Every score far below zero (a short sequence's only piece included): the
        // merge must not let an empty piece's max of 0 underflow the real weights.
        check(64, 4, 2, &[1, 200], 3, 0, 30.0);
    }

    /// `shift` lowers the queries and raises the keys so that every score is far
    /// below zero.
    fn check(hd: usize, group: usize, nkv: usize, lens: &[usize], block: usize, dtype: usize, shift: f32) {
        let nq = nkv * group;
        let width = nkv * hd;
        // Each sequence's blocks are spread over the pool in reverse, interleaved.
        let blocks: Vec<usize> = lens.iter().map(|l| l.div_ceil(block)).collect();
        let total: usize = blocks.iter().sum();
        let rows = total * block;
        let mut tables = Vec::new();
        let mut seqs = Vec::new();
        let mut next = total;
        for (l, b) in lens.iter().zip(&blocks) {
            seqs.push((tables.len() as u32, *l as u32));
            for _ in 0..*b {
                next -= 1;
                tables.push(next as u32);
            }
        }
        let q: Vec<f32> = (0..lens.len() * nq * hd)
            .map(|i| (i as f32 * 0.3).cos() - shift)
            .collect();
        let mut out = vec![0f32; q.len()];
        let fill = |seed: f32, up: f32| -> Vec<f32> {
            (0..rows * width)
                .map(|i| (i as f32 * 0.618 + seed).sin() + up)
                .collect()
        };
        let (k, v) = (fill(0.0, shift.min(1.0) * 2.0), fill(1.0, 0.0));
        let (kb, vb) = (
            k.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
            v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
        );
        let (kh, vh) = (
            k.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
            v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
        );
        let (ki, vi) = match dtype {
            0 => (Input::F32(&k), Input::F32(&v)),
            1 => (Input::BF16(&kb), Input::BF16(&vb)),
            _ => (Input::F16(&kh), Input::F16(&vh)),
        };
        let a = DecodeAttention {
            q: &q,
            k: ki,
            v: vi,
            q_heads: nq,
            kv_heads: nkv,
            head_dim: hd,
            seqs: &seqs,
            tables: &tables,
            block_size: block,
        };
        decode_attention(&a, &mut out);
        // The reference reads the pools as stored.
        let wide = |p: Input<'_>| -> Vec<f64> {
            match p {
                Input::F32(p) => p.iter().map(|&x| f64::from(x)).collect(),
                Input::BF16(p) => p.iter().map(|x| f64::from(x.to_f32())).collect(),
                Input::F16(p) => p.iter().map(|x| f64::from(x.to_f32())).collect(),
            }
        };
        let (kf, vf) = (wide(ki), wide(vi));
        for (s, &(off, held)) in seqs.iter().enumerate() {
            let row = |j: usize| tables[off as usize + j / block] as usize * block + j % block;
            for h in 0..nq {
                let g = h / group;
                let part = |p: &[f64], j: usize| p[row(j) * width + g * hd..][..hd].to_vec();
                let keys: Vec<Vec<f64>> = (0..held as usize).map(|j| part(&kf, j)).collect();
                let vals: Vec<Vec<f64>> = (0..held as usize).map(|j| part(&vf, j)).collect();
                let want = naive(&q[(s * nq + h) * hd..][..hd], &keys, &vals);
                let got = &out[(s * nq + h) * hd..][..hd];
                for (d, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(*g) - w).abs() < 2e-5,
                        "hd {hd} group {group} dtype {dtype} seq {s} (held {held}) head {h} dim {d}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
