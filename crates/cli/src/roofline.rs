//! The limits of the machine a benchmark runs on, measured in the same run: memory
//! bandwidth and matrix-multiply peak, and the model's rooflines that follow from them.
//!
//! Decode must read every weight once per step, so one stream cannot beat
//! bandwidth / weight bytes; a batch shares that read but needs 2 flops per weight per
//! token, so it cannot beat the matmul peak either.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use sirocco_model::MistralConfig;
use std::time::Instant;

/// What the machine does at best, as measured here.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    /// Memory read bandwidth, GB/s.
    pub bandwidth_gbs: f64,
    /// Dense matrix-multiply throughput in the model's dtype, GFLOP/s.
    pub matmul_gflops: f64,
    /// How each was measured.
    pub method: String,
}

/// Measures `device` (the whole machine's bandwidth and peak on the CPU, the one GPU
/// otherwise) for weights of `dtype`.
pub fn measure(device: &Device, dtype: DType) -> Result<Machine> {
    match device {
        Device::Cpu => measure_cpu(dtype),
        _ => measure_gpu(device, dtype),
    }
}

fn best_of(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        best = best.min(f()?);
    }
    Ok(best)
}

/// A device-to-device copy of 1 GiB (read + write, counted as both) and an 8192³ matmul
/// of random values.
fn measure_gpu(device: &Device, dtype: DType) -> Result<Machine> {
    let n = (1usize << 30) / dtype.size_in_bytes();
    let t = Tensor::ones(n, dtype, device)?;
    drop(t.copy()?);
    device.synchronize()?;
    let copy_s = best_of(10, || {
        let start = Instant::now();
        let c = t.copy()?;
        device.synchronize()?;
        let s = start.elapsed().as_secs_f64();
        drop(c);
        Ok(s)
    })?;
    drop(t);
    let m = 8192;
    // Random operands: tensor cores draw less power (and clock higher) on constant data.
    let a = Tensor::randn(0f32, 1.0, (m, m), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (m, m), device)?.to_dtype(dtype)?;
    drop(a.matmul(&b)?);
    device.synchronize()?;
    let mm_s = best_of(10, || {
        let start = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        let s = start.elapsed().as_secs_f64();
        drop(c);
        Ok(s)
    })?;
    Ok(Machine {
        bandwidth_gbs: 2.0 * (1u64 << 30) as f64 / copy_s / 1e9,
        matmul_gflops: 2.0 * (m as f64).powi(3) / mm_s / 1e9,
        method: format!("device copy of 1 GiB (read+write), {m}³ matmul in {dtype:?}, best of 10"),
    })
}

/// Every core streaming its part of a 1 GiB buffer, and a 2048³ matmul through the
/// engine's own CPU matmul.
fn measure_cpu(dtype: DType) -> Result<Machine> {
    let bandwidth_gbs = cpu_read_bandwidth_gbs();
    let m = 2048;
    let a = Tensor::ones((m, m), DType::F32, &Device::Cpu)?.to_dtype(dtype)?;
    let b = Tensor::ones((m, m), DType::F32, &Device::Cpu)?.to_dtype(dtype)?;
    drop(a.matmul(&b)?);
    let mm_s = best_of(3, || {
        let start = Instant::now();
        drop(a.matmul(&b)?);
        Ok(start.elapsed().as_secs_f64())
    })?;
    Ok(Machine {
        bandwidth_gbs,
        matmul_gflops: 2.0 * (m as f64).powi(3) / mm_s / 1e9,
        method: format!("parallel read of 1 GiB, {m}³ matmul in {dtype:?}, best of 3"),
    })
}

/// Sums a 1 GiB buffer on every core at once; the best of 5 passes.
fn cpu_read_bandwidth_gbs() -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let len = (1usize << 30) / 4;
    // Non-zero values, so no page stays a shared zero page.
    let buf: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
    let per = len.div_ceil(threads);
    let mut best = f64::INFINITY;
    let mut sink = 0.0f32;
    for _ in 0..5 {
        let start = Instant::now();
        let sums: Vec<f32> = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(per).map(|part| s.spawn(move || sum_lanes(part))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).collect()
        });
        best = best.min(start.elapsed().as_secs_f64());
        sink += sums.iter().sum::<f32>();
    }
    std::hint::black_box(sink);
    (len * 4) as f64 / best / 1e9
}

/// Independent lanes, so the compiler vectorizes and the loop is bound by memory.
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let mut chunks = xs.chunks_exact(32);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Flops of one token's forward pass at `context` earlier positions: 2 per weight of
/// the linear layers, plus attention's q·k and p·v over the visible keys.
pub fn flops_per_token(cfg: &MistralConfig, context: usize) -> f64 {
    let h = cfg.hidden_size as f64;
    let (q, kv) = (
        (cfg.num_attention_heads * cfg.head_dim) as f64,
        (cfg.num_key_value_heads * cfg.head_dim) as f64,
    );
    let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * cfg.intermediate_size as f64;
    let linear = cfg.num_hidden_layers as f64 * per_layer + h * cfg.vocab_size as f64;
    let visible = (context + 1).min(cfg.sliding_window.unwrap_or(usize::MAX)) as f64;
    let attention = cfg.num_hidden_layers as f64 * 4.0 * q * visible;
    2.0 * linear + attention
}

/// The model's limits on `machine`.
#[derive(Clone, Debug)]
pub struct Roofline {
    pub machine: Machine,
    pub weight_bytes: usize,
    pub cfg: MistralConfig,
}

impl Roofline {
    /// Decode tokens/s at `batch` streams with `context` positions each: the weights
    /// are read once per step, the flops grow with the batch.
    pub fn decode(&self, batch: usize, context: usize) -> f64 {
        let bw = self.machine.bandwidth_gbs * 1e9 / self.weight_bytes as f64 * batch as f64;
        let compute = self.machine.matmul_gflops * 1e9 / flops_per_token(&self.cfg, context);
        bw.min(compute)
    }

    /// Prefill tokens/s of a `prompt`-token prompt: compute bound, attention at the
    /// prompt's mean context.
    pub fn prefill(&self, prompt: usize) -> f64 {
        self.machine.matmul_gflops * 1e9 / flops_per_token(&self.cfg, prompt / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_count_the_linears_and_the_visible_keys() {
        let cfg = sirocco_model::builtin_config();
        let base = flops_per_token(&cfg, 0);
        let params = cfg.num_params() as f64;
        let embed = (cfg.vocab_size * cfg.hidden_size) as f64;
        // Every parameter but the embedding and the norms is one multiply-add.
        assert!(
            (base / 2.0 - (params - embed)).abs() / params < 0.01,
            "{base} vs {params}"
        );
        let w = cfg.sliding_window.unwrap();
        assert!(flops_per_token(&cfg, 10 * w) == flops_per_token(&cfg, w - 1));
        assert!(flops_per_token(&cfg, 100) > base);
    }

    #[test]
    fn the_cpu_bandwidth_probe_measures_something() {
        let gbs = cpu_read_bandwidth_gbs();
        assert!(gbs > 0.1 && gbs < 10_000.0, "{gbs}");
    }
}
