//! Linear-layer throughput on the shapes of the generated 229M model (hidden 1024,
//! intermediate 3584, vocab 32000): GB/s of weights streamed at m = 1, GFLOP/s at
//! m = 16 and m = 2048, for each weight dtype, plus the machine's probes.
//!
//! `cargo bench -p sirocco-kernels [-- filter...]`: filters `probe` (the machine's
//! rooflines), `sweep` (decode over a whole model's weights, every matrix once per
//! step as in the engine; `SWEEP_SHAPE=n,k` sweeps ~800 MB of one shape instead) and
//! shape names. `SIROCCO_KERNELS_ISA=portable` (or `avx512`, or `avx512bf16` for all
//! but AMX) picks a fallback.

use half::{bf16, f16};
use sirocco_kernels::{matmul_input, probe, Input, Isa, PackedMatrix, WeightDtype};
use std::time::{Duration, Instant};

const SHAPES: &[(&str, usize, usize)] = &[
    ("kv 1024->256", 256, 1024),
    ("qkv 1024->4096", 4096, 1024),
    ("gate 1024->3584", 3584, 1024),
    ("down 3584->1024", 1024, 3584),
    ("lm_head 1024->32000", 32000, 1024),
];

/// Median seconds per call over enough calls to fill `budget`.
fn time(mut f: impl FnMut(), budget: Duration) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed() < budget && times.len() < 1000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Decode over a whole model's worth of weights (the 229M model's 12 layers and
/// lm_head, more than any cache), as an engine step sees them: every matrix once per
/// step, none of them cached from the step before.
fn model_sweep(dt: WeightDtype) {
    let (h, kv, i, vocab, layers) = (1024, 256, 3584, 32000, 12);
    let mut shapes = Vec::new();
    if let Ok(v) = std::env::var("SWEEP_SHAPE") {
        let d: Vec<usize> = v.split(',').map(|s| s.parse().unwrap()).collect();
        shapes.extend(vec![(d[0], d[1]); 800_000_000 / (4 * d[0] * d[1])]);
    }
    // The engine's fused projections: q, k and v in one matrix, gate and up in one.
    for _ in 0..layers * usize::from(shapes.is_empty()) {
        shapes.extend([(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)]);
    }
    if shapes.len() == layers * 4 {
        shapes.push((vocab, h));
    }
    let mats: Vec<PackedMatrix> = shapes
        .iter()
        .map(|&(n, k)| {
            let w: Vec<f32> = (0..n * k).map(|j| ((j * 7919 % 1000) as f32 - 500.0) * 1e-4).collect();
            PackedMatrix::rounded_from_f32(&w, dt, n, k)
        })
        .collect();
    let bytes: usize = mats.iter().map(|m| m.elem_count() * dt.size_in_bytes()).sum();
    let flops_per_row: usize = mats.iter().map(|m| 2 * m.elem_count()).sum();
    let mut line = format!("model sweep {dt:?} ({:.0} MB):", bytes as f64 / 1e6);
    for m in [1usize, 16, 32] {
        let x: Vec<f32> = (0..m * i).map(|j| ((j % 777) as f32 - 388.0) * 1e-3).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut out = vec![0f32; m * vocab];
        let s = time(
            || {
                for w in &mats {
                    let input = match dt {
                        WeightDtype::BF16 => Input::BF16(&xb[..m * w.k()]),
                        _ => Input::F32(&x[..m * w.k()]),
                    };
                    matmul_input(input, m, w, &mut out[..m * w.n()]);
                }
            },
            Duration::from_millis(2000),
        );
        line += &format!(
            "  m={m} {:.1} ms {:.1} GB/s {:.1} GFLOP/s",
            s * 1e3,
            bytes as f64 / s / 1e9,
            (flops_per_row * m) as f64 / s / 1e9
        );
    }
    println!("{line}");
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    println!("isa {:?}, {} threads", Isa::detect(), rayon::current_num_threads());
    if filter.is_empty() || filter.iter().any(|f| f == "probe") {
        println!("probe: read bandwidth {:.1} GB/s", probe::read_bandwidth_gbs());
        for dt in [WeightDtype::F32, WeightDtype::BF16] {
            println!("probe: matmul peak {dt:?} {:.1} GFLOP/s", probe::matmul_peak_gflops(dt));
        }
    }
    if filter.is_empty() || filter.iter().any(|f| f == "sweep") {
        model_sweep(WeightDtype::F32);
        model_sweep(WeightDtype::BF16);
    }
    for &(name, n, k) in SHAPES {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4).collect();
        for dt in [WeightDtype::F32, WeightDtype::BF16, WeightDtype::F16] {
            let pm = PackedMatrix::rounded_from_f32(&w, dt, n, k);
            let mut line = format!("{name:<20} {dt:?}:");
            for m in [1usize, 16, 2048] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i % 777) as f32 - 388.0) * 1e-3).collect();
                let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                // Activations in the dtype a model of this weight dtype computes in.
                let input = match dt {
                    WeightDtype::F32 => Input::F32(&x),
                    WeightDtype::BF16 => Input::BF16(&xb),
                    WeightDtype::F16 => Input::F16(&xh),
                    WeightDtype::Int8 | WeightDtype::Int4 => Input::BF16(&xb),
                };
                let mut out = vec![0f32; m * n];
                let budget = Duration::from_millis(if m == 2048 { 1500 } else { 700 });
                let s = time(|| matmul_input(input, m, &pm, &mut out), budget);
                let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
                if m == 1 {
                    let gbs = (n * k * dt.size_in_bytes()) as f64 / s / 1e9;
                    line += &format!("  m=1 {gbs:6.1} GB/s ({:6.1} us)", s * 1e6);
                } else {
                    line += &format!("  m={m} {gflops:6.1} GFLOP/s");
                }
            }
            println!("{line}");
        }
    }
}
