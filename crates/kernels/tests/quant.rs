//! Quantized (int8, int4) weights on every ISA this CPU has, against an f64
//! dequantize-and-multiply reference: odd shapes, group sizes 32, 128 and per
//! channel, random zero points, f32 and bf16 activations, m on both sides of the
//! tile heights and of the decode/prefill switch. Also the checks on bad data, and
//! (ignored) the decode speed against float weights and the read-bandwidth probe.

mod common;

use half::bf16;
use sirocco_kernels::{
    matmul, matmul_input, matmul_to_vec, matmul_with, probe, Input, Isa, PackedMatrix, WeightData, WeightDtype,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn f32(&mut self) -> f32 {
        (self.next() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}

/// Random quantized data: values uniform in `[0, 2^bits)`, zeros integers in that
/// range or (`float_zeros`, as min/max formats have) any value from 2 below it to
/// 2 above, scales in (0.001, 0.02].
struct Quant {
    bits: u8,
    group_size: usize,
    q: Vec<u8>,
    zeros: Vec<f32>,
    scales: Vec<f32>,
}

impl Quant {
    fn random(n: usize, k: usize, bits: u8, group_size: usize, seed: u64) -> Quant {
        Self::random_zeros(n, k, bits, group_size, seed, false)
    }

    fn random_zeros(n: usize, k: usize, bits: u8, group_size: usize, seed: u64, float_zeros: bool) -> Quant {
        let mut r = Rng(seed);
        let top = 1u64 << bits;
        let groups = n * (k / group_size);
        let mut zero = || {
            if float_zeros {
                (r.f32() * 0.5 + 0.5) * (top as f32 + 4.0) - 2.0
            } else {
                (r.next() % top) as f32
            }
        };
        let zeros = (0..groups).map(|_| zero()).collect();
        Quant {
            bits,
            group_size,
            q: (0..n * k).map(|_| (r.next() % top) as u8).collect(),
            zeros,
            scales: (0..groups).map(|_| 0.001 + 0.019 * (r.f32() * 0.5 + 0.5)).collect(),
        }
    }

    fn data(&self) -> WeightData<'_> {
        WeightData::Quantized {
            bits: self.bits,
            group_size: self.group_size,
            q: &self.q,
            zeros: &self.zeros,
            scales: &self.scales,
        }
    }

    fn dequantized(&self, n: usize, k: usize) -> Vec<f64> {
        let groups = k / self.group_size;
        (0..n * k)
            .map(|e| {
                let (i, j) = (e / k, e % k);
                let g = i * groups + j / self.group_size;
                (self.q[e] as f64 - self.zeros[g] as f64) * self.scales[g] as f64
            })
            .collect()
    }
}

fn reference(x: &[f32], w: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk]).sum();
        }
    }
    out
}

/// Within `1e-4` of the largest output's magnitude.
fn check(got: &[f32], want: &[f64], what: &str) {
    let scale = want.iter().fold(0f64, |a, v| a.max(v.abs())).max(1e-30);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= 1e-4 * scale,
            "{what}: out[{i}] = {g}, want {w} (err {err}, max |out| {scale})"
        );
    }
}

const SHAPES: &[(usize, usize)] = &[(45, 96), (77, 256), (130, 512)];
const MS: &[usize] = &[1, 3, 16, 37, 100];

