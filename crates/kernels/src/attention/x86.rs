//! AVX-512 decode attention for head sizes that are a multiple of 16: scores of 16
//! keys at a time, reduced together into one vector (no per-key horizontal sum),
//! the softmax in 16 lanes, and values summed into register accumulators over
//! blocks of 32 keys.

use super::common::{prefetch, prefetch_l2, Heads, Wide};
use crate::elementwise::exp_nonpositive_avx512;
use std::arch::x86_64::*;

/// Lane `i` = the sum of `v[i]`'s lanes: a transpose-and-add tree of 45 shuffles
/// and adds for 16 sums, where 16 horizontal sums would take about 8 each.
///
/// # Safety
/// The CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sum16(v: &[__m512; 16]) -> __m512 {
    // Pairs: per 128-bit lane, [x0+x2, y0+y2, x1+x3, y1+y3].
    let a: [__m512; 8] = std::array::from_fn(|i| {
        _mm512_add_ps(
            _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
            _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]),
        )
    });
    // Fours: per 128-bit lane, one partial sum of each of four vectors.
    let b: [__m512; 4] = std::array::from_fn(|i| {
        let (x, y) = (_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
        )
    });
    // Eights: 128-bit lanes 0-1 hold two partials of the first four, 2-3 of the next.
    let c: [__m512; 2] = std::array::from_fn(|i| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(b[2 * i], b[2 * i + 1]),
            _mm512_shuffle_f32x4::<0xee>(b[2 * i], b[2 * i + 1]),
        )
    });
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(c[0], c[1]),
        _mm512_shuffle_f32x4::<0xdd>(c[0], c[1]),
    )
}

/// As the portable `softmax_rows` (in `attention.rs`), in 16 lanes.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_rows(scores: &mut [f32], held: usize, mut stats: Option<&mut [f32]>) {
    if held == 0 {
        if let Some(s) = stats {
            s.fill(0.0);
        }
        return;
    }
    let tail = held % 16;
    let tail_mask: __mmask16 = if tail == 0 { 0xffff } else { (1u16 << tail) - 1 };
    for (r, row) in scores.chunks_exact_mut(held).enumerate() {
        let p = row.as_mut_ptr();
        let full = held / 16;
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in 0..full {
            m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(16 * c)));
        }
        if tail > 0 {
            m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail_mask, p.add(16 * full)));
        }
        let max = _mm512_reduce_max_ps(m);
        let mv = _mm512_set1_ps(max);
        let mut sum = _mm512_setzero_ps();
        for c in 0..full {
            let e = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(p.add(16 * c)), mv));
            _mm512_storeu_ps(p.add(16 * c), e);
            sum = _mm512_add_ps(sum, e);
        }
        if tail > 0 {
            let x = _mm512_maskz_loadu_ps(tail_mask, p.add(16 * full));
            let e = _mm512_maskz_mov_ps(tail_mask, exp_nonpositive_avx512(_mm512_sub_ps(x, mv)));
            _mm512_mask_storeu_ps(p.add(16 * full), tail_mask, e);
            sum = _mm512_add_ps(sum, e);
        }
        let total = _mm512_reduce_add_ps(sum);
        let inv = _mm512_set1_ps(1.0 / total);
        for c in 0..full {
            _mm512_storeu_ps(p.add(16 * c), _mm512_mul_ps(_mm512_loadu_ps(p.add(16 * c)), inv));
        }
        if tail > 0 {
            let x = _mm512_maskz_loadu_ps(tail_mask, p.add(16 * full));
            _mm512_mask_storeu_ps(p.add(16 * full), tail_mask, _mm512_mul_ps(x, inv));
        }
        if let Some(st) = stats.as_deref_mut() {
            (st[2 * r], st[2 * r + 1]) = (max, total);
        }
    }
}

impl Heads<'_> {
    /// As [`Heads::body`]; `rows[j]` is the pool offset of slot `j`'s row.
    ///
    /// # Safety
    /// AVX-512F/BW/VL and F16C must be available, `hd` a multiple of 16, and every
    /// `rows[j] + heads * hd` inside both pools.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub(super) unsafe fn run_blocks<T: Wide>(
        &self,
        k: &[T],
        v: &[T],
        rows: &[usize],
        scores: &mut [f32],
        out: &mut [f32],
        stats: Option<&mut [f32]>,
    ) {
        let (hd, held, group) = (self.hd, self.held, self.group);
        debug_assert!(hd.is_multiple_of(16) && rows.len() == held);
        let row = self.heads * hd;
        let (kp, vp, sp) = (k.as_ptr(), v.as_ptr(), scores.as_mut_ptr());
        let scale = _mm512_set1_ps(self.scale);
        // The values come into L2 along with the keys when they all fit there.
        let early_values = held * row * std::mem::size_of::<T>() <= EARLY_VALUE_BYTES;
        let passes = self.heads * group;
        for j0 in (0..held).step_by(16) {
            let n = (held - j0).min(16);
            let mask = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
            for g in 0..self.heads {
                // Short blocks repeat their last key; its lanes are not stored.
                let keys: [*const T; 16] = std::array::from_fn(|i| kp.add(rows[j0 + i.min(n - 1)] + g * hd));
                for h in 0..group {
                    let qh = g * group + h;
                    // The next block's key rows (scattered over the pool), a share per
                    // pass (see `spread`).
                    let share = spread(qh, passes, 16);
                    for &r in rows.iter().skip(j0 + 16 + share.start).take(share.len()) {
                        prefetch(&k[r..][..row]);
                    }
                    if early_values {
                        for &r in rows.iter().skip(j0 + share.start).take(share.len()) {
                            prefetch_l2(&v[r..][..row]);
                        }
                    }
                    let q = self.q.as_ptr().add(qh * hd);
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for c in (0..hd).step_by(16) {
                        let qv = _mm512_loadu_ps(q.add(c));
                        for (a, key) in acc.iter_mut().zip(&keys) {
                            *a = _mm512_fmadd_ps(T::load16(key.add(c)), qv, *a);
                        }
                    }
                    _mm512_mask_storeu_ps(sp.add(qh * held + j0), mask, _mm512_mul_ps(sum16(&acc), scale));
                }
            }
        }
        softmax_rows(scores, held, stats);
        out.fill(0.0);
        let op = out.as_mut_ptr();
        let passes = self.heads * group.div_ceil(4) * hd.div_ceil(64);
        for j0 in (0..held).step_by(PV_KEYS) {
            let keys = &rows[j0..held.min(j0 + PV_KEYS)];
            let mut pass = 0;
            for g in 0..self.heads {
                let vals: [*const T; PV_KEYS] = std::array::from_fn(|i| vp.add(keys[i.min(keys.len() - 1)] + g * hd));
                let vals = &vals[..keys.len()];
                // Up to four query heads × 64 output values: 16 accumulators.
                for h0 in (0..group).step_by(4) {
                    let hn = (group - h0).min(4);
                    let qh = g * group + h0;
                    for c0 in (0..hd).step_by(64) {
                        if !early_values {
                            let share = spread(pass, passes, PV_KEYS);
                            for &r in rows.iter().skip(j0 + PV_KEYS + share.start).take(share.len()) {
                                prefetch(&v[r..][..row]);
                            }
                        }
                        pass += 1;
                        let cn = (hd - c0).min(64) / 16;
                        let (w, o) = (sp.add(qh * held + j0), op.add(qh * hd + c0));
                        dispatch_pv::<T>(hn, cn, vals, c0, w, held, o, hd);
                    }
                }
            }
        }
    }
}

