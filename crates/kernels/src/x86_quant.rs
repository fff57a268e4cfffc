//! AVX-512 decode tiles over quantized panels (the layout of [`crate::quant`]):
//! the values are widened to f32 in registers and multiplied into per-group
//! accumulators; each group's scale and zero (u8 or f32) are applied once at its end, as
//! `acc += scale · (Σ q·x − zero · Σx)` with `Σx` per group from the driver. A panel
//! comes from DRAM once and at its packed size; the row tiles after the first find
//! it in L2.

use crate::operands::Out;
use crate::packed::NR;
use crate::quant::ZEROS;
use std::arch::x86_64::*;

/// Rows per tile: each row has three pairs of accumulators (the result, and the
/// group's even and odd k steps), which with the four widened weight vectors fill
/// the 32 zmm registers at 4 rows.
pub(crate) const MR_MAX_Q: usize = 4;

/// How far ahead a streaming tile prefetches its panel into L1 (as the float tiles do).
const PREFETCH_BYTES: usize = 2048;
/// How far ahead it also prefetches into L2. The decode tiles spend 6–12 vector
/// µops per 64 bytes of codes, so the out-of-order window covers fewer lines than
/// the float tiles' and the L1 prefetch alone leaves DRAM latency exposed: with this
/// one a 32000 × 1024 int8 weight streamed at 27–31 GB/s instead of 24 (probe 32),
/// 7168 × 1024 at 26 instead of 22.6, and int8 decode of the bench model went from
/// 62% to 76% of its roofline (4 and 16 KiB did no better; a burst of L2
/// prefetches at the start of each task's range did not help the small weights).
const L2_PREFETCH_BYTES: usize = 8192;

/// A streaming tile's prefetches for the line of values at `u` (in groups whose
/// header is `header` bytes): the line [`PREFETCH_BYTES`] ahead into L1, the one
/// [`L2_PREFETCH_BYTES`] ahead into L2.
#[inline(always)]
unsafe fn prefetch_line(u: *const u8, header: usize) {
    // Prefetches never fault, so running past the end of the buffer is harmless.
    _mm_prefetch::<_MM_HINT_T0>(u.wrapping_add(PREFETCH_BYTES + header) as *const i8);
    _mm_prefetch::<_MM_HINT_T1>(u.wrapping_add(L2_PREFETCH_BYTES + header) as *const i8);
}

/// A streaming tile's L1 prefetch at the start of the group at `grp`: the lines of
/// a `header` bytes long group header (scales and zeros) [`PREFETCH_BYTES`] ahead.
#[inline(always)]
unsafe fn prefetch_header(grp: *const u8, header: usize) {
    let ahead = grp.wrapping_add(PREFETCH_BYTES) as *const i8;
    for l in 0..header.div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l));
    }
}

/// The header of the group at `grp`: its 32 scales and 32 zeros as f32 (rows
/// 0..16, 16..32 of each), the zeros read as f32 where `float_zeros`, else as u8.
#[inline(always)]
unsafe fn group_header(grp: *const u8, float_zeros: bool) -> ([__m512; 2], [__m512; 2]) {
    let scales = [
        _mm512_loadu_ps(grp as *const f32),
        _mm512_loadu_ps(grp.add(64) as *const f32),
    ];
    let zeros = if float_zeros {
        [
            _mm512_loadu_ps(grp.add(ZEROS) as *const f32),
            _mm512_loadu_ps(grp.add(ZEROS + 64) as *const f32),
        ]
    } else {
        [widen_u8(grp.add(ZEROS)), widen_u8(grp.add(ZEROS + 16))]
    };
    (scales, zeros)
}

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

