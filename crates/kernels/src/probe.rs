//! The machine's rooflines as this crate sees them: how fast all threads can stream
//! memory, and the best this crate's own matmul does on a large square problem.
//! Benchmarks print these next to their results.

use crate::operands::Input;
use crate::packed::{AlignedBuf, PackedMatrix, WeightDtype};
use half::bf16;
use rayon::prelude::*;
use std::time::Instant;

/// Bytes streamed per pass: far beyond any cache (some virtual machines report
/// L3 sizes in the hundreds of MiB).
const PROBE_BYTES: usize = 1 << 30;

/// Read bandwidth in GB/s (10⁹ bytes/s) of all of rayon's threads streaming through a
/// 1 GiB buffer, each its own contiguous part, in the memory the packed weights use
/// (huge pages where the OS gives them) and the way the decode kernels read it
/// (wide loads, software prefetch); the best of several passes.
pub fn read_bandwidth_gbs() -> f64 {
    let words = PROBE_BYTES / 8;
    let mut buf = AlignedBuf::zeroed(PROBE_BYTES);
    let threads = rayon::current_num_threads().max(1);
    let chunk = words.div_ceil(threads);
    buf.as_mut_slice::<u64>()
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| c.iter_mut().enumerate().for_each(|(j, v)| *v = (i + j) as u64));
    let buf: &[u64] = buf.as_slice();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = buf.par_chunks(chunk).map(read_words).reduce(|| 0, u64::wrapping_add);
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(PROBE_BYTES as f64 / s / 1e9);
    }
    best
}

fn read_words(c: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        return unsafe { read_words_avx512(c) };
    }
    sum_words(c)
}

/// 64-byte loads with the decode tiles' prefetch distance.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_words_avx512(c: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let lines = c.chunks_exact(16);
    let tail = sum_words(lines.remainder());
    for l in lines {
        let p = l.as_ptr() as *const __m512i;
        // Prefetches never fault, so running past the end of the buffer is harmless.
        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(2048));
        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(2048 + 64));
        a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p));
        a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p.add(1)));
    }
    (_mm512_reduce_add_epi64(_mm512_add_epi64(a0, a1)) as u64).wrapping_add(tail)
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
    let packed = PackedMatrix::rounded_from_f32(&w, dtype, s, s);
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