/// Up to this many bytes of a task's value rows are fetched into L2 during the
/// scores, beside the keys; more would push out what is still to be read. Otherwise
/// the weighted sum fetches them a block ahead.
const EARLY_VALUE_BYTES: usize = 512 << 10;

/// Pass `i`'s share of `rows` rows when `passes` passes over a block each fetch
/// part of the next: prefetches spread between the multiplies. In one burst, 256 of
/// them (a block of 16 keys of the 229M model) filled the core's line-fill buffers
/// and stalled it until they drained, the multiplies waiting behind them (the
/// attention bench at 16 sequences × 144 slots: 390–410 → 320–340 µs per layer,
/// the values early included).
fn spread(i: usize, passes: usize, rows: usize) -> std::ops::Range<usize> {
    i * rows / passes..(i + 1) * rows / passes
}

/// Keys per block of the weighted sum: their value rows stay in cache over the
/// passes of every head and output slice.
const PV_KEYS: usize = 32;

/// [`pv_tile`] for `hn` heads and `cn` vectors, both in 1..=4.
///
/// # Safety
/// As [`pv_tile`], with `hn` and `cn` in 1..=4.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn dispatch_pv<T: Wide>(
    hn: usize,
    cn: usize,
    vals: &[*const T],
    c0: usize,
    w: *const f32,
    ws: usize,
    o: *mut f32,
    os: usize,
) {
    macro_rules! arms {
        ($(($h:literal, $c:literal)),*) => {
            match (hn, cn) {
                $(($h, $c) => pv_tile::<T, $h, $c>(vals, c0, w, ws, o, os),)*
                _ => unreachable!("a tile of {hn} heads and {cn} vectors"),
            }
        };
    }
    arms!(
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 4),
        (2, 1),
        (2, 2),
        (2, 3),
        (2, 4),
        (3, 1),
        (3, 2),
        (3, 3),
        (3, 4),
        (4, 1),
        (4, 2),
        (4, 3),
        (4, 4)
    )
}

/// `o[i·os + 16l..][..16] += Σ_j w[i·ws + j] · vals[j][c0 + 16l..][..16]` for `HN`
/// heads and `CN` vectors, the accumulators in registers.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL, FMA and F16C; each `vals[j]` points to at least
/// `c0 + 16·CN` readable values; `w` to `HN` rows `ws` apart of `vals.len()` weights;
/// `o` to `HN` rows `os` apart of `16·CN` f32s that no one else touches meanwhile.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn pv_tile<T: Wide, const HN: usize, const CN: usize>(
    vals: &[*const T],
    c0: usize,
    w: *const f32,
    ws: usize,
    o: *mut f32,
    os: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); CN]; HN];
    for (i, a) in acc.iter_mut().enumerate() {
        for (l, a) in a.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(o.add(i * os + 16 * l));
        }
    }
    for (j, &v) in vals.iter().enumerate() {
        let x: [__m512; CN] = std::array::from_fn(|l| T::load16(v.add(c0 + 16 * l)));
        for (i, a) in acc.iter_mut().enumerate() {
            let wi = _mm512_set1_ps(*w.add(i * ws + j));
            for (a, x) in a.iter_mut().zip(&x) {
                *a = _mm512_fmadd_ps(wi, *x, *a);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for (l, a) in a.iter().enumerate() {
            _mm512_storeu_ps(o.add(i * os + 16 * l), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum16_puts_each_vectors_sum_in_its_lane() {
        if !crate::isa::avx512() {
            return;
        }
        let vals: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        // SAFETY: AVX-512F was just checked; every load reads 16 values of `vals`.
        let got = unsafe {
            let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(vals.as_ptr().add(16 * i)));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), sum16(&v));
            out
        };
        for (i, g) in got.iter().enumerate() {
            let want: f32 = vals[16 * i..16 * i + 16].iter().sum();
            assert_eq!(*g, want, "lane {i}");
        }
    }
}
