//! llama.cpp's block formats read into [`QuantizedTensor`]s without loss, so that a
//! quantized GGUF runs on the quantized kernels at close to its own size instead of
//! dequantized to floats: the 4-bit ones (Q4_0, Q4_1, Q4_K) as int4 in groups of 32,
//! the 5- and 8-bit ones (Q5_0, Q5_1, Q8_0) as int8 in groups of 32, Q6_K as int8 in
//! its groups of 16. The min/max formats (`w = d·q + m`) keep `m` as a float zero
//! `−m/d`. Q2_K, Q3_K and Q5_K are not read here (they load as floats).

use crate::quantized::QuantizedTensor;
use anyhow::{ensure, Result};
use candle_core::quantized::GgmlDType;
use half::f16;

/// The bits and group size a block type unpacks to, when it unpacks without loss.
pub fn native(dtype: GgmlDType) -> Option<(u8, usize)> {
    use GgmlDType::*;
    match dtype {
        Q4_0 | Q4_1 | Q4K => Some((4, 32)),
        Q5_0 | Q5_1 | Q8_0 => Some((8, 32)),
        Q6K => Some((8, 16)),
        _ => None,
    }
}

/// The row-major `[n, k]` tensor of `dtype` blocks in `data` (k runs along the
/// blocks, as GGUF stores a matrix's rows); `None` for a type [`native`] refuses.
pub fn unpack(dtype: GgmlDType, data: &[u8], n: usize, k: usize) -> Result<Option<QuantizedTensor>> {
    let Some((bits, group_size)) = native(dtype) else {
        return Ok(None);
    };
    let (block, size) = (dtype.block_size(), dtype.type_size());
    ensure!(
        k.is_multiple_of(block) && data.len() == n * k / block * size,
        "{n}×{k} {dtype:?} values in {} bytes (blocks of {block} in {size} bytes)",
        data.len()
    );
    let groups = n * k / group_size;
    let mut t = QuantizedTensor {
        bits,
        group_size,
        n,
        k,
        q: vec![0; n * k],
        zeros: Vec::with_capacity(groups),
        scales: Vec::with_capacity(groups),
    };
    let per_block = block / group_size;
    for (bytes, codes) in data.chunks_exact(size).zip(t.q.chunks_exact_mut(block)) {
        let mut groups = [(0f32, 0f32); 16];
        let groups = &mut groups[..per_block];
        unpack_block(dtype, bytes, codes, groups);
        for (g, &(scale, zero)) in groups.iter().enumerate() {
            if scale == 0.0 && zero != 0.0 {
                // A constant group (`d = 0`, `w = m`): codes 0, one step of size m.
                codes[g * group_size..(g + 1) * group_size].fill(0);
                t.scales.push(-zero);
                t.zeros.push(-1.0);
            } else {
                t.scales.push(scale);
                t.zeros.push(zero);
            }
        }
    }
    Ok(Some(t))
}

