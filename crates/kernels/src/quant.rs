//! Weight-only quantized weights (int8, int4): the checks on the loaders' data, the
//! packed group layout, and its plain-Rust dequantization (the portable path, the
//! prefill path's f32 blocks and row lookups). The AVX-512 decode tiles that read
//! the layout in registers are in `x86_quant`.
//!
//! A panel of [`NR`] rows is a run of k groups, each
//! `[scales: NR × f32][zeros: NR × u8 or f32][values: units × NR bytes]`: the values
//! of a group follow its scales and zeros, so that decode streams one contiguous run
//! per panel, as for float weights. A unit is one k step of the 32 rows for int8,
//! and two for int4 (row j's byte holds k step 2t in its low nibble and 2t+1 in its
//! high one; an odd group's last unit leaves the high nibbles zero). Zeros are u8
//! where they are all integers in `[0, 256)`, as GPTQ's, AWQ's and symmetric
//! formats' are (a quarter of the f32 zeros' bytes: int4 groups of 32 read 31% more
//! than their values instead of 50%), and f32 where one is not: the min/max formats
//! (llama.cpp's Q4_1 and K quants, `w = d·q + m`) have `zero = −m/d`. Padding rows
//! of the last panel have scale 0 and contribute 0.

use crate::packed::{AlignedBuf, PackError, NR};
use rayon::prelude::*;

/// Offset of a group's zeros from its start.
pub(crate) const ZEROS: usize = NR * 4;
/// Offset of a group's values from its start with u8 zeros, and with f32 zeros
/// (multiples of 32, so that no unit straddles a cache line).
const VALUES_U8: usize = NR * 5;
const VALUES_F32: usize = NR * 8;

/// The group layout of one quantized weight.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub(crate) bits: u8,
    pub(crate) group_size: usize,
    /// Groups per row (`k / group_size`).
    pub(crate) groups: usize,
    /// Bytes of one panel's group: header and values.
    pub(crate) group_bytes: usize,
    /// Whether the zeros are f32 (else u8).
    pub(crate) float_zeros: bool,
    /// Offset of a group's values from its start: the header's bytes.
    pub(crate) values: usize,
    /// Whether calls of 5+ rows may multiply in bf16 (see
    /// [`crate::PackedMatrix::with_bf16_compute`]).
    pub(crate) bf16_compute: bool,
}

impl Layout {
    /// Checks the loaders' data against the meaning of
    /// [`crate::WeightData::Quantized`].
    pub(crate) fn validate(
        n: usize,
        k: usize,
        bits: u8,
        group_size: usize,
        q: &[u8],
        zeros: &[f32],
        scales: &[f32],
    ) -> Result<Layout, PackError> {
        let err = |s: String| Err(PackError(format!("quantized [{n}, {k}] weight: {s}")));
        if bits != 8 && bits != 4 {
            return err(format!("{bits} bits (8 or 4 are supported)"));
        }
        if group_size == 0 || !k.is_multiple_of(group_size) {
            return err(format!("group size {group_size} does not divide k = {k}"));
        }
        let groups = k / group_size;
        if Some(q.len()) != n.checked_mul(k) {
            return err(format!("{} values, not n·k = {}", q.len(), n * k));
        }
        if zeros.len() != n * groups || scales.len() != n * groups {
            return err(format!(
                "{} zeros and {} scales, not n·groups = {n}·{groups} = {}",
                zeros.len(),
                scales.len(),
                n * groups
            ));
        }
        let limit = 1u16 << bits;
        if let Some(i) = q.iter().position(|&v| u16::from(v) >= limit) {
            return err(format!(
                "value {} at row {}, column {} is not below 2^{bits}",
                q[i],
                i / k,
                i % k
            ));
        }
        for (what, v) in [("zero", zeros), ("scale", scales)] {
            if let Some(i) = v.iter().position(|v| !v.is_finite()) {
                return err(format!(
                    "{what} {} of row {}, group {} is not finite",
                    v[i],
                    i / groups,
                    i % groups
                ));
            }
        }
        let float_zeros = !zeros.iter().all(|&z| z == z.round() && (0.0..256.0).contains(&z));
        let values = if float_zeros { VALUES_F32 } else { VALUES_U8 };
        let units = if bits == 8 { group_size } else { group_size.div_ceil(2) };
        Ok(Layout {
            bits,
            group_size,
            groups,
            group_bytes: values + units * NR,
            float_zeros,
            values,
            bf16_compute: false,
        })
    }

    pub(crate) fn panel_bytes(&self) -> usize {
        self.groups * self.group_bytes
    }

    /// Value `t` (< group size) of row `j` in the group starting at `grp`.
    #[inline(always)]
    fn value(&self, grp: &[u8], t: usize, j: usize) -> u8 {
        if self.bits == 8 {
            grp[self.values + t * NR + j]
        } else {
            (grp[self.values + (t / 2) * NR + j] >> (4 * (t % 2))) & 15
        }
    }

