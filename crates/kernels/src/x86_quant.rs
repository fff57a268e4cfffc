//! AVX-512 decode tiles over quantized panels (the layout of [`crate::quant`]):
//! the values are widened to f32 in registers and multiplied into per-group
//! accumulators; each group's scale and zero are applied once at its end, as
//! `acc += scale · (Σ q·x − zero · Σx)` with `Σx` per group from the driver. A panel
//! comes from DRAM once and at its packed size; the row tiles after the first find
//! it in L2.

use crate::operands::Out;
use crate::packed::NR;
use crate::quant::{VALUES, ZEROS};
use std::arch::x86_64::*;

/// Rows per tile: each row has three pairs of accumulators (the result, and the
/// group's even and odd k steps), which with the four widened weight vectors fill
/// the 32 zmm registers at 4 rows.
pub(crate) const MR_MAX_Q: usize = 4;

/// How far ahead a streaming tile prefetches its panel (as the float tiles do).
const PREFETCH_BYTES: usize = 2048;

/// 16 u8 at `p` as f32.
#[inline(always)]
unsafe fn widen_u8(p: *const u8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)))
}

/// `c[mr × c.ncols] = x[mr × groups·gs] · w` for one quantized panel of `BITS`
/// bits, whole groups of `gs` k steps (`group_bytes` apart); `xsum[i * lds + g]` is
/// row i's sum over group g. The even and odd k steps of a group accumulate apart,
/// so that one row's dependency chain takes every other step (the order is the same
/// for every `MR`: a row's result does not depend on its batch).
///
/// # Safety
/// AVX-512F/BW must be available; `x` rows (stride `ldx`) hold `groups * gs` values,
/// `xsum` rows (stride `lds`) `groups` sums, `w` a panel of `groups` groups in the
/// layout of [`crate::quant`]; `c` as for `store_tile`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn qtile<const BITS: u32, const MR: usize, const PF: bool>(
    groups: usize,
    gs: usize,
    group_bytes: usize,
    x: *const f32,
    ldx: usize,
    xsum: *const f32,
    lds: usize,
    w: *const u8,
    c: Out,
) {
    let zero = _mm512_setzero_ps();
    let mut acc = [[zero; 2]; MR];
    // The 16 values of a nibble, as f32.
    let nibbles = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    // Bytes of values per k-step pair, and pairs per group.
    let pair_bytes = if BITS == 8 { 2 * NR } else { NR };
    let pairs = gs / 2;
    for g in 0..groups {
        let grp = w.add(g * group_bytes);
        let q = grp.add(VALUES);
        let xg = x.add(g * gs);
        let mut even = [[zero; 2]; MR];
        let mut odd = [[zero; 2]; MR];
        if PF {
            // The header's three lines: prefetches never fault, so running past the
            // end of the buffer is harmless.
            let ahead = grp.wrapping_add(PREFETCH_BYTES) as *const i8;
            for l in 0..3 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l));
            }
        }
        for t in 0..pairs {
            let u = q.add(t * pair_bytes);
            if PF && (BITS == 8 || t % 2 == 0) {
                _mm_prefetch::<_MM_HINT_T0>(u.wrapping_add(PREFETCH_BYTES + VALUES) as *const i8);
            }
            let ws = if BITS == 8 {
                [
                    widen_u8(u),
                    widen_u8(u.add(16)),
                    widen_u8(u.add(32)),
                    widen_u8(u.add(48)),
                ]
            } else {
                let a0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(u as *const __m128i));
                let a1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(u.add(16) as *const __m128i));
                // `vpermps` reads the low 4 bits of each index lane: a nibble to
                // f32 in one instruction (an `and` and a `vcvtdq2ps` otherwise).
                [
                    _mm512_permutexvar_ps(a0, nibbles),
                    _mm512_permutexvar_ps(a1, nibbles),
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(a0), nibbles),
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(a1), nibbles),
                ]
            };
            for (i, (e, o)) in even.iter_mut().zip(odd.iter_mut()).enumerate() {
                let xe = _mm512_set1_ps(*xg.add(i * ldx + 2 * t));
                let xo = _mm512_set1_ps(*xg.add(i * ldx + 2 * t + 1));
                e[0] = _mm512_fmadd_ps(xe, ws[0], e[0]);
                e[1] = _mm512_fmadd_ps(xe, ws[1], e[1]);
                o[0] = _mm512_fmadd_ps(xo, ws[2], o[0]);
                o[1] = _mm512_fmadd_ps(xo, ws[3], o[1]);
            }
        }
        if gs % 2 == 1 {
            // The last step of an odd group: int8's own unit, int4's low nibbles.
            let u = q.add(pairs * pair_bytes);
            let ws = if BITS == 8 {
                [widen_u8(u), widen_u8(u.add(16))]
            } else {
                let a0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(u as *const __m128i));
                let a1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(u.add(16) as *const __m128i));
                [_mm512_permutexvar_ps(a0, nibbles), _mm512_permutexvar_ps(a1, nibbles)]
            };
            for (i, e) in even.iter_mut().enumerate() {
                let xe = _mm512_set1_ps(*xg.add(i * ldx + gs - 1));
                e[0] = _mm512_fmadd_ps(xe, ws[0], e[0]);
                e[1] = _mm512_fmadd_ps(xe, ws[1], e[1]);
            }
        }
        let s = [
            _mm512_loadu_ps(grp as *const f32),
            _mm512_loadu_ps(grp.add(64) as *const f32),
        ];
        let z = [widen_u8(grp.add(ZEROS)), widen_u8(grp.add(ZEROS + 16))];
        for (i, a) in acc.iter_mut().enumerate() {
            let xs = _mm512_set1_ps(*xsum.add(i * lds + g));
            for h in 0..2 {
                let dot = _mm512_fnmadd_ps(z[h], xs, _mm512_add_ps(even[i][h], odd[i][h]));
                a[h] = _mm512_fmadd_ps(dot, s[h], a[h]);
            }
        }
    }
    crate::x86::store_tile(&acc, c);
}