/// A group's `(scale, zero)` for `w = d·q + m`; `(0, −m)` when `d` is 0 (the caller
/// turns that into codes 0 with scale `m`, zero −1).
fn min_form(d: f32, m: f32) -> (f32, f32) {
    if d == 0.0 {
        (0.0, -m)
    } else {
        (d, -m / d)
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One block's codes, and `(scale, zero)` per group (llama.cpp's `ggml-quants.c`
/// says what each byte means).
fn unpack_block(dtype: GgmlDType, b: &[u8], codes: &mut [u8], groups: &mut [(f32, f32)]) {
    use GgmlDType::*;
    // Q4_0 and Q4_1 (and Q5's low bits): element j in the low nibble of byte j,
    // element j + 16 in its high nibble.
    let nibbles = |qs: &[u8], codes: &mut [u8]| {
        for (j, &v) in qs[..16].iter().enumerate() {
            codes[j] = v & 15;
            codes[j + 16] = v >> 4;
        }
    };
    // Q5: the fifth bit of element j is bit j of `qh`.
    let fifth_bits = |qh: &[u8], codes: &mut [u8]| {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for (j, c) in codes[..32].iter_mut().enumerate() {
            *c |= (((qh >> j) & 1) as u8) << 4;
        }
    };
    match dtype {
        Q8_0 => {
            for (c, &v) in codes.iter_mut().zip(&b[2..34]) {
                *c = (v as i8 as i16 + 128) as u8;
            }
            groups[0] = (f16_at(b, 0), 128.0);
        }
        Q4_0 => {
            nibbles(&b[2..], codes);
            groups[0] = (f16_at(b, 0), 8.0);
        }
        Q4_1 => {
            nibbles(&b[4..], codes);
            groups[0] = min_form(f16_at(b, 0), f16_at(b, 2));
        }
        Q5_0 => {
            nibbles(&b[6..], codes);
            fifth_bits(&b[2..6], codes);
            groups[0] = (f16_at(b, 0), 16.0);
        }
        Q5_1 => {
            nibbles(&b[8..], codes);
            fifth_bits(&b[4..8], codes);
            groups[0] = min_form(f16_at(b, 0), f16_at(b, 2));
        }
        Q4K => {
            // d, dmin, 12 bytes of 6-bit scales and mins for 8 groups, 128 bytes of
            // nibbles: each 32 bytes hold two groups, low nibbles then high.
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let sm = &b[4..16];
            for (c, qs) in b[16..144].chunks_exact(32).enumerate() {
                for (j, &v) in qs.iter().enumerate() {
                    codes[64 * c + j] = v & 15;
                    codes[64 * c + 32 + j] = v >> 4;
                }
            }
            for (g, out) in groups.iter_mut().enumerate() {
                let (sc, m) = if g < 4 {
                    (sm[g] & 63, sm[g + 4] & 63)
                } else {
                    (
                        (sm[g + 4] & 15) | ((sm[g - 4] >> 6) << 4),
                        (sm[g + 4] >> 4) | ((sm[g] >> 6) << 4),
                    )
                };
                *out = min_form(d * f32::from(sc), -(dmin * f32::from(m)));
            }
        }
        Q6K => {
            // 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 i8 scales, d; per
            // half of 128 values, byte l of the highs holds bits 4-5 of values l,
            // l + 32, l + 64 and l + 96 (the lows: l and l + 64 in byte l, l + 32 and
            // l + 96 in byte l + 32). Values are 6-bit with zero 32.
            let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for h in 0..2 {
                let (ql, qh, codes) = (&ql[64 * h..], &qh[32 * h..], &mut codes[128 * h..]);
                for l in 0..32 {
                    codes[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
                    codes[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                    codes[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    codes[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            for (out, &s) in groups.iter_mut().zip(sc) {
                *out = (d * f32::from(s as i8), 32.0);
            }
        }
        _ => unreachable!("native() refuses {dtype:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every native type unpacks to what candle dequantizes the same bytes to, on
    /// weights with a wide range, constant groups and all-positive groups.
    #[test]
    fn native_blocks_unpack_to_what_they_dequantize_to() {
        let (n, k) = (6, 512);
        let mut w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.45) * 0.08)
            .collect();
        w[..64].iter_mut().for_each(|v| *v = 0.0125);
        w[k..2 * k].iter_mut().for_each(|v| *v = v.abs() + 0.01);
        w[2 * k..3 * k].iter_mut().for_each(|v| *v *= 40.0);
        let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        use GgmlDType::*;
        for dtype in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q6K] {
            let qt = QTensor::quantize(&t, dtype).unwrap();
            let want = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let bytes = qt.data().unwrap();
            let u = unpack(dtype, &bytes, n, k).unwrap().unwrap();
            u.validate("test").unwrap();
            assert_eq!((u.bits, u.group_size), native(dtype).unwrap());
            // Within rounding of the row's largest value: min/max groups compute
            // `(q − (−m/d))·d`, not `d·q + m`.
            for (i, (row, want)) in u.dequantize().chunks(k).zip(want.chunks(k)).enumerate() {
                let tol = 1e-6 * want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (j, (&a, &b)) in row.iter().zip(want).enumerate() {
                    assert!(
                        (a - b).abs() <= tol,
                        "{dtype:?} row {i} column {j}: unpacked {a}, dequantized {b}"
                    );
                }
            }
        }
        for dtype in [Q2K, Q3K, Q5K, F16, F32] {
            assert!(native(dtype).is_none());
            assert!(unpack(dtype, &[], 0, 256).unwrap().is_none());
        }
        // Bytes that are not whole blocks of the tensor are an error, not a panic.
        assert!(unpack(Q4_0, &[0; 17], 1, 32).is_err());
    }
}
