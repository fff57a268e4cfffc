//! `sirocco bench-engine`: the engine alone, without the serving path. Measures
//! prefill tokens/s, single-stream decode tokens/s and batched decode throughput on a
//! generated model of a given shape (or a checkpoint). In the same run it measures the
//! machine's memory bandwidth and matmul peak ([`crate::roofline`]) and reports each
//! figure as a percentage of the model's roofline there.

use anyhow::Result;
use clap::Args;
use sirocco_engine::{EngineOptions, SeqStep, StepExecutor, TpGroup};
use sirocco_model::{dtype_name, DeviceSpec, MistralConfig, ModelSource, SeqId};
use sirocco_sampling::SamplingParams;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Benchmark this checkpoint instead of a generated model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    #[arg(long, default_value_t = 12)]
    pub layers: usize,
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 3584)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 4096)]
    pub window: usize,
    /// f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Where to compute: cpu, cuda or cuda:N (cuda needs a build with the cuda feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Decode steps measured per batch size.
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Batch sizes for batched decode.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    /// Context each sequence has before decode is timed.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    #[arg(long)]
    pub json: bool,
    /// Skip measuring the machine's bandwidth and matmul peak (no percentages).
    #[arg(long)]
    pub no_roofline: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deterministic token ids spread over the vocabulary.
fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 3) % vocab) as u32)
        .collect()
}

fn prefill(g: &mut TpGroup, seq: SeqId, ids: &[u32], chunk: usize) -> Result<Vec<f32>> {
    let mut last = Vec::new();
    for c in ids.chunks(chunk) {
        last = g
            .step(&[SeqStep::logits(seq, c.to_vec())])?
            .pop()
            .and_then(|o| o.logits)
            .unwrap_or_default();
    }
    Ok(last)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0 as u32
}