/// [`qtile`] for `bits` 8 or 4 and `mr` in `1..=MR_MAX_Q` rows, prefetching when `pf`.
///
/// # Safety
/// As for [`qtile`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm_tile_q(
    bits: u8,
    mr: usize,
    pf: bool,
    groups: usize,
    gs: usize,
    group_bytes: usize,
    x: *const f32,
    ldx: usize,
    xsum: *const f32,
    lds: usize,
    w: *const u8,
    c: Out,
) {
    macro_rules! go {
        ($b:literal) => {
            match (mr, pf) {
                (1, false) => qtile::<$b, 1, false>(groups, gs, group_bytes, x, ldx, xsum, lds, w, c),
                (2, false) => qtile::<$b, 2, false>(groups, gs, group_bytes, x, ldx, xsum, lds, w, c),
                (3, false) => qtile::<$b, 3, false>(groups, gs, group_bytes, x, ldx, xsum, lds, w, c),
                (4, false) => qtile::<$b, 4, false>(groups, gs, group_bytes, x, ldx, xsum, lds, w, c),
                (1, true) => qtile::<$b, 1, true>(groups, gs, group_bytes, x, ldx, xsum, lds, w, c),
                (2, true) => qtile::<$b, 2, true>(groups, gs, group_bytes, x, ldx, xsum, lds, w, c),
                (3, true) => qtile::<$b, 3, true>(groups, gs, group_bytes, x, ldx, xsum, lds, w, c),
                (4, true) => qtile::<$b, 4, true>(groups, gs, group_bytes, x, ldx, xsum, lds, w, c),
                _ => unreachable!("tile of {mr} rows"),
            }
        };
    }
    if bits == 8 {
        go!(8)
    } else {
        go!(4)
    }
}

/// Rows per register block of [`qpanel_batch`]: each row's four group chains (even
/// and odd k steps, two halves), with the four weight vectors of a step pair and two
/// broadcasts, fill 30 of the 32 zmm registers. Six rows did ~12% more FMAs per
/// second than four in a loop of this shape (fewer loads per FMA).
const MR_BATCH: usize = 6;
/// k steps of a group widened at a time by [`qpanel_batch`] (even, so that pairs
/// stay whole): 128 × 32 f32, 16 KiB, stays in L1 while every row block reads it.
const CHUNK: usize = 128;
/// Most rows [`qpanel_batch`] takes (the decode limit of the driver).
pub(crate) const M_MAX_BATCH: usize = crate::gemm::SMALL_M;

