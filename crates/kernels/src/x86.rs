//! AVX-512 microkernels: an `mr × 32` tile of the output from `mr` activation rows
//! and one weight panel slice, f32 FMA or bf16 `vdpbf16ps`, plus the conversions
//! that feed them. Callers check the CPU features first ([`crate::Isa`]).

use crate::packed::NR;
use crate::Out;
use std::arch::x86_64::*;

/// Largest number of activation rows one tile takes: 2·MR accumulators, two weight
/// vectors and a broadcast fit the 32 zmm registers.
pub(crate) const MR_MAX: usize = 12;

/// Masks of the valid columns of the two 16-lane halves of a tile.
#[inline(always)]
fn col_masks(ncols: usize) -> (__mmask16, __mmask16) {
    let lo = if ncols >= 16 {
        0xffff
    } else {
        (1u32 << ncols) as u16 - 1
    };
    let hi = if ncols >= 32 {
        0xffff
    } else if ncols > 16 {
        (1u32 << (ncols - 16)) as u16 - 1
    } else {
        0
    };
    (lo, hi)
}

/// Adds (or stores, when not `c.accumulate`) the accumulators into `c`.
#[inline(always)]
unsafe fn store_tile<const MR: usize>(acc: &[[__m512; 2]; MR], c: Out) {
    let (m0, m1) = col_masks(c.ncols);
    for (i, a) in acc.iter().enumerate() {
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

/// `c[mr × c.ncols] (+)= x[mr × kc] · w[kc × 32]` with f32 weights.
///
/// # Safety
/// AVX-512F must be available; `x` rows (stride `ldx`) hold `kc` values, `w` holds
/// `kc * 32` values, `c` is valid for its tile.
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32<const MR: usize>(kc: usize, x: *const f32, ldx: usize, w: *const f32, c: Out) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut wp = w;
    let mut xp = x;
    for _ in 0..kc {
        let w0 = _mm512_loadu_ps(wp);
        let w1 = _mm512_loadu_ps(wp.add(16));
        for (i, a) in acc.iter_mut().enumerate() {
            let xb = _mm512_set1_ps(*xp.add(i * ldx));
            a[0] = _mm512_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm512_fmadd_ps(xb, w1, a[1]);
        }
        wp = wp.add(NR);
        xp = xp.add(1);
    }
    store_tile(&acc, c);
}

/// `c[mr × c.ncols] (+)= x[mr × 2·pairs] · w` with bf16 pairs on both sides.
///
/// # Safety
/// AVX-512F and AVX512_BF16 must be available; `x` rows (stride `ldx` bf16
/// values) hold `2 * pairs` values, `w` holds `pairs * 64` values, `c` as for
/// [`tile_f32`].
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16<const MR: usize>(pairs: usize, x: *const u16, ldx: usize, w: *const u16, c: Out) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut wp = w;
    let mut xp = x;
    for _ in 0..pairs {
        let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp as *const __m512i));
        let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(32) as *const __m512i));
        for (i, a) in acc.iter_mut().enumerate() {
            let xb: __m512bh = std::mem::transmute(_mm512_set1_epi32((xp.add(i * ldx) as *const i32).read_unaligned()));
            a[0] = _mm512_dpbf16_ps(a[0], xb, w0);
            a[1] = _mm512_dpbf16_ps(a[1], xb, w1);
        }
        wp = wp.add(2 * NR);
        xp = xp.add(2);
    }
    store_tile(&acc, c);
}

macro_rules! dispatch_mr {
    ($f:ident, $mr:expr, $($arg:expr),*) => {
        match $mr {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*),
            11 => $f::<11>($($arg),*),
            12 => $f::<12>($($arg),*),
            _ => unreachable!("tile of {} rows", $mr),
        }
    };
}

/// [`tile_f32`] for `mr` in `1..=MR_MAX` rows.
///
/// # Safety
/// As for [`tile_f32`].
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn gemm_tile_f32(mr: usize, kc: usize, x: *const f32, ldx: usize, w: *const f32, c: Out) {
    dispatch_mr!(tile_f32, mr, kc, x, ldx, w, c)
}

/// [`tile_bf16`] for `mr` in `1..=MR_MAX` rows.
///
/// # Safety
/// As for [`tile_bf16`].
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn gemm_tile_bf16(mr: usize, pairs: usize, x: *const u16, ldx: usize, w: *const u16, c: Out) {
    dispatch_mr!(tile_bf16, mr, pairs, x, ldx, w, c)
}

/// f16 panel slice (`[kc][32]`) to f32.
///
/// # Safety
/// AVX-512F must be available; `src` holds `kc * 32` values, `dst` room for as many.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn f16_panel_to_f32(src: *const u16, dst: *mut f32, kc: usize) {
    for i in 0..kc * NR / 16 {
        let h = _mm256_loadu_si256(src.add(16 * i) as *const __m256i);
        _mm512_storeu_ps(dst.add(16 * i), _mm512_cvtph_ps(h));
    }
}

/// bf16 panel slice in pairs (`[pairs][32][2]`) to f32 `[2·pairs][32]`.
///
/// # Safety
/// AVX-512F must be available; `src` holds `pairs * 64` values, `dst` room for as many.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn bf16_panel_to_f32(src: *const u16, dst: *mut f32, pairs: usize) {
    let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
    for q in 0..pairs {
        let s = src.add(q * 2 * NR) as *const __m512i;
        let d = dst.add(q * 2 * NR);
        // Lane j of a vector is (w[j][2q], w[j][2q+1]) with the even k in the low half.
        let v0 = _mm512_loadu_si512(s);
        let v1 = _mm512_loadu_si512(s.add(1));
        _mm512_storeu_ps(d, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0)));
        _mm512_storeu_ps(d.add(16), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1)));
        _mm512_storeu_ps(d.add(NR), _mm512_castsi512_ps(_mm512_and_si512(v0, hi)));
        _mm512_storeu_ps(d.add(NR + 16), _mm512_castsi512_ps(_mm512_and_si512(v1, hi)));
    }
}

/// f32 to bf16 (round to nearest even), `len` values.
///
/// # Safety
/// AVX-512F/BW/VL and AVX512_BF16 must be available; `src` and `dst` hold `len` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn f32_to_bf16(src: *const f32, dst: *mut u16, len: usize) {
    let mut i = 0;
    while i + 16 <= len {
        let b = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.add(i)));
        _mm256_storeu_si256(dst.add(i) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(b));
        i += 16;
    }
    if i < len {
        let m = ((1u32 << (len - i)) - 1) as u16;
        let b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src.add(i)));
        _mm256_mask_storeu_epi16(dst.add(i) as *mut i16, m, std::mem::transmute::<__m256bh, __m256i>(b));
    }
}

/// bf16 or f16 to f32, `len` values (activations of a half-precision model).
///
/// # Safety
/// AVX-512F must be available; `src` and `dst` hold `len` values.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn half_to_f32(src: *const u16, dst: *mut f32, len: usize, is_bf16: bool) {
    let mut i = 0;
    while i + 16 <= len {
        let h = _mm256_loadu_si256(src.add(i) as *const __m256i);
        let v = if is_bf16 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_cvtph_ps(h)
        };
        _mm512_storeu_ps(dst.add(i), v);
        i += 16;
    }
    for j in i..len {
        let b = *src.add(j);
        *dst.add(j) = if is_bf16 {
            half::bf16::from_bits(b).to_f32()
        } else {
            half::f16::from_bits(b).to_f32()
        };
    }
}
