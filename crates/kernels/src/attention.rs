//! Attention on the CPU. Decode (here): one new query token per sequence over the keys and
//! values that sequence holds in a paged pool, read through its block table. Every
//! (sequence, KV head) pair runs on its own, over [`crate::parallel`], with the
//! query heads of the KV head's group together so that each key and value row is
//! read once for all of them.
//!
//! The loops are written over 16-lane arrays so that the compiler turns them into
//! AVX-512 where the CPU has it (a copy compiled for it is chosen at run time) and
//! into SSE elsewhere; sums are f32, in a different order than a sequential loop.

mod prefill;

pub use prefill::{prefill_attention, PrefillAttention};

use crate::parallel::for_each_chunk_mut;
use crate::Input;
use half::{bf16, f16};
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
    // A task per sequence reads its pool rows whole and in order; with fewer
    // sequences than would keep the threads busy, a task per (sequence, KV head).
    let parts = if a.seqs.len() >= 2 * rayon::current_num_threads() {
        1
    } else {
        nkv
    };
    let heads = nkv / parts;
    for_each_chunk_mut(out, heads * group * hd, |i, out| {
        let (s, first) = (i / parts, (i % parts) * heads);
        let (off, held) = (a.seqs[s].0 as usize, a.seqs[s].1 as usize);
        let job = Heads {
            q: &a.q[(s * nq + first * group) * hd..][..heads * group * hd],
            tables: &a.tables[off..off + held.div_ceil(a.block_size)],
            block_size: a.block_size,
            held,
            first: first * hd,
            heads,
            stride: nkv * hd,
            hd,
            group,
            scale,
        };
        SCORES.with(|sc| {
            let mut sc = sc.borrow_mut();
            let len = heads * group * held;
            if sc.len() < len {
                sc.resize(len, 0.0);
            }
            let sc = &mut sc[..len];
            match (a.k, a.v) {
                (Input::F32(k), Input::F32(v)) => job.run(k, v, sc, out),
                (Input::BF16(k), Input::BF16(v)) => job.run(k, v, sc, out),
                (Input::F16(k), Input::F16(v)) => job.run(k, v, sc, out),
                _ => panic!("key and value pools differ in dtype"),
            }
        })
    });
}

/// A pool element, widened to f32 as it is read.
pub(crate) trait Elem: Copy + Send + Sync {
    fn f(self) -> f32;
}
impl Elem for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn f(self) -> f32 {
        // A bf16 is the top half of an f32 (written out so that it vectorises).
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn f(self) -> f32 {
        self.to_f32()
    }
}

/// Consecutive KV heads of one sequence with their groups of query heads.
struct Heads<'a> {
    /// `[heads * group, hd]`.
    q: &'a [f32],
    tables: &'a [u32],
    block_size: usize,
    held: usize,
    /// Offset of the first KV head within a pool row, and the number of heads.
    first: usize,
    heads: usize,
    /// Values per pool row.
    stride: usize,
    hd: usize,
    group: usize,
    scale: f32,
}

impl Heads<'_> {
    fn run<T: Elem>(&self, k: &[T], v: &[T], scores: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: the CPU has the features the copy is compiled for.
            return unsafe { self.run_avx512(k, v, scores, out) };
        }
        self.body(k, v, scores, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn run_avx512<T: Elem>(&self, k: &[T], v: &[T], scores: &mut [f32], out: &mut [f32]) {
        self.body(k, v, scores, out)
    }

    /// Pool offset of the first head's part of slot `j`.
    #[inline(always)]
    fn slot(&self, j: usize) -> usize {
        let bs = self.block_size;
        (self.tables[j / bs] as usize * bs + j % bs) * self.stride + self.first
    }

    /// Scores are `[heads * group][held]`; each pool row is read once, for all the
    /// query heads of all the KV heads.
    #[inline(always)]
    fn body<T: Elem>(&self, k: &[T], v: &[T], scores: &mut [f32], out: &mut [f32]) {
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
        for sc in scores.chunks_exact_mut(held.max(1)) {
            softmax(sc);
        }
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

/// Asks for `data` in L1 ahead of its use.
#[inline(always)]
fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let (p, bytes) = (data.as_ptr() as *const i8, std::mem::size_of_val(data));
        for off in (0..bytes).step_by(64) {
            // SAFETY: prefetching is a hint: it never faults and the address is
            // inside `data`.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

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

#[inline(always)]
fn softmax(sc: &mut [f32]) {
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
}

/// Where [`exp_nonpositive`] clamps its argument: `e^x` leaves the normal range
/// below it.
pub(crate) const EXP_MIN: f32 = -87.3;
/// ln 2 split in two so that `x − n·ln 2` is exact in f32.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for `e^r`, `|r| ≤ ln 2 / 2`: `1 + r + r²·p(r)` with these
/// coefficients of `p`, highest first.
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` for `x ≤ 0` within 2 ulp (Cephes' polynomial on `x − n·ln 2`), in plain
/// arithmetic that vectorises, unlike a call to `expf`. Below [`EXP_MIN`] it returns
/// `e^EXP_MIN`, which is 0 to any softmax.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer (for |t| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(EXP_MIN);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * r + c);
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulp <= 2, "e^{x}: {got} vs {want} ({ulp} ulp)");
            x += 0.013_7;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e4) < 1e-37);
    }
}
