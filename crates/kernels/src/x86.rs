//! AVX-512 microkernels: an `mr × 32` tile of the output from `mr` activation rows
//! and one weight panel slice, f32 FMA or bf16 `vdpbf16ps`, plus the conversions
//! that feed them. Callers check the CPU features first ([`crate::isa::Isa`]).

use crate::operands::Out;
use crate::packed::NR;
use std::arch::x86_64::*;

/// Largest number of activation rows one tile takes: 2·MR accumulators, two weight
/// vectors and a broadcast fit the 32 zmm registers.
pub(crate) const MR_MAX: usize = 12;
/// The largest f32 tile for decode-sized calls: 28 accumulators, the two weight
/// vectors and broadcasts folded into the FMAs as memory operands. A batch of 16
/// then runs as 14 + 2 rows instead of 8 + 8: the first tile of a panel is the
/// one that streams it from DRAM (the later ones find it in L2), and a 14-row
/// first tile keeps the cores computing on most of the batch while the weights
/// arrive (model sweep at m = 16: 47 → 42 ms). Not used for prefill, whose
/// blocking is sized for 12-row tiles.
pub(crate) const MR_MAX_STREAM: usize = 14;
/// The same for tiles that widen half-precision weights in registers: the
/// conversions need registers of their own (the compiler spilled accumulators at 10
/// and more rows).
pub(crate) const MR_MAX_WIDEN: usize = 8;

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
///
/// # Safety
/// The CPU has AVX-512F; `c.ptr` points to `MR` rows `c.ldc` apart whose first
/// `c.ncols` (at most 32) f32s are this tile's to write (and read, when
/// `c.accumulate`).
#[inline(always)]
pub(crate) unsafe fn store_tile<const MR: usize>(acc: &[[__m512; 2]; MR], c: Out) {
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

/// How far ahead of the tile a streaming tile prefetches its weight panel: far enough
/// that DRAM latency is covered at the rate one core consumes a panel, and past
/// the panel's end into the next one, which follows it in memory.
const PREFETCH_BYTES: usize = 2048;
/// A tile walks its k steps as this many interleaved segments (step j of each in
/// turn), so that a panel streaming from DRAM is read at as many places at once.
/// The L2 streamer runs a limited distance ahead of each stream it follows; when
/// the tile is busy computing (a batch of 14 rows takes ~15 cycles per 128-byte
/// step) one stream's lookahead does not cover DRAM latency and the loads stall
/// between the FMAs. Two streams per core overlapped them: the model sweep at
/// m = 16 went from 40 to 35 ms (f32), one-stream bf16 decode 13.7 to 12.6 ms.
/// Three did better still once a segment's prefetches ran on into the next panel
/// (sweep at m = 16 31.5 → 29.5 ms, bf16 m = 1 10.9 → 10.3 ms); four and five were
/// much worse at m = 16 (42–49 ms, not understood), six no better. The order is the
/// same for every row count, so a sequence's logits do not depend on the batch it
/// decodes in.
const STREAMS: usize = 3;
/// A weight storage format as a tile reads it: `STEP` k values of a panel's 32
/// rows per load, `BYTES` long, widened to f32 in registers.
pub(crate) trait Panel {
    const STEP: usize;
    const BYTES: usize;
    /// k value `s` (< `STEP`) of the step at `p`, as f32 for the two halves of the
    /// 32 rows.
    ///
    /// # Safety
    /// The CPU has the features the implementation is compiled for (AVX-512F, and
    /// BW for bf16); `p` points to `BYTES` readable bytes, one step of a panel.
    unsafe fn load(p: *const u8, s: usize) -> [__m512; 2];
    /// How far ahead a tile of `mr` rows prefetches.
    fn prefetch_bytes(_mr: usize) -> usize {
        PREFETCH_BYTES
    }
}

pub(crate) struct F32Panel;
pub(crate) struct F16Panel;
/// bf16 pairs along k, `[2][32]` per step.
pub(crate) struct Bf16Panel;

impl Panel for F32Panel {
    const STEP: usize = 1;
    const BYTES: usize = NR * 4;
    /// Few rows consume an f32 panel fastest of all, and there the L2 streamer
    /// already runs ahead: a nearer prefetch was 3–5% faster at m = 1 (linear
    /// sweep, 23.0–23.8 → 22.0–23.0 ms; 1.5 KiB was 15% slower).
    fn prefetch_bytes(mr: usize) -> usize {
        if mr < 8 {
            PREFETCH_BYTES / 2
        } else {
            PREFETCH_BYTES
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const u8, _: usize) -> [__m512; 2] {
        let p = p as *const f32;
        [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
    }
}

impl Panel for F16Panel {
    const STEP: usize = 1;
    const BYTES: usize = NR * 2;
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const u8, _: usize) -> [__m512; 2] {
        let p = p as *const __m256i;
        [
            _mm512_cvtph_ps(_mm256_loadu_si256(p)),
            _mm512_cvtph_ps(_mm256_loadu_si256(p.add(1))),
        ]
    }
}

impl Panel for Bf16Panel {
    const STEP: usize = 2;
    const BYTES: usize = 2 * NR * 2;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load(p: *const u8, s: usize) -> [__m512; 2] {
        let p = p as *const i16;
        // Lane j holds (w[j][2q], w[j][2q+1]), the even k in the low half: a bf16
        // is the top half of an f32. Each k loads on its own (the second load hits
        // L1) so that no register holds the raw pairs across the FMAs: with 24
        // accumulators there is none to spare.
        if s == 0 {
            [
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_loadu_si512(p as *const __m512i))),
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_loadu_si512(p.add(32) as *const __m512i))),
            ]
        } else {
            const ODD: __mmask32 = 0xaaaa_aaaa;
            [
                _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(ODD, p)),
                _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(ODD, p.add(32))),
            ]
        }
    }
}

