//! The machine's rooflines as this crate sees them: how fast all threads can stream
//! memory, and the best this crate's own matmul does on a large square problem.
//! Benchmarks print these next to their results.

use crate::packed::{PackedMatrix, WeightData, WeightDtype};
use crate::Input;
use half::{bf16, f16};
use rayon::prelude::*;
use std::time::Instant;

/// Bytes streamed per pass: far beyond any cache (some virtual machines report
/// L3 sizes in the hundreds of MiB).
const PROBE_BYTES: usize = 1 << 30;

/// Read bandwidth in GB/s (10⁹ bytes/s) of all of rayon's threads streaming through a
/// 1 GiB buffer, each its own contiguous part; the best of several passes.
pub fn read_bandwidth_gbs() -> f64 {
    let words = PROBE_BYTES / 8;
    let mut buf = vec![0u64; words];
    let threads = rayon::current_num_threads().max(1);
    let chunk = words.div_ceil(threads);
    // Touch every page from the thread that will read it, so the first pass does
    // not measure page faults.
    buf.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| c.iter_mut().enumerate().for_each(|(j, v)| *v = (i + j) as u64));
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = buf.par_chunks(chunk).map(sum_words).reduce(|| 0, u64::wrapping_add);
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(PROBE_BYTES as f64 / s / 1e9);
    }
    best
}

/// A sum the compiler vectorises into wide loads; independent lanes keep the adds
/// off the critical path.
fn sum_words(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = c.chunks_exact(8);
    for w in &mut it {
        for (a, v) in acc.iter_mut().zip(w) {
            *a = a.wrapping_add(*v);
        }
    }
    let tail: u64 = it.remainder().iter().fold(0, |a, v| a.wrapping_add(*v));
    acc.iter().fold(tail, |a, v| a.wrapping_add(*v))
}

/// GFLOP/s (2·m·n·k / s) of [`crate::matmul_input`] on m = n = k = 2048 with weights
/// stored in `dtype` and activations in f32 (bf16 for bf16 weights, as a bf16
/// model feeds them); the best of several runs.
pub fn matmul_peak_gflops(dtype: WeightDtype) -> f64 {
    let s = 2048;
    let w: Vec<f32> = (0..s * s).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
    let x: Vec<f32> = (0..s * s)
        .map(|i| ((i * 104_729 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let packed = match dtype {
        WeightDtype::F32 => PackedMatrix::new(WeightData::F32(&w), s, s),
        WeightDtype::BF16 => {
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            PackedMatrix::new(WeightData::BF16(&wb), s, s)
        }
        WeightDtype::F16 => {
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            PackedMatrix::new(WeightData::F16(&wh), s, s)
        }
    };
    let input = match dtype {
        WeightDtype::BF16 => Input::BF16(&xb),
        _ => Input::F32(&x),
    };
    let mut out = vec![0f32; s * s];
    let mut best = 0f64;
    for _ in 0..4 {
        let t = Instant::now();
        crate::matmul_input(input, s, &packed, &mut out);
        let secs = t.elapsed().as_secs_f64();
        best = best.max(2.0 * (s * s * s) as f64 / secs / 1e9);
    }
    best
}
