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

/// The CPU's limits as the engine's own kernels meet them (`sirocco_kernels::probe`):
/// every compute thread streaming 1 GiB, and a 2048³ matmul with weights in `dtype`.
fn measure_cpu(dtype: DType) -> Result<Machine> {
    let weights = match dtype {
        DType::BF16 => sirocco_kernels::WeightDtype::BF16,
        DType::F16 => sirocco_kernels::WeightDtype::F16,
        _ => sirocco_kernels::WeightDtype::F32,
    };
    Ok(Machine {
        bandwidth_gbs: sirocco_kernels::probe::read_bandwidth_gbs(),
        matmul_gflops: sirocco_kernels::probe::matmul_peak_gflops(weights),
        method: format!(
            "all {} compute threads reading 1 GiB; 2048³ matmul, {dtype:?} weights, through sirocco-kernels",
            rayon::current_num_threads()
        ),
    })
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
}