    /// Row `j` of panel `p` dequantized into `out` (k values).
    pub(crate) fn row_f32(&self, data: &[u8], p: usize, j: usize, out: &mut [f32]) {
        let panel = &data[p * self.panel_bytes()..(p + 1) * self.panel_bytes()];
        for (grp, o) in panel
            .chunks_exact(self.group_bytes)
            .zip(out.chunks_exact_mut(self.group_size))
        {
            let (s, b) = self.scale_bias(grp, j);
            for (t, o) in o.iter_mut().enumerate() {
                *o = f32::from(self.value(grp, t, j)) * s + b;
            }
        }
    }

    /// k steps `k0..k0+kc` of panel `p` dequantized to f32 `[kc][NR]` in `dst`: the
    /// portable path and the prefill path multiply these blocks like f32 weights.
    /// `simd` (not on the portable path) compiles the loop for AVX-512 where the
    /// CPU has it; the results are the same bits either way.
    pub(crate) fn dequant_block(&self, simd: bool, data: *const u8, p: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd && crate::isa::avx512() {
            // SAFETY: the features were just checked.
            return unsafe { self.dequant_block_avx512(data, p, k0, kc, dst) };
        }
        let _ = simd;
        self.dequant_block_plain(data, p, k0, kc, dst)
    }

    /// [`Layout::dequant_block`] compiled for AVX-512, so that the same loop
    /// vectorises 16 rows wide.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    unsafe fn dequant_block_avx512(&self, data: *const u8, p: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        self.dequant_block_plain(data, p, k0, kc, dst)
    }

    #[inline(always)]
    fn dequant_block_plain(&self, data: *const u8, p: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        // SAFETY: `data` is the packed buffer of a matrix with this layout and `p`
        // one of its panels, which spans `panel_bytes` bytes.
        let panel = unsafe { std::slice::from_raw_parts(data.add(p * self.panel_bytes()), self.panel_bytes()) };
        let mut kk = k0;
        let mut rows = dst[..kc * NR].chunks_exact_mut(NR);
        while kk < k0 + kc {
            let g = kk / self.group_size;
            let grp = &panel[g * self.group_bytes..(g + 1) * self.group_bytes];
            let mut s = [0f32; NR];
            let mut b = [0f32; NR];
            for j in 0..NR {
                (s[j], b[j]) = self.scale_bias(grp, j);
            }
            let end = ((g + 1) * self.group_size).min(k0 + kc);
            for t in kk - g * self.group_size..end - g * self.group_size {
                let d = rows.next().expect("dst holds kc steps");
                for j in 0..NR {
                    d[j] = f32::from(self.value(grp, t, j)) * s[j] + b[j];
                }
            }
            kk = end;
        }
    }
}

impl Layout {
    /// Panel `p` dequantized to bf16 pairs `[ld/2][NR][2]` in `dst` (the packed bf16
    /// panel layout), zero from k step `k` to `ld` (even): the B operand of the AMX
    /// tiles, built once per panel and call.
    pub(crate) fn dequant_panel_bf16(&self, data: *const u8, p: usize, k: usize, ld: usize, dst: &mut [u16]) {
        assert!(
            dst.len() >= ld * NR && ld >= k && ld.is_multiple_of(2),
            "bf16 panel of {ld} k steps"
        );
        #[cfg(target_arch = "x86_64")]
        if self.group_size.is_multiple_of(2)
            && crate::isa::avx512()
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            // SAFETY: the features were just checked; `data` is the packed buffer
            // of a matrix with this layout and `p` one of its panels; `dst` holds
            // the panel's k = groups·group_size steps (ld >= k).
            unsafe {
                let panel = data.add(p * self.panel_bytes());
                let d = dst.as_mut_ptr();
                if self.bits == 8 {
                    crate::x86_quant::dequant_panel_bf16::<8>(self, panel, d)
                } else {
                    crate::x86_quant::dequant_panel_bf16::<4>(self, panel, d)
                }
            }
            dst[k * NR..ld * NR].fill(0);
            return;
        }
        // Odd groups put a pair's two steps in different groups: one value at a time.
        // SAFETY: as above, the panel spans `panel_bytes` bytes of `data`.
        let panel = unsafe { std::slice::from_raw_parts(data.add(p * self.panel_bytes()), self.panel_bytes()) };
        dst[..ld * NR].fill(0);
        for (g, grp) in panel.chunks_exact(self.group_bytes).enumerate() {
            for j in 0..NR {
                let (s, b) = self.scale_bias(grp, j);
                for t in 0..self.group_size {
                    let kk = g * self.group_size + t;
                    let v = f32::from(self.value(grp, t, j)).mul_add(s, b);
                    dst[(kk / 2) * 2 * NR + 2 * j + kk % 2] = half::bf16::from_f32(v).to_bits();
                }
            }
        }
    }
}

impl Layout {
    /// Row `j`'s scale and `-zero·scale` in the group `grp`.
    #[inline(always)]
    fn scale_bias(&self, grp: &[u8], j: usize) -> (f32, f32) {
        let f32_at = |o: usize| f32::from_le_bytes(grp[o..o + 4].try_into().expect("4 bytes"));
        let s = f32_at(4 * j);
        let z = if self.float_zeros {
            f32_at(ZEROS + 4 * j)
        } else {
            f32::from(grp[ZEROS + j])
        };
        (s, -(z * s))
    }
}