#[test]
fn quantized_weights_match_the_reference_on_every_isa() {
    for &(n, k) in SHAPES {
        for bits in [8u8, 4] {
            for (gs, fz) in [(32, false), (32, true), (128, false), (k, false), (k, true)] {
                if k % gs != 0 {
                    continue;
                }
                let qd = Quant::random_zeros(n, k, bits, gs, (n * 7 + k + gs + bits as usize) as u64, fz);
                let pm = PackedMatrix::new(qd.data(), n, k);
                assert_eq!(
                    pm.dtype(),
                    if bits == 8 {
                        WeightDtype::Int8
                    } else {
                        WeightDtype::Int4
                    }
                );
                assert_eq!(pm.group_size(), Some(gs));
                let w = qd.dequantized(n, k);
                for &m in MS {
                    let mut r = Rng(m as u64 * 13 + k as u64);
                    let x: Vec<f32> = (0..m * k).map(|_| r.f32()).collect();
                    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                    let xb32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
                    let want = reference(&x, &w, m, n, k);
                    let want_b = reference(&xb32, &w, m, n, k);
                    let what = |isa: &str, xd: &str| format!("int{bits} g{gs} fz {fz} {isa} x-{xd} m{m} n{n} k{k}");
                    for isa in Isa::available() {
                        let mut out = vec![f32::NAN; m * n];
                        matmul_with(isa, Input::F32(&x), m, &pm, &mut out);
                        check(&out, &want, &what(&format!("{isa:?}"), "f32"));
                        let mut out = vec![f32::NAN; m * n];
                        matmul_with(isa, Input::BF16(&xb), m, &pm, &mut out);
                        check(&out, &want_b, &what(&format!("{isa:?}"), "bf16"));
                    }
                    let mut out = vec![f32::NAN; m * n];
                    matmul(&x, m, &pm, &mut out);
                    check(&out, &want, &what("default", "f32"));
                    let mut out = vec![f32::NAN; m * n];
                    matmul_input(Input::BF16(&xb), m, &pm, &mut out);
                    check(&out, &want_b, &what("default", "bf16"));
                }
            }
        }
    }
}

/// Whether this CPU runs the VNNI int4 decode tiles (bf16 ISA, VNNI and VBMI).
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    return matches!(Isa::detect(), Isa::Amx | Isa::Avx512Bf16)
        && std::is_x86_feature_detected!("avx512vnni")
        && std::is_x86_feature_detected!("avx512vbmi");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Activations as the VNNI tiles see them: per group of `gs`, rounded to the
/// nearest of 255 levels symmetric about zero (`max |x| / 127` apart).
fn int8_activations(x: &[f32], gs: usize) -> Vec<f32> {
    x.chunks(gs)
        .flat_map(|g| {
            let max = g.iter().fold(0f32, |a, v| a.max(v.abs()));
            let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
            g.iter().map(move |&v| (v * inv).round() * (max / 127.0))
        })
        .collect()
}

/// A quantized weight allowed to compute in bf16 multiplies, on CPUs with AMX and
/// from 5 rows (int8) or 6 (int4) on, its dequantized values rounded to bf16 by bf16
/// activations (as a bf16 weight would): checked at 8 rows and more. Fewer int4
/// rows (all up to 64 without AMX; groups of a multiple of 8) multiply exact codes by activations quantized
/// to int8 per group where the CPU has VNNI. Elsewhere it stays exact. Even and odd groups
/// (whose k-step pairs straddle two groups), k past the last whole AMX tile.
#[test]
fn bf16_compute_rounds_weights_and_activations_to_bf16_where_amx_runs() {
    let amx = Isa::detect() == Isa::Amx;
    for (n, k, gs, fz) in [
        (45, 96, 32, false),
        (45, 96, 32, true),
        (77, 200, 40, false),
        (33, 45, 15, true),
        (64, 512, 128, false),
    ] {
        for bits in [8u8, 4] {
            let qd = Quant::random_zeros(n, k, bits, gs, (n + 5 * k + gs + bits as usize) as u64, fz);
            let pm = PackedMatrix::new(qd.data(), n, k).with_bf16_compute(true);
            let groups = k / gs;
            let exact = qd.dequantized(n, k);
            // What a bf16 tile multiplies: q·s − z·s in f32 (one rounding), to bf16.
            let rounded: Vec<f64> = (0..n * k)
                .map(|e| {
                    let g = (e / k) * groups + (e % k) / gs;
                    let s = qd.scales[g];
                    let v = (qd.q[e] as f32).mul_add(s, -(qd.zeros[g] * s));
                    bf16::from_f32(v).to_f32() as f64
                })
                .collect();
            for m in [1, 4, 8, 16, 37, 100] {
                let mut r = Rng(m as u64 * 3 + k as u64);
                let x: Vec<f32> = (0..m * k).map(|_| r.f32()).collect();
                let xb: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
                let want = if amx && m >= 8 {
                    reference(&xb, &rounded, m, n, k)
                } else if bits == 4 && gs % 8 == 0 && vnni() && m <= 64 {
                    // The VNNI tiles take decode-sized calls (up to 64 rows, below
                    // the AMX threshold where AMX runs).
                    reference(&int8_activations(&x, gs), &exact, m, n, k)
                } else {
                    reference(&x, &exact, m, n, k)
                };
                let out = matmul_to_vec(Input::F32(&x), m, &pm);
                check(
                    &out,
                    &want,
                    &format!("int{bits} g{gs} fz {fz} bf16-compute m{m} n{n} k{k} (amx {amx})"),
                );
            }
        }
    }
}

