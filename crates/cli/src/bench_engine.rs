//! `sirocco bench-engine`: the engine alone, without the serving path. Measures
//! prefill tokens/s, single-stream decode tokens/s and batched decode throughput on a
//! generated model of a given shape (or a checkpoint). In the same run it measures the
//! machine's memory bandwidth and matmul peak ([`crate::roofline`]) and reports each
//! figure as a percentage of the model's roofline there.

use anyhow::{bail, Result};
use clap::Args;
use sirocco_engine::{EngineOptions, SeqStep, StepExecutor, TpGroup};
use sirocco_model::{dtype_name, DeviceSpec, MistralConfig, ModelSource, SeqId};
use sirocco_sampling::SamplingParams;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Benchmark this checkpoint (directory or .gguf file) instead of a generated model.
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
    /// Also run a serving workload in the engine alone: this many concurrent streams
    /// (greedy, fixed lengths), scheduled as the router's batcher does, to compare
    /// with `sirocco bench` against `serve` on the same model.
    #[arg(long)]
    pub streams: Option<usize>,
    /// Requests of the serving workload (default: three per stream).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Prompt and output tokens of each request of the serving workload.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
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

/// A request of the serving workload in flight.
struct Live {
    seq: SeqId,
    prompt: Vec<u32>,
    fed: usize,
    generated: usize,
    last: u32,
}

/// `requests` requests, at most `streams` at a time (a finished one is replaced at
/// once), each step carrying a decode token of every sequence past its prompt and
/// prompt chunks within the router's per-step budget. Returns the seconds it took
/// and the tokens it generated.
fn serving_workload(
    g: &mut TpGroup,
    a: &BenchArgs,
    streams: usize,
    requests: usize,
    first_seq: SeqId,
) -> Result<(f64, usize)> {
    let vocab = g.config().vocab_size;
    let greedy = || Some(SamplingParams::greedy());
    let (mut live, mut started, mut generated) = (Vec::<Live>::new(), 0, 0);
    let t = Instant::now();
    loop {
        while live.len() < streams && started < requests {
            let seq = first_seq + started as SeqId;
            live.push(Live {
                seq,
                prompt: tokens(a.input_len, vocab, 100 + started),
                fed: 0,
                generated: 0,
                last: 0,
            });
            started += 1;
        }
        if live.is_empty() {
            return Ok((t.elapsed().as_secs_f64(), generated));
        }
        let mut steps = Vec::new();
        let mut owners = Vec::new();
        for (i, l) in live.iter().enumerate() {
            if l.fed == l.prompt.len() {
                steps.push(SeqStep {
                    sample: true,
                    params: greedy(),
                    return_logits: false,
                    ..SeqStep::logits(l.seq, vec![l.last])
                });
                owners.push(i);
            }
        }
        let mut budget = crate::cluster::PREFILL_BUDGET;
        for (i, l) in live.iter().enumerate() {
            if l.fed < l.prompt.len() && budget > 0 {
                let n = (l.prompt.len() - l.fed).min(crate::cluster::PREFILL_CHUNK).min(budget);
                budget -= n;
                steps.push(SeqStep {
                    sample: l.fed + n == l.prompt.len(),
                    params: greedy(),
                    return_logits: false,
                    ..SeqStep::logits(l.seq, l.prompt[l.fed..l.fed + n].to_vec())
                });
                owners.push(i);
            }
        }
        let outputs = g.step(&steps)?;
        for ((step, &i), out) in steps.iter().zip(&owners).zip(outputs) {
            let l = &mut live[i];
            if l.fed < l.prompt.len() {
                l.fed += step.tokens.len();
            }
            if let Some(tok) = out.token {
                l.last = tok;
                l.generated += 1;
                generated += 1;
            }
        }
        let done: Vec<SeqId> = live
            .iter()
            .filter(|l| l.generated >= a.output_len)
            .map(|l| l.seq)
            .collect();
        if !done.is_empty() {
            g.release(&done)?;
            live.retain(|l| l.generated < a.output_len);
        }
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0 as u32
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.streams.is_some_and(|s| s == 0) || a.requests == Some(0) || a.input_len == 0 || a.output_len == 0 {
        bail!("--streams, --requests, --input-len and --output-len must be positive");
    }
    let source = match &a.model {
        Some(path) => ModelSource::from_arg(Some(path)),
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
    let workload = match a.streams {
        Some(streams) => {
            let requests = a.requests.unwrap_or(3 * streams);
            let (mut runs, mut generated) = (Vec::new(), 0);
            for _ in 0..a.repeat {
                let (secs, tokens) = serving_workload(&mut g, &a, streams, requests, next_seq)?;
                runs.push(secs);
                generated = tokens;
                next_seq += requests as SeqId;
            }
            let secs = median(runs);
            let output = generated as f64 / secs;
            eprintln!(
                "serving workload, {streams} streams, {requests} requests of {} + {} tokens: {output:.1} output tok/s \
                 ({:.1} total tok/s, {secs:.1} s)",
                a.input_len,
                a.output_len,
                (requests * (a.input_len + a.output_len)) as f64 / secs
            );
            Some(serde_json::json!({
                "streams": streams,
                "requests": requests,
                "input_len": a.input_len,
                "output_len": a.output_len,
                "seconds": secs,
                "generated_tokens": generated,
                "output_tokens_per_s": output,
            }))
        }
        None => None,
    };
    let summary = serde_json::json!({
        "workload": workload,
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