pub fn run(a: BenchArgs) -> Result<()> {
    let source = match &a.model {
        Some(dir) => ModelSource::Dir(dir.clone()),
        None => {
            let head_dim = a.hidden / a.heads;
            let config = MistralConfig {
                vocab_size: a.vocab,
                hidden_size: a.hidden,
                intermediate_size: a.intermediate,
                num_hidden_layers: a.layers,
                num_attention_heads: a.heads,
                num_key_value_heads: a.kv_heads,
                head_dim,
                rms_norm_eps: 1e-5,
                rope_theta: 1e6,
                sliding_window: Some(a.window),
                max_position_embeddings: (a.prompt_len + a.context + a.decode_steps + 16).max(a.window),
                tie_word_embeddings: false,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
                torch_dtype: None,
            };
            config.validate()?;
            ModelSource::Generated { config, seed: 1 }
        }
    };
    let device = DeviceSpec::parse(&a.device)?;
    let dtype = device.dtype_or_default(a.dtype.as_deref())?;
    let opts = EngineOptions {
        tp: a.tp,
        dtype,
        device,
        ..EngineOptions::default()
    };
    let t0 = Instant::now();
    let mut g = TpGroup::load(&source, &opts)?;
    let cfg = g.config().clone();
    let vocab = cfg.vocab_size;
    eprintln!(
        "model: {} params, hidden {}, {} layers, {}/{} heads, vocab {}, dtype {}, tp {} (loaded in {:.1}s)",
        cfg.num_params(),
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        vocab,
        dtype_name(dtype),
        a.tp,
        t0.elapsed().as_secs_f64()
    );
    let weight_bytes = g.weight_bytes();
    let mut next_seq: SeqId = 1;
    let roofline = if a.no_roofline {
        None
    } else {
        let machine = crate::roofline::measure(&device.open()?, dtype)?;
        eprintln!(
            "machine: {:.1} GB/s memory bandwidth, {:.0} GFLOP/s matmul peak ({})",
            machine.bandwidth_gbs, machine.matmul_gflops, machine.method
        );
        Some(crate::roofline::Roofline {
            machine,
            weight_bytes,
            cfg: cfg.clone(),
        })
    };
    let pct = |value: f64, limit: Option<f64>| match limit {
        Some(l) => format!(" = {:.0}% of the {l:.1} tok/s roofline", 100.0 * value / l),
        None => String::new(),
    };

    // Warm-up: page in the weights and let the allocator settle.
    prefill(&mut g, 0, &tokens(16, vocab, 0), a.prefill_chunk)?;
    g.release(&[0])?;

    let prompt = tokens(a.prompt_len, vocab, 1);
    let mut prefill_tps = Vec::new();
    for _ in 0..a.repeat {
        let seq = next_seq;
        next_seq += 1;
        let t = Instant::now();
        prefill(&mut g, seq, &prompt, a.prefill_chunk)?;
        prefill_tps.push(a.prompt_len as f64 / t.elapsed().as_secs_f64());
        g.release(&[seq])?;
    }
    let prefill_tps = median(prefill_tps);
    let prefill_roof = roofline.as_ref().map(|r| r.prefill(a.prompt_len));
    eprintln!(
        "prefill {} tokens (chunk {}): {:.1} tok/s{}",
        a.prompt_len,
        a.prefill_chunk,
        prefill_tps,
        pct(prefill_tps, prefill_roof)
    );

    let mut decode = Vec::new();
    for &b in &a.batches {
        let mut runs = Vec::new();
        for _ in 0..a.repeat {
            let seqs: Vec<SeqId> = (0..b as SeqId).map(|i| next_seq + i).collect();
            next_seq += b as SeqId;
            let mut last = Vec::new();
            for (i, &s) in seqs.iter().enumerate() {
                last.push(argmax(&prefill(
                    &mut g,
                    s,
                    &tokens(a.context, vocab, 10 + i),
                    a.prefill_chunk,
                )?));
            }
            let t = Instant::now();
            for _ in 0..a.decode_steps {
                // Greedy sampling on rank 0, as in serving: only token ids come back.
                let steps: Vec<SeqStep> = seqs
                    .iter()
                    .zip(&last)
                    .map(|(&seq, &tok)| SeqStep {
                        sample: true,
                        params: Some(SamplingParams::greedy()),
                        return_logits: false,
                        ..SeqStep::logits(seq, vec![tok])
                    })
                    .collect();
                last = g.step(&steps)?.iter().map(|o| o.token.unwrap_or(0)).collect();
            }
            runs.push((b * a.decode_steps) as f64 / t.elapsed().as_secs_f64());
            g.release(&seqs)?;
        }
        let tps = median(runs);
        let gbs = weight_bytes as f64 * tps / b as f64 / 1e9;
        // Context during the timed steps: the prefilled tokens plus half the steps.
        let roof = roofline.as_ref().map(|r| r.decode(b, a.context + a.decode_steps / 2));
        eprintln!(
            "decode batch {b:>3}: {tps:.1} tok/s ({:.1} steps/s, weights read at {gbs:.1} GB/s){}",
            tps / b as f64,
            pct(tps, roof)
        );
        decode.push((b, tps, roof));
    }
    let summary = serde_json::json!({
        "params": cfg.num_params(),
        "dtype": dtype_name(dtype),
        "device": device.to_string(),
        "tp": a.tp,
        "weight_bytes_per_decode_step": weight_bytes,
        "prefill_tokens_per_s": prefill_tps,
        "prefill_roofline_tokens_per_s": prefill_roof,
        "prompt_len": a.prompt_len,
        "machine": roofline.as_ref().map(|r| &r.machine),
        "decode": decode
            .iter()
            .map(|(b, t, r)| serde_json::json!({"batch": b, "tokens_per_s": t, "roofline_tokens_per_s": r}))
            .collect::<Vec<_>>(),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "weights read per decode step: {} bytes ({:.1} MB)",
            weight_bytes,
            weight_bytes as f64 / 1e6
        );
        if let Some(r) = &roofline {
            println!(
                "machine: {:.1} GB/s, {:.0} GFLOP/s ({})",
                r.machine.bandwidth_gbs, r.machine.matmul_gflops, r.machine.method
            );
        }
        println!("prefill: {prefill_tps:.1} tok/s{}", pct(prefill_tps, prefill_roof));
        for (b, t, r) in decode {
            println!("decode batch {b}: {t:.1} tok/s{}", pct(t, r));
        }
    }
    Ok(())
}