/// Odd group sizes leave a half-used int4 byte at each group's end; tiny groups
/// have more header than values. Both stay exact enough.
#[test]
fn odd_and_tiny_groups() {
    for (n, k, gs) in [(33, 45, 15), (40, 21, 7), (35, 12, 1), (31, 9, 9), (32, 2, 2)] {
        for bits in [8u8, 4] {
            // Tiny groups with f32 zeros: their header is most of their bytes.
            let qd = Quant::random_zeros(n, k, bits, gs, (n + k * 3 + gs) as u64, gs <= 2);
            let pm = PackedMatrix::new(qd.data(), n, k);
            let w = qd.dequantized(n, k);
            for m in [1, 5, 70] {
                let mut r = Rng(m as u64);
                let x: Vec<f32> = (0..m * k).map(|_| r.f32()).collect();
                let want = reference(&x, &w, m, n, k);
                for isa in Isa::available() {
                    let mut out = vec![f32::NAN; m * n];
                    matmul_with(isa, Input::F32(&x), m, &pm, &mut out);
                    check(&out, &want, &format!("int{bits} g{gs} {isa:?} m{m} n{n} k{k}"));
                }
            }
        }
    }
}

/// As for float weights: a decode row gives the same bits whatever its batch.
#[test]
fn a_quantized_decode_row_does_not_depend_on_its_batch() {
    // Groups of 128; one group of all of k and an odd one, both longer than the
    // batched path's chunk (which widens a long group in pieces).
    for (n, k, gs, fz) in [
        (70, 512, 128, false),
        (70, 512, 128, true),
        (70, 512, 512, false),
        (45, 390, 195, true),
    ] {
        for bits in [8u8, 4] {
            batch_independence(n, k, bits, gs, fz);
        }
    }
}

fn batch_independence(n: usize, k: usize, bits: u8, gs: usize, float_zeros: bool) {
    let qd = Quant::random_zeros(n, k, bits, gs, 99, float_zeros);
    let pm = PackedMatrix::new(qd.data(), n, k);
    for m in [2, 4, 5, 6, 7, 13, 16, 64] {
        let mut r = Rng(m as u64 + 1);
        let x: Vec<f32> = (0..m * k).map(|_| r.f32()).collect();
        common::assert_rows_as_alone(&pm, &x, m, &format!("int{bits} g{gs} k{k}"));
    }
    // int4 in bf16 below its AMX rows (the VNNI tiles where the CPU has them).
    if bits == 4 {
        let pm = PackedMatrix::new(qd.data(), n, k).with_bf16_compute(true);
        // Where AMX runs it takes 6 rows and more (bf16-rounded, another result).
        let ms: &[usize] = if Isa::detect() == Isa::Amx {
            &[2, 3, 4, 5]
        } else {
            &[2, 3, 4, 5, 16, 64]
        };
        for &m in ms {
            let mut r = Rng(m as u64 + 7);
            let x: Vec<f32> = (0..m * k).map(|_| r.f32()).collect();
            common::assert_rows_as_alone(&pm, &x, m, &format!("int4 bf16-compute g{gs} k{k}"));
        }
    }
}