/// `c[mr × c.ncols] (+)= x[mr × steps·STEP] · w` in f32 FMAs, weights widened from
/// `P`'s format, the steps in [`STREAMS`] interleaved segments; with `PF`,
/// prefetching each segment's stream [`Panel::prefetch_bytes`] ahead.
///
/// # Safety
/// AVX-512F/BW must be available; `x` rows (stride `ldx`) hold `steps * P::STEP`
/// values, `w` holds `steps * P::BYTES` bytes, `c` is valid for its tile.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile<P: Panel, const MR: usize, const PF: bool>(
    steps: usize,
    x: *const f32,
    ldx: usize,
    w: *const u8,
    c: Out,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let distance = P::prefetch_bytes(MR);
    let step = |acc: &mut [[__m512; 2]; MR], wp: *const u8, xp: *const f32, skip: usize| {
        if PF {
            // Prefetches never fault, so running past the end of the buffer is harmless.
            let ahead = wp.wrapping_add(distance + skip) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            if P::BYTES > 64 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
        }
        for s in 0..P::STEP {
            let ws = P::load(wp, s);
            for (i, a) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*xp.add(i * ldx + s));
                a[0] = _mm512_fmadd_ps(xb, ws[0], a[0]);
                a[1] = _mm512_fmadd_ps(xb, ws[1], a[1]);
            }
        }
    };
    let h = steps / STREAMS;
    // Near the end of its segment, each stream prefetches the same segment of the
    // panel that follows in memory (usually this task's next): past its own end it
    // would only reach the next segment of this panel, already streaming, and every
    // panel's later segments would start cold.
    let tail = (h * P::BYTES).saturating_sub(distance) / P::BYTES;
    let skip = (steps - h) * P::BYTES;
    for j in 0..h {
        let skip = if j >= tail { skip } else { 0 };
        for g in 0..STREAMS {
            let t = g * h + j;
            step(&mut acc, w.add(t * P::BYTES), x.add(t * P::STEP), skip);
        }
    }
    for t in STREAMS * h..steps {
        step(&mut acc, w.add(t * P::BYTES), x.add(t * P::STEP), 0);
    }
    store_tile(&acc, c);
}

