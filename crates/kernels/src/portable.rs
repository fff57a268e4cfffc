//! Plain-Rust tiles and conversions over the same packed layout: the path on CPUs
//! without AVX-512 (and on other architectures), and the SIMD path's cross-check.

use crate::operands::Out;
use crate::packed::NR;
use half::{bf16, f16};

/// Rows per tile; the arrays of accumulators stay small enough to live in registers
/// once the compiler vectorises the column loop.
pub(crate) const MR_MAX: usize = 4;

/// `c[mr × c.ncols] (+)= x[mr × kc] · w[kc × 32]`.
///
/// # Safety
/// `x` rows (stride `ldx`) hold `kc` values, `w` holds `kc * 32` values, `c` is
/// valid for its tile.
#[inline(always)]
unsafe fn tile<const MR: usize>(kc: usize, x: *const f32, ldx: usize, w: *const f32, c: Out) {
    let mut acc = [[0f32; NR]; MR];
    let w = std::slice::from_raw_parts(w, kc * NR);
    for (kk, wr) in w.chunks_exact(NR).enumerate() {
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = *x.add(i * ldx + kk);
            for (aj, wj) in a.iter_mut().zip(wr) {
                *aj += xv * wj;
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let row = std::slice::from_raw_parts_mut(c.ptr.add(i * c.ldc), c.ncols);
        for (o, v) in row.iter_mut().zip(a) {
            *o = if c.accumulate { *o + v } else { *v };
        }
    }
}

/// [`tile`] for `mr` in `1..=MR_MAX` rows.
///
/// # Safety
/// As for [`tile`].
pub(crate) unsafe fn gemm_tile_f32(mr: usize, kc: usize, x: *const f32, ldx: usize, w: *const f32, c: Out) {
    match mr {
        1 => tile::<1>(kc, x, ldx, w, c),
        2 => tile::<2>(kc, x, ldx, w, c),
        3 => tile::<3>(kc, x, ldx, w, c),
        4 => tile::<4>(kc, x, ldx, w, c),
        _ => unreachable!("tile of {mr} rows"),
    }
}

/// f16 panel slice (`[kc][32]`) to f32.
pub(crate) fn f16_panel_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16::from_bits(s).to_f32();
    }
}

/// bf16 panel slice in pairs (`[pairs][32][2]`) to f32 `[2·pairs][32]`.
pub(crate) fn bf16_panel_to_f32(src: &[u16], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(2 * NR).zip(dst.chunks_exact_mut(2 * NR)) {
        for j in 0..NR {
            d[j] = bf16::from_bits(s[2 * j]).to_f32();
            d[NR + j] = bf16::from_bits(s[2 * j + 1]).to_f32();
        }
    }
}