#[test]
fn quantized_rows_and_sizes() {
    let (n, k, gs) = (45, 96, 32);
    for (bits, fz) in [(8u8, false), (4, false), (8, true), (4, true)] {
        let qd = Quant::random_zeros(n, k, bits, gs, 5, fz);
        let pm = PackedMatrix::new(qd.data(), n, k);
        let w = qd.dequantized(n, k);
        let mut row = vec![0f32; k];
        for r in 0..n {
            pm.row_f32(r, &mut row);
            for (j, &v) in row.iter().enumerate() {
                assert!((v as f64 - w[r * k + j]).abs() <= 1e-6, "int{bits} row {r} col {j}");
            }
        }
        // Two panels of 3 groups: 32 scales, 32 zeros (u8, or f32 where one is not
        // an integer in [0, 256)) and the values of 32 rows each.
        let values = if bits == 8 { gs * 32 } else { gs * 16 };
        let header = if fz { 32 * 8 } else { 32 * 5 };
        assert_eq!(pm.storage_bytes(), 2 * 3 * (header + values));
        assert_eq!(pm.dtype().bits(), bits as usize);
    }
    // f32 weights quantized for benchmarks land within a step of the original.
    let w: Vec<f32> = (0..64 * 256)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    for (dt, step) in [(WeightDtype::Int8, 1.0 / 255.0), (WeightDtype::Int4, 1.0 / 15.0)] {
        let pm = PackedMatrix::rounded_from_f32(&w, dt, 64, 256);
        assert_eq!(pm.group_size(), Some(128));
        let mut row = vec![0f32; 256];
        for r in 0..64 {
            pm.row_f32(r, &mut row);
            for (j, &v) in row.iter().enumerate() {
                assert!((v - w[r * 256 + j]).abs() <= step * 0.51, "{dt:?} row {r} col {j}");
            }
        }
    }
}