/// `c[mr × c.ncols] (+)= x[mr × 2·pairs] · w` with bf16 pairs on both sides.
///
/// # Safety
/// AVX-512F and AVX512_BF16 must be available; `x` rows (stride `ldx` bf16
/// values) hold `2 * pairs` values, `w` holds `pairs * 64` values, `c` as for
/// [`tile`].
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_dp<const MR: usize, const PF: bool>(pairs: usize, x: *const u16, ldx: usize, w: *const u16, c: Out) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut wp = w;
    let mut xp = x;
    for _ in 0..pairs {
        if PF {
            // Prefetches never fault, so running past the end of the buffer is harmless.
            let ahead = (wp as *const i8).wrapping_add(PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
        }
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
    ($f:ident [$($g:ty)?], $mr:expr, $pf:expr, $($arg:expr),*) => {
        match ($mr, $pf) {
            (1, false) => $f::<$($g,)? 1, false>($($arg),*),
            (2, false) => $f::<$($g,)? 2, false>($($arg),*),
            (3, false) => $f::<$($g,)? 3, false>($($arg),*),
            (4, false) => $f::<$($g,)? 4, false>($($arg),*),
            (5, false) => $f::<$($g,)? 5, false>($($arg),*),
            (6, false) => $f::<$($g,)? 6, false>($($arg),*),
            (7, false) => $f::<$($g,)? 7, false>($($arg),*),
            (8, false) => $f::<$($g,)? 8, false>($($arg),*),
            (9, false) => $f::<$($g,)? 9, false>($($arg),*),
            (10, false) => $f::<$($g,)? 10, false>($($arg),*),
            (11, false) => $f::<$($g,)? 11, false>($($arg),*),
            (12, false) => $f::<$($g,)? 12, false>($($arg),*),
            (13, false) => $f::<$($g,)? 13, false>($($arg),*),
            (14, false) => $f::<$($g,)? 14, false>($($arg),*),
            (1, true) => $f::<$($g,)? 1, true>($($arg),*),
            (2, true) => $f::<$($g,)? 2, true>($($arg),*),
            (3, true) => $f::<$($g,)? 3, true>($($arg),*),
            (4, true) => $f::<$($g,)? 4, true>($($arg),*),
            (5, true) => $f::<$($g,)? 5, true>($($arg),*),
            (6, true) => $f::<$($g,)? 6, true>($($arg),*),
            (7, true) => $f::<$($g,)? 7, true>($($arg),*),
            (8, true) => $f::<$($g,)? 8, true>($($arg),*),
            (9, true) => $f::<$($g,)? 9, true>($($arg),*),
            (10, true) => $f::<$($g,)? 10, true>($($arg),*),
            (11, true) => $f::<$($g,)? 11, true>($($arg),*),
            (12, true) => $f::<$($g,)? 12, true>($($arg),*),
            (13, true) => $f::<$($g,)? 13, true>($($arg),*),
            (14, true) => $f::<$($g,)? 14, true>($($arg),*),
            _ => unreachable!("tile of {} rows", $mr),
        }
    };
}

/// [`tile`] for `mr` in `1..=MR_MAX_STREAM` rows, prefetching when `pf`.
///
/// # Safety
/// As for [`tile`].
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm_tile<P: Panel>(
    mr: usize,
    pf: bool,
    steps: usize,
    x: *const f32,
    ldx: usize,
    w: *const u8,
    c: Out,
) {
    dispatch_mr!(tile[P], mr, pf, steps, x, ldx, w, c)
}

/// [`tile_dp`] for `mr` in `1..=MR_MAX_STREAM` rows, prefetching when `pf`.
///
/// # Safety
/// As for [`tile_dp`].
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn gemm_tile_dp(mr: usize, pf: bool, pairs: usize, x: *const u16, ldx: usize, w: *const u16, c: Out) {
    dispatch_mr!(tile_dp [], mr, pf, pairs, x, ldx, w, c)
}

/// Widens `steps` steps of a half-precision panel (`P` is [`F16Panel`] or
/// [`Bf16Panel`]) to f32 `[k][32]`: the large-m path converts a panel's block once
/// and runs every tile of the activation block over it.
///
/// # Safety
/// AVX-512F/BW must be available; `src` holds `steps * P::BYTES` bytes, `dst` room
/// for `steps * P::STEP * 32` values.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn widen_panel<P: Panel>(src: *const u8, dst: *mut f32, steps: usize) {
    for q in 0..steps {
        for s in 0..P::STEP {
            let v = P::load(src.add(q * P::BYTES), s);
            let d = dst.add((q * P::STEP + s) * NR);
            _mm512_storeu_ps(d, v[0]);
            _mm512_storeu_ps(d.add(16), v[1]);
        }
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