/// `c[m × c.ncols] = x[m × groups·gs] · w` for one quantized panel and any `m` up to
/// [`M_MAX_BATCH`]: each chunk of a group is widened to f32 once, into an L1
/// scratch, and every block of rows multiplies it, instead of each row tile of
/// [`qtile`] widening the whole panel again. A row's operations and their order are
/// those of [`qtile`] (per-group even and odd chains, then `scale · (Σ q·x − zero ·
/// Σx)`), so that its result has the same bits whatever path its batch takes.
///
/// # Safety
/// As for [`qtile`], with `m` rows (`1..=M_MAX_BATCH`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn qpanel_batch(
    bits: u8,
    m: usize,
    groups: usize,
    gs: usize,
    group_bytes: usize,
    x: *const f32,
    ldx: usize,
    xsum: *const f32,
    lds: usize,
    w: *const u8,
    c: Out,
) {
    debug_assert!((1..=M_MAX_BATCH).contains(&m));
    let zero = _mm512_setzero_ps();
    let mut acc = [[zero; 2]; M_MAX_BATCH];
    // Per row: the group's even chains (two halves), then its odd ones.
    let mut eo = [[zero; 4]; M_MAX_BATCH];
    // The chunk's k steps as f32, two vectors (rows 0–15, 16–31) per step.
    let mut wf = [[zero; 2]; CHUNK];
    let nibbles = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    let pair_bytes = if bits == 8 { 2 * NR } else { NR };
    for g in 0..groups {
        let grp = w.add(g * group_bytes);
        let q = grp.add(VALUES);
        let xg = x.add(g * gs);
        for e in &mut eo[..m] {
            *e = [zero; 4];
        }
        for s0 in (0..gs).step_by(CHUNK) {
            let steps = CHUNK.min(gs - s0);
            // Widen the chunk: pair t of the chunk is pair s0/2 + t of the group.
            for t in 0..steps.div_ceil(2) {
                let u = q.add((s0 / 2 + t) * pair_bytes);
                _mm_prefetch::<_MM_HINT_T0>(u.wrapping_add(PREFETCH_BYTES) as *const i8);
                if bits == 8 {
                    wf[2 * t] = [widen_u8(u), widen_u8(u.add(16))];
                    if 2 * t + 1 < steps {
                        wf[2 * t + 1] = [widen_u8(u.add(32)), widen_u8(u.add(48))];
                    }
                } else {
                    let a0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(u as *const __m128i));
                    let a1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(u.add(16) as *const __m128i));
                    wf[2 * t] = [_mm512_permutexvar_ps(a0, nibbles), _mm512_permutexvar_ps(a1, nibbles)];
                    if 2 * t + 1 < steps {
                        wf[2 * t + 1] = [
                            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(a0), nibbles),
                            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(a1), nibbles),
                        ];
                    }
                }
            }
            let mut i = 0;
            while i < m {
                let r = MR_BATCH.min(m - i);
                let xs = xg.add(i * ldx + s0);
                let e = eo.as_mut_ptr().add(i);
                match r {
                    1 => batch_rows::<1>(&wf, steps, xs, ldx, e),
                    2 => batch_rows::<2>(&wf, steps, xs, ldx, e),
                    3 => batch_rows::<3>(&wf, steps, xs, ldx, e),
                    4 => batch_rows::<4>(&wf, steps, xs, ldx, e),
                    5 => batch_rows::<5>(&wf, steps, xs, ldx, e),
                    _ => batch_rows::<MR_BATCH>(&wf, steps, xs, ldx, e),
                }
                i += r;
            }
        }
        let s = [
            _mm512_loadu_ps(grp as *const f32),
            _mm512_loadu_ps(grp.add(64) as *const f32),
        ];
        let z = [widen_u8(grp.add(ZEROS)), widen_u8(grp.add(ZEROS + 16))];
        for (i, (a, e)) in acc[..m].iter_mut().zip(&eo[..m]).enumerate() {
            let xs = _mm512_set1_ps(*xsum.add(i * lds + g));
            for h in 0..2 {
                let dot = _mm512_fnmadd_ps(z[h], xs, _mm512_add_ps(e[h], e[2 + h]));
                a[h] = _mm512_fmadd_ps(dot, s[h], a[h]);
            }
        }
    }
    let (m0, m1) = crate::x86::col_masks(c.ncols);
    for (i, a) in acc[..m].iter().enumerate() {
        let row = c.ptr.add(i * c.ldc);
        let (mut v0, mut v1) = (a[0], a[1]);
        if c.accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row.add(16), m1, v1);
    }
}

/// `R` rows of [`qpanel_batch`] over a widened chunk of `steps` k steps: `x` is the
/// first row's activation at the chunk's first step, `eo` the rows' group chains,
/// which stay in registers for the chunk.
///
/// # Safety
/// `x` rows (stride `ldx`) hold `steps` values; `eo` points to `R` rows of chains.
#[inline(always)]
unsafe fn batch_rows<const R: usize>(
    wf: &[[__m512; 2]; CHUNK],
    steps: usize,
    x: *const f32,
    ldx: usize,
    eo: *mut [__m512; 4],
) {
    let mut e: [[__m512; 4]; R] = [[_mm512_setzero_ps(); 4]; R];
    for (i, v) in e.iter_mut().enumerate() {
        *v = *eo.add(i);
    }
    for t in 0..steps / 2 {
        let (we, wo) = (wf[2 * t], wf[2 * t + 1]);
        for (i, v) in e.iter_mut().enumerate() {
            let xe = _mm512_set1_ps(*x.add(i * ldx + 2 * t));
            let xo = _mm512_set1_ps(*x.add(i * ldx + 2 * t + 1));
            v[0] = _mm512_fmadd_ps(xe, we[0], v[0]);
            v[1] = _mm512_fmadd_ps(xe, we[1], v[1]);
            v[2] = _mm512_fmadd_ps(xo, wo[0], v[2]);
            v[3] = _mm512_fmadd_ps(xo, wo[1], v[3]);
        }
    }
    if steps % 2 == 1 {
        // A group's odd last step: the even chains, as in `qtile`.
        let wl = wf[steps - 1];
        for (i, v) in e.iter_mut().enumerate() {
            let xl = _mm512_set1_ps(*x.add(i * ldx + steps - 1));
            v[0] = _mm512_fmadd_ps(xl, wl[0], v[0]);
            v[1] = _mm512_fmadd_ps(xl, wl[1], v[1]);
        }
    }
    for (i, v) in e.iter().enumerate() {
        *eo.add(i) = *v;
    }
}