/// Packs validated data into the group layout.
pub(crate) fn pack(l: &Layout, n: usize, k: usize, q: &[u8], zeros: &[f32], scales: &[f32]) -> AlignedBuf {
    let panels = n.div_ceil(NR);
    let panel_bytes = l.panel_bytes();
    let mut data = AlignedBuf::zeroed(panels * panel_bytes);
    let dst: &mut [u8] = data.as_mut_slice();
    // As for float weights: a memory-bound pass over the model, over the pool.
    dst.par_chunks_mut(panel_bytes.max(1))
        .enumerate()
        .for_each(|(p, panel)| {
            for j in 0..NR.min(n - p * NR) {
                let i = p * NR + j;
                for (g, grp) in panel.chunks_exact_mut(l.group_bytes).enumerate() {
                    grp[4 * j..4 * j + 4].copy_from_slice(&scales[i * l.groups + g].to_le_bytes());
                    let z = zeros[i * l.groups + g];
                    if l.float_zeros {
                        grp[ZEROS + 4 * j..ZEROS + 4 * j + 4].copy_from_slice(&z.to_le_bytes());
                    } else {
                        grp[ZEROS + j] = z as u8;
                    }
                    let row = &q[i * k + g * l.group_size..i * k + (g + 1) * l.group_size];
                    for (t, &v) in row.iter().enumerate() {
                        if l.bits == 8 {
                            grp[l.values + t * NR + j] = v;
                        } else {
                            grp[l.values + (t / 2) * NR + j] |= v << (4 * (t % 2));
                        }
                    }
                }
            }
        });
    data
}

/// Asymmetric min/max quantization of row-major `[n, k]` f32 values in groups of
/// `group_size` (benchmarks and probes that make their weights in f32): returns
/// `(q, zeros, scales)` as [`crate::WeightData::Quantized`] takes them.
pub(crate) fn quantize(w: &[f32], n: usize, k: usize, bits: u8, group_size: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    assert_eq!(w.len(), n * k, "weight data is not [{n}, {k}]");
    let top = ((1u32 << bits) - 1) as f32;
    let (mut q, mut zeros, mut scales) = (Vec::with_capacity(n * k), Vec::new(), Vec::new());
    for g in w.chunks(group_size.max(1)) {
        let (lo, hi) = g.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        let s = if hi > lo { (hi - lo) / top } else { 1.0 };
        let z = (-lo / s).round().clamp(0.0, top);
        q.extend(g.iter().map(|&v| (v / s + z).round().clamp(0.0, top) as u8));
        zeros.push(z);
        scales.push(s);
    }
    (q, zeros, scales)
}

/// Sums of each activation row over each k group (`sums[i * groups + g]`): the
/// decode tiles take the zeros out once per group as `zero · Σx`.
pub(crate) fn group_sums(x: *const f32, ldx: usize, m: usize, k: usize, group_size: usize, sums: &mut [f32]) {
    let groups = k / group_size;
    for i in 0..m {
        // SAFETY: the caller's x holds m rows of k values, `ldx` apart.
        let row = unsafe { std::slice::from_raw_parts(x.add(i * ldx), k) };
        for (s, g) in sums[i * groups..(i + 1) * groups]
            .iter_mut()
            .zip(row.chunks_exact(group_size))
        {
            // In f64: the zero term is subtracted from a sum of the same size, and
            // its rounding should not add to that of the products.
            *s = g.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
        }
    }
}

/// Activation rows `x` (`[m][k]`, f32) quantized to int8 for the VNNI int4 tiles:
/// per row and k group a symmetric scale `max |x| / 127`, codes rounded to nearest,
/// laid out per 8 k steps as steps 0, 2, 4, 6 then 1, 3, 5, 7 (the order of a panel's
/// transposed nibbles). `xs` rows hold the groups' scales, then their sums of codes.
pub(crate) fn quantize_rows_i8(x: &[f32], m: usize, k: usize, group_size: usize, xq: &mut [i8], xs: &mut [f32]) {
    debug_assert!(group_size.is_multiple_of(8) && k.is_multiple_of(group_size));
    let groups = k / group_size;
    for i in 0..m {
        let (row, codes) = (&x[i * k..(i + 1) * k], &mut xq[i * k..(i + 1) * k]);
        let (scales, sums) = xs[i * 2 * groups..(i + 1) * 2 * groups].split_at_mut(groups);
        for (g, (xg, cg)) in row
            .chunks_exact(group_size)
            .zip(codes.chunks_exact_mut(group_size))
            .enumerate()
        {
            let max = xg.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = max / 127.0;
            let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
            let mut sum = 0i32;
            for (x8, c8) in xg.chunks_exact(8).zip(cg.chunks_exact_mut(8)) {
                for (s, &v) in x8.iter().enumerate() {
                    let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                    sum += i32::from(q);
                    c8[s / 2 + 4 * (s % 2)] = q;
                }
            }
            scales[g] = scale;
            sums[g] = sum as f32;
        }
    }
}