/// What a quantized decode tile reads: a panel of `groups` groups of `gs` k steps
/// (`group_bytes` apart, values `values` bytes into each, zeros f32 where
/// `float_zeros`, else u8) at `w`, the activation rows at `x` (stride `ldx`, of
/// `X`), and per row (stride `lds`) the groups' activation sums at `xs` (for the
/// VNNI tile: their scales, then their sums of codes).
#[derive(Clone, Copy)]
pub(crate) struct QTile<X> {
    pub groups: usize,
    pub gs: usize,
    pub group_bytes: usize,
    pub values: usize,
    pub float_zeros: bool,
    pub x: *const X,
    pub ldx: usize,
    pub xs: *const f32,
    pub lds: usize,
    pub w: *const u8,
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
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn qtile<const BITS: u32, const MR: usize, const PF: bool>(t: QTile<f32>, c: Out) {
    let QTile {
        groups,
        gs,
        group_bytes,
        values,
        float_zeros,
        x,
        ldx,
        xs: xsum,
        lds,
        w,
    } = t;
    let zero = _mm512_setzero_ps();
    let mut acc = [[zero; 2]; MR];
    let nibbles = nibble_table();
    // Bytes of values per k-step pair, and pairs per group.
    let pair_bytes = if BITS == 8 { 2 * NR } else { NR };
    let pairs = gs / 2;
    for g in 0..groups {
        let grp = w.add(g * group_bytes);
        let q = grp.add(values);
        let xg = x.add(g * gs);
        let mut even = [[zero; 2]; MR];
        let mut odd = [[zero; 2]; MR];
        if PF {
            prefetch_header(grp, values);
        }
        for t in 0..pairs {
            let u = q.add(t * pair_bytes);
            // One pair of int8 fills a line, of int4 half of one.
            if PF && (BITS == 8 || t % 2 == 0) {
                prefetch_line(u, values);
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
        let (s, z) = group_header(grp, float_zeros);
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
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm_tile_q(bits: u8, mr: usize, pf: bool, t: QTile<f32>, c: Out) {
    macro_rules! go {
        ($b:literal) => {
            match (mr, pf) {
                (1, false) => qtile::<$b, 1, false>(t, c),
                (2, false) => qtile::<$b, 2, false>(t, c),
                (3, false) => qtile::<$b, 3, false>(t, c),
                (4, false) => qtile::<$b, 4, false>(t, c),
                (1, true) => qtile::<$b, 1, true>(t, c),
                (2, true) => qtile::<$b, 2, true>(t, c),
                (3, true) => qtile::<$b, 3, true>(t, c),
                (4, true) => qtile::<$b, 4, true>(t, c),
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

/// Whether this CPU has what [`gemm_tile_q4_vnni`] runs on: AVX-512 VNNI and VBMI
/// (Ice Lake and later Xeons, AMD Zen 4 and later).
pub(crate) fn vnni_available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vbmi")
    })
}

/// `c[mr × c.ncols] = x[mr × groups·gs] · w` for one int4 panel, with activations
/// quantized to int8 per group (`x` in the order of [`crate::quant::quantize_rows_i8`]),
/// in `vpdpbusd`: 64 code × activation products per instruction, against 16 per
/// FMA in [`qtile`], whose nibble lookups and FMAs made it compute-bound at about
/// DRAM's rate on int4. Each 8 k steps of the panel (four byte units of 32 rows)
/// are transposed by two `vpermt2b` into one dword per row (the row's four units),
/// whose low nibbles are steps 0, 2, 4, 6 and high nibbles steps 1, 3, 5, 7; the
/// activations come in that order. Integer sums are exact, so a row's result does
/// not depend on its batch. Per group: `scale · xscale · (Σ q·xq − zero · Σxq)`.
///
/// # Safety
/// AVX-512F/BW, VNNI and VBMI must be available; `gs` is a multiple of 8; `x` rows
/// (stride `ldx`) hold `groups * gs` int8 values, `xs` rows (stride `lds`) the
/// groups' activation scales followed by their sums of codes; `w` an int4 panel in
/// the layout of [`crate::quant`]; `c` as for `store_tile`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn qtile_vnni4<const MR: usize, const PF: bool>(t: QTile<i8>, c: Out) {
    let QTile {
        groups,
        gs,
        group_bytes,
        values,
        float_zeros,
        x,
        ldx,
        xs,
        lds,
        w,
    } = t;
    let zero = _mm512_setzero_ps();
    let mut acc = [[zero; 2]; MR];
    let nibble = _mm512_set1_epi8(0x0f);
    // Byte 4j + u of the transposed vector is row j (16 + j for the second) of unit
    // u, of the 128 bytes of units 0..4 that the two loads hold.
    let index = |base: i32| {
        let mut b = [0i8; 64];
        for (i, v) in b.iter_mut().enumerate() {
            *v = (base + (i / 4) as i32 + 32 * (i % 4) as i32) as i8;
        }
        _mm512_loadu_si512(b.as_ptr() as *const _)
    };
    let (t0, t1) = (index(0), index(16));
    for g in 0..groups {
        let grp = w.add(g * group_bytes);
        let q = grp.add(values);
        let xg = x.add(g * gs);
        // Low and high nibbles apart: four dependency chains per row.
        let mut dots = [[_mm512_setzero_si512(); 4]; MR];
        if PF {
            prefetch_header(grp, values);
        }
        for e in 0..gs / 8 {
            let u = q.add(e * 4 * NR);
            if PF {
                prefetch_line(u, values);
                prefetch_line(u.wrapping_add(64), values);
            }
            let (a, b) = (
                _mm512_loadu_si512(u as *const _),
                _mm512_loadu_si512(u.add(64) as *const _),
            );
            let r0 = _mm512_permutex2var_epi8(a, t0, b);
            let r1 = _mm512_permutex2var_epi8(a, t1, b);
            let w = [
                _mm512_and_si512(r0, nibble),
                _mm512_and_si512(r1, nibble),
                _mm512_and_si512(_mm512_srli_epi16::<4>(r0), nibble),
                _mm512_and_si512(_mm512_srli_epi16::<4>(r1), nibble),
            ];
            for (i, d) in dots.iter_mut().enumerate() {
                let xp = xg.add(i * ldx + 8 * e) as *const i32;
                let lo = _mm512_set1_epi32(xp.read_unaligned());
                let hi = _mm512_set1_epi32(xp.add(1).read_unaligned());
                d[0] = _mm512_dpbusd_epi32(d[0], w[0], lo);
                d[1] = _mm512_dpbusd_epi32(d[1], w[1], lo);
                d[2] = _mm512_dpbusd_epi32(d[2], w[2], hi);
                d[3] = _mm512_dpbusd_epi32(d[3], w[3], hi);
            }
        }
        let (s, z) = group_header(grp, float_zeros);
        for (i, (a, d)) in acc.iter_mut().zip(&dots).enumerate() {
            let xscale = _mm512_set1_ps(*xs.add(i * lds + g));
            let xsum = _mm512_set1_ps(*xs.add(i * lds + groups + g));
            for h in 0..2 {
                let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(d[h], d[2 + h]));
                let dot = _mm512_fnmadd_ps(z[h], xsum, dot);
                a[h] = _mm512_fmadd_ps(dot, _mm512_mul_ps(s[h], xscale), a[h]);
            }
        }
    }
    crate::x86::store_tile(&acc, c);
}

/// [`qtile_vnni4`] for `mr` in `1..=MR_MAX_Q` rows, prefetching when `pf`.
///
/// # Safety
/// As for [`qtile_vnni4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
pub(crate) unsafe fn gemm_tile_q4_vnni(mr: usize, pf: bool, t: QTile<i8>, c: Out) {
    match (mr, pf) {
        (1, false) => qtile_vnni4::<1, false>(t, c),
        (2, false) => qtile_vnni4::<2, false>(t, c),
        (3, false) => qtile_vnni4::<3, false>(t, c),
        (4, false) => qtile_vnni4::<4, false>(t, c),
        (1, true) => qtile_vnni4::<1, true>(t, c),
        (2, true) => qtile_vnni4::<2, true>(t, c),
        (3, true) => qtile_vnni4::<3, true>(t, c),
        (4, true) => qtile_vnni4::<4, true>(t, c),
        _ => unreachable!("tile of {mr} rows"),
    }
}

/// Panel `w` of layout `l` (groups of an even number of k steps) dequantized to
/// bf16 in the packed bf16 panel layout, `[groups·gs/2][NR][2]`: pair
/// row r holds k steps 2r and 2r+1 of each row side by side, the B operand AMX
/// tiles read. Each value is `q·scale − zero·scale` in f32 (one FMA), rounded to
/// nearest even.
///
/// # Safety
/// AVX-512F/BW and AVX512_BF16 must be available; `w` is a panel of `l`, which has
/// `BITS` bits; `dst` holds `groups·gs·NR` values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn dequant_panel_bf16<const BITS: u32>(l: &crate::quant::Layout, w: *const u8, dst: *mut u16) {
    let (groups, gs, group_bytes, values) = (l.groups, l.group_size, l.group_bytes, l.values);
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
        prefetch_header(grp, values);
        let (s, z) = group_header(grp, l.float_zeros);
        let zs = [_mm512_mul_ps(z[0], s[0]), _mm512_mul_ps(z[1], s[1])];
        let q = grp.add(values);
        for t in 0..gs / 2 {
            let u = q.add(t * pair_bytes);
            if BITS == 8 || t % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(u.wrapping_add(PREFETCH_BYTES + values) as *const i8);
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
