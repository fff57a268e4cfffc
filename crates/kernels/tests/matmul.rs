//! Every ISA this CPU has, every weight dtype and activation dtype, against a naive
//! f64 reference on odd shapes (n and k not multiples of the panel width, m on
//! both sides of the tile height and of the small-m/large-m switch).

mod common;

use half::{bf16, f16};
use sirocco_kernels::{matmul, matmul_input, matmul_to_vec, matmul_with, Input, Isa, PackedMatrix, WeightData};

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `x · wᵀ` in f64, and the sum of |terms| per output (the scale of the rounding error).
fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut a) = (0f64, 0f64);
            for kk in 0..k {
                let t = x[i * k + kk] as f64 * w[j * k + kk] as f64;
                s += t;
                a += t.abs();
            }
            out[i * n + j] = s;
            mag[i * n + j] = a;
        }
    }
    (out, mag)
}

fn check(got: &[f32], want: &[f64], mag: &[f64], tol: f64, what: &str) {
    for (i, ((&g, &w), &a)) in got.iter().zip(want).zip(mag).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * a + 1e-30,
            "{what}: out[{i}] = {g}, want {w} (err {err}, scale {a})"
        );
    }
}

const SHAPES: &[(usize, usize)] = &[(1, 1), (33, 17), (100, 259), (64, 64), (47, 513)];
const MS: &[usize] = &[1, 3, 14, 16, 17, 29, 65, 300];

#[test]
fn f32_weights_match_the_reference_on_every_isa() {
    for &(n, k) in SHAPES {
        let w = data(n * k, (n * 31 + k) as u64);
        let pm = PackedMatrix::new(WeightData::F32(&w), n, k);
        for &m in MS {
            let x = data(m * k, m as u64);
            let (want, mag) = reference(&x, &w, m, n, k);
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; m * n];
                matmul_with(isa, Input::F32(&x), m, &pm, &mut out);
                check(&out, &want, &mag, 1e-6, &format!("f32 {isa:?} m{m} n{n} k{k}"));
            }
            let mut out = vec![f32::NAN; m * n];
            matmul(&x, m, &pm, &mut out);
            check(&out, &want, &mag, 1e-6, &format!("f32 default m{m} n{n} k{k}"));
            // The allocating form (not zeroed first) gives the same bits.
            let fresh = matmul_to_vec(Input::F32(&x), m, &pm);
            assert_eq!(fresh.len(), m * n);
            assert!(
                fresh.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                "matmul_to_vec m{m} n{n} k{k}"
            );
        }
    }
}

/// Continuous batching puts a sequence in batches of any size: for decode-sized
/// calls its output row must be the same bits whatever the batch, or a greedy
/// sequence could change with its neighbours. (bf16 weights are exempt: from a few
/// rows on they multiply in AMX tiles, which round differently.)
#[test]
fn a_decode_row_does_not_depend_on_its_batch() {
    for &(n, k) in &[(47, 513), (64, 1024), (33, 4100)] {
        let w = data(n * k, (n + k) as u64);
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        for pm in [
            PackedMatrix::new(WeightData::F32(&w), n, k),
            PackedMatrix::new(WeightData::F16(&wh), n, k),
        ] {
            for m in [2, 14, 16, 17, 64] {
                let x = data(m * k, (m * 3) as u64);
                common::assert_rows_as_alone(&pm, &x, m, &format!("n{n} k{k} {:?}", pm.dtype()));
            }
        }
    }
}

#[test]
fn half_weights_match_the_reference_on_every_isa() {
    for &(n, k) in SHAPES {
        let w = data(n * k, (n * 31 + k) as u64);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let wb32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let wh32: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
        let packed = [
            ("bf16", PackedMatrix::new(WeightData::BF16(&wb), n, k), wb32),
            ("f16", PackedMatrix::new(WeightData::F16(&wh), n, k), wh32),
        ];
        for &m in MS {
            let x = data(m * k, m as u64 + 7);
            // bf16 activations, as a bf16 model has them, are exact in every path.
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let xb32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let xh32: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
            for (name, pm, w32) in &packed {
                for isa in Isa::available() {
                    let (want, mag) = reference(&xb32, w32, m, n, k);
                    let mut out = vec![f32::NAN; m * n];
                    matmul_with(isa, Input::BF16(&xb), m, pm, &mut out);
                    check(
                        &out,
                        &want,
                        &mag,
                        1e-6,
                        &format!("{name} x-bf16 {isa:?} m{m} n{n} k{k}"),
                    );

                    let (want, mag) = reference(&xh32, w32, m, n, k);
                    let mut out = vec![f32::NAN; m * n];
                    matmul_with(isa, Input::F16(&xh), m, pm, &mut out);
                    // The bf16 kernels round f16 and f32 activations to bf16.
                    let tol = if *name == "bf16" && matches!(isa, Isa::Avx512Bf16 | Isa::Amx) {
                        1e-2
                    } else {
                        1e-6
                    };
                    check(&out, &want, &mag, tol, &format!("{name} x-f16 {isa:?} m{m} n{n} k{k}"));

                    let (want, mag) = reference(&x, w32, m, n, k);
                    let mut out = vec![f32::NAN; m * n];
                    matmul_with(isa, Input::F32(&x), m, pm, &mut out);
                    check(&out, &want, &mag, tol, &format!("{name} x-f32 {isa:?} m{m} n{n} k{k}"));
                }
            }
        }
    }
}

/// AMX tiles are 16 rows × 32 k: every row count up to past the small-m switch,
/// and k with and without a partial last tile, on AMX and on the automatic choice.
#[test]
fn amx_tiles_match_the_reference() {
    if !Isa::available().contains(&Isa::Amx) {
        eprintln!("no AMX on this CPU: skipped");
        return;
    }
    for &(n, k) in &[(33, 17), (100, 259), (64, 64), (47, 513), (70, 1030)] {
        let w = data(n * k, (n * 17 + k) as u64);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let w32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let pm = PackedMatrix::new(WeightData::BF16(&wb), n, k);
        for m in (1..=70).chain([300]) {
            let x = data(m * k, m as u64 + 3);
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let xb32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let (want, mag) = reference(&xb32, &w32, m, n, k);
            let mut out = vec![f32::NAN; m * n];
            matmul_with(Isa::Amx, Input::BF16(&xb), m, &pm, &mut out);
            check(&out, &want, &mag, 1e-6, &format!("amx m{m} n{n} k{k}"));
            let mut out = vec![f32::NAN; m * n];
            matmul_input(Input::BF16(&xb), m, &pm, &mut out);
            check(&out, &want, &mag, 1e-6, &format!("default bf16 m{m} n{n} k{k}"));
        }
    }
}

#[test]
fn empty_dimensions() {
    let pm = PackedMatrix::new(WeightData::F32(&[]), 5, 0);
    let mut out = vec![f32::NAN; 15];
    matmul(&[], 3, &pm, &mut out);
    assert!(out.iter().all(|&v| v == 0.0));
    let pm = PackedMatrix::new(WeightData::F32(&[]), 0, 4);
    matmul(&[0.0; 8], 2, &pm, &mut []);
    matmul(&[], 0, &pm, &mut []);
}
