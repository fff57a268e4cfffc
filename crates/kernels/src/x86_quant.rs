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

/// The 16 values of a nibble, as f32: the table [`widen_pair`] looks int4 codes up in.
#[inline(always)]
unsafe fn nibble_table() -> __m512 {
    _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    )
}

/// The codes of one pair of k steps at `u` (a unit pair of int8, one unit of int4) as
/// f32: `[even step rows 0..16, even 16..32, odd 0..16, odd 16..32]`.
#[inline(always)]
unsafe fn widen_pair<const BITS: u32>(u: *const u8, nibbles: __m512) -> [__m512; 4] {
    if BITS == 8 {
        [
            widen_u8(u),
            widen_u8(u.add(16)),
            widen_u8(u.add(32)),
            widen_u8(u.add(48)),
        ]
    } else {
        let a0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(u as *const __m128i));
        let a1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(u.add(16) as *const __m128i));
        // `vpermps` reads the low 4 bits of each index lane: a nibble to f32 in one
        // instruction (an `and` and a `vcvtdq2ps` otherwise).
        [
            _mm512_permutexvar_ps(a0, nibbles),
            _mm512_permutexvar_ps(a1, nibbles),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(a0), nibbles),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(a1), nibbles),
        ]
    }
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
    let nibbles = nibble_table();
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
            let ws = widen_pair::<BITS>(u, nibbles);
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

/// Panel `w` (`groups` groups of an even `gs` k steps, `group_bytes` apart)
/// dequantized to bf16 in the packed bf16 panel layout, `[groups·gs/2][NR][2]`: pair
/// row r holds k steps 2r and 2r+1 of each row side by side, the B operand AMX
/// tiles read. Each value is `q·scale − zero·scale` in f32 (one FMA), rounded to
/// nearest even.
///
/// # Safety
/// AVX-512F/BW and AVX512_BF16 must be available; `w` is a panel in the layout of
/// [`crate::quant`] with `BITS` bits; `dst` holds `groups·gs·NR` values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn dequant_panel_bf16<const BITS: u32>(
    groups: usize,
    gs: usize,
    group_bytes: usize,
    w: *const u8,
    dst: *mut u16,
) {
    debug_assert!(gs.is_multiple_of(2), "pairs of k steps within a group");
    // `vcvtne2ps2bf16 hi, lo` puts row j's even step at lane j and its odd step at
    // lane 16 + j; the pair layout wants them at 2j and 2j + 1.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    let nibbles = nibble_table();
    let pair_bytes = if BITS == 8 { 2 * NR } else { NR };
    let mut out = dst;
    for g in 0..groups {
        let grp = w.add(g * group_bytes);
        let ahead = grp.wrapping_add(PREFETCH_BYTES) as *const i8;
        for l in 0..3 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l));
        }
        let s = [
            _mm512_loadu_ps(grp as *const f32),
            _mm512_loadu_ps(grp.add(64) as *const f32),
        ];
        let zs = [
            _mm512_mul_ps(widen_u8(grp.add(ZEROS)), s[0]),
            _mm512_mul_ps(widen_u8(grp.add(ZEROS + 16)), s[1]),
        ];
        let q = grp.add(VALUES);
        for t in 0..gs / 2 {
            let u = q.add(t * pair_bytes);
            if BITS == 8 || t % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(u.wrapping_add(PREFETCH_BYTES + VALUES) as *const i8);
            }
            let v = widen_pair::<BITS>(u, nibbles);
            for h in 0..2 {
                let even = _mm512_fmsub_ps(v[h], s[h], zs[h]);
                let odd = _mm512_fmsub_ps(v[2 + h], s[h], zs[h]);
                let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
                _mm512_storeu_si512(out.add(32 * h) as *mut _, _mm512_permutexvar_epi16(interleave, pairs));
            }
            out = out.add(2 * NR);
        }
    }
}