#[test]
fn bad_quantized_data_is_refused_with_a_reason() {
    let (n, k) = (4, 64);
    let good = Quant::random(n, k, 4, 32, 1);
    let try_pack = |bits: u8, gs: usize, q: &[u8], zeros: &[f32], scales: &[f32]| {
        PackedMatrix::try_new(
            WeightData::Quantized {
                bits,
                group_size: gs,
                q,
                zeros,
                scales,
            },
            n,
            k,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let (q, z, s) = (&good.q[..], &good.zeros[..], &good.scales[..]);
    assert_eq!(try_pack(4, 32, q, z, s), Ok(()));
    let err = |r: Result<(), String>, want: &str| {
        let e = r.expect_err(want);
        assert!(e.contains(want), "{e:?} does not say {want:?}");
    };
    err(try_pack(3, 32, q, z, s), "3 bits");
    err(try_pack(16, 32, q, z, s), "16 bits");
    err(try_pack(4, 24, q, z, s), "group size 24 does not divide k = 64");
    err(try_pack(4, 0, q, z, s), "group size 0");
    err(try_pack(4, 32, &q[1..], z, s), "255 values");
    err(try_pack(4, 32, q, &z[1..], s), "7 zeros");
    err(try_pack(4, 32, q, z, &s[1..]), "7 scales");
    let mut big = q.to_vec();
    big[70] = 16;
    err(try_pack(4, 32, &big, z, s), "value 16 at row 1, column 6");
    assert_eq!(try_pack(8, 32, &big, z, s), Ok(()));
    // Any finite zero packs (f32 zeros past [0, 256) or off the integers).
    let mut bz = z.to_vec();
    bz[3] = 200.5;
    assert_eq!(try_pack(4, 32, q, &bz, s), Ok(()));
    bz[3] = f32::INFINITY;
    err(try_pack(4, 32, q, &bz, s), "zero inf of row 1, group 1");
    let mut bs = s.to_vec();
    bs[0] = f32::NAN;
    err(try_pack(4, 32, q, z, &bs), "scale NaN of row 0, group 0");
    // Float data of the wrong length is an error too, and `new` panics with it.
    let e = PackedMatrix::try_new(WeightData::F32(&[0.0; 5]), 2, 3).unwrap_err();
    assert_eq!(e.to_string(), "weight data has 5 values, not [2, 3]");
    let r = std::panic::catch_unwind(|| {
        PackedMatrix::new(
            WeightData::Quantized {
                bits: 4,
                group_size: 32,
                q: &big,
                zeros: z,
                scales: s,
            },
            n,
            k,
        )
    });
    assert!(r.is_err());
}

/// Single-row decode speed of int8 and int4 (groups of 128) against bf16 and f32,
/// in GB/s of the bytes each call reads (`storage_bytes`), beside the
/// read-bandwidth probe: the median call over passes through about 1 GiB of copies
/// of the weight, so that none comes from cache.
/// `cargo test --release -p sirocco-kernels --test quant -- --ignored --nocapture`.
/// `QUANT_SPEED_M=16` times batched decode (rows of the same activations) instead;
/// `QUANT_SPEED_DTYPES=bf16,int8,int4` picks the weights (all four by default).
#[test]
#[ignore]
fn quantized_decode_speed() {
    use std::time::Instant;
    let probe = probe::read_bandwidth_gbs();
    println!(
        "isa {:?} (available {:?}), {} threads, probe read bandwidth {probe:.1} GB/s",
        Isa::detect(),
        Isa::available(),
        rayon::current_num_threads()
    );
    let passes: usize = std::env::var("QUANT_SPEED_PASSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // QUANT_SPEED_HOT=1: one copy of a 2048 × 2048 weight, which stays in L2: the
    // kernels' compute ceiling rather than DRAM's.
    let hot = std::env::var_os("QUANT_SPEED_HOT").is_some();
    // QUANT_SPEED_SHAPES=1536x1024,7168x1024: other weights (n × k) than the 7B's.
    let shapes: Vec<(usize, usize)> = match std::env::var("QUANT_SPEED_SHAPES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let (n, k) = s.trim().split_once('x').expect("QUANT_SPEED_SHAPES: NxK,...");
                (n.parse().expect("n"), k.parse().expect("k"))
            })
            .collect(),
        Err(_) if hot => vec![(2048, 2048)],
        Err(_) => vec![(4096, 4096), (14336, 4096)],
    };
    let m: usize = std::env::var("QUANT_SPEED_M")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dtypes = std::env::var("QUANT_SPEED_DTYPES").unwrap_or_else(|_| "f32,bf16,int8,int4".into());
    println!("m = {m}");
    for (n, k) in shapes {
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let q8 = Quant::random(n, k, 8, 128, 1);
        let q4 = Quant::random(n, k, 4, 128, 2);
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 777) as f32 - 388.0) * 1e-3).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        for dt in [
            WeightDtype::F32,
            WeightDtype::BF16,
            WeightDtype::Int8,
            WeightDtype::Int4,
        ] {
            let name = match dt {
                WeightDtype::F32 => "f32",
                WeightDtype::BF16 => "bf16",
                WeightDtype::Int8 => "int8",
                _ => "int4",
            };
            if !dtypes.split(',').any(|d| d.trim() == name) {
                continue;
            }
            let data = match dt {
                WeightDtype::F32 => WeightData::F32(&w),
                WeightDtype::BF16 => WeightData::BF16(&wb),
                WeightDtype::Int8 => q8.data(),
                _ => q4.data(),
            };
            // QUANT_SPEED_BF16=1: quantized weights may compute in bf16 (AMX tiles
            // from 5 (int8) or 6 (int4) rows on CPUs that have them).
            let bf16_compute = std::env::var_os("QUANT_SPEED_BF16").is_some();
            let first = PackedMatrix::new(data, n, k).with_bf16_compute(bf16_compute);
            let bytes = first.storage_bytes();
            let copies = if hot { 1 } else { ((1usize << 30) / bytes).max(2) };
            let mats: Vec<PackedMatrix> = std::iter::once(first)
                .chain((1..copies).map(|_| PackedMatrix::new(data, n, k).with_bf16_compute(bf16_compute)))
                .collect();
            // A bf16 model's activations; f32 ones for the f32 weight.
            let input = if dt == WeightDtype::F32 {
                Input::F32(&x)
            } else {
                Input::BF16(&xb)
            };
            let mut out = vec![0f32; m * n];
            let mut times = Vec::new();
            for _ in 0..passes * if hot { 1000 } else { 1 } {
                for pm in &mats {
                    let t = Instant::now();
                    matmul_input(input, m, pm, &mut out);
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let (best, median) = (times[0], times[times.len() / 2]);
            println!(
                "{n}x{k} m{m} {dt:?}: {:.2} MB per call, median {:.0} us = {:.1} GB/s ({:.0}% of probe), best {:.1} GB/s",
                bytes as f64 / 1e6,
                median * 1e6,
                bytes as f64 / median / 1e9,
                100.0 * bytes as f64 / median / 1e9 / probe,
                bytes as f64 / best / 1e9,
            );
        }
    }
}
