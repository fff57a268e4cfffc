//! `sirocco bench-engine`: the engine alone, without the serving path. Measures
//! prefill tokens/s, single-stream decode tokens/s and batched decode throughput on a
//! generated model of a given shape (or a checkpoint). In the same run it measures the
//! machine's memory bandwidth and matmul peak ([`crate::roofline`]) and reports each
//! figure as a percentage of the model's roofline there.

use anyhow::{bail, Result};
use clap::Args;
use sirocco_engine::{generate_batch, EngineOptions, GenerateRequest, SeqStep, StepExecutor, TpGroup};
use sirocco_model::{dtype_name, DeviceSpec, MistralConfig, ModelSource, SeqId};
use sirocco_sampling::SamplingParams;
use sirocco_scheduler::SchedulerConfig;
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
    #[arg(long, value_parser = ["int8", "int4"], help = crate::QUANTIZE_HELP)]
    pub quantize: Option<String>,
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

/// `requests` greedy requests of fixed lengths, at most `streams` at a time (a
/// finished one is replaced at once), scheduled by the router's planner with its
/// default prefill chunk and budget. Returns the seconds it took and the tokens it
/// generated.
fn serving_workload(
    g: &mut TpGroup,
    a: &BenchArgs,
    streams: usize,
    requests: usize,
    first_seq: SeqId,
) -> Result<(f64, usize)> {
    let vocab = g.config().vocab_size;
    let reqs: Vec<GenerateRequest> = (0..requests)
        .map(|i| GenerateRequest::greedy(tokens(a.input_len, vocab, 100 + i), a.output_len))
        .collect();
    let config = SchedulerConfig {
        max_batch_size: streams,
        ..SchedulerConfig::default()
    };
    let t = Instant::now();
    let out = generate_batch(g, &reqs, &config, first_seq, &mut |_, _| {})?;
    let generated = out.iter().map(|o| o.generated_ids.len()).sum();
    Ok((t.elapsed().as_secs_f64(), generated))
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0 as u32
}

/// Decode throughput of one batch size, and its roofline.
struct DecodeFigure {
    batch: usize,
    tokens_per_s: f64,
    roofline: Option<f64>,
}

/// The engine under measurement, and sequence ids not yet used.
struct Bench {
    a: BenchArgs,
    g: TpGroup,
    device: DeviceSpec,
    dtype: candle_core::DType,
    next_seq: SeqId,
    roofline: Option<crate::roofline::Roofline>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.streams.is_some_and(|s| s == 0) || a.requests == Some(0) || a.input_len == 0 || a.output_len == 0 {
        bail!("--streams, --requests, --input-len and --output-len must be positive");
    }
    let mut b = Bench::load(a)?;
    b.measure_roofline()?;
    b.warm_up()?;
    let prefill_tps = b.measure_prefill()?;
    let decode = b.measure_decode()?;
    let workload = b.measure_workload()?;
    b.report(prefill_tps, &decode, workload);
    Ok(())
}

impl Bench {
    /// The model to measure: the checkpoint given, or one generated in the shape asked.
    fn source(a: &BenchArgs) -> Result<ModelSource> {
        if let Some(path) = &a.model {
            return Ok(ModelSource::from_arg(Some(path)));
        }
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
        Ok(ModelSource::Generated { config, seed: 1 })
    }

    fn load(a: BenchArgs) -> Result<Self> {
        let source = Self::source(&a)?;
        let device = DeviceSpec::parse(&a.device)?;
        let dtype = device.dtype_or_default(a.dtype.as_deref())?;
        let opts = EngineOptions {
            tp: a.tp,
            dtype,
            device,
            quantize: a.quantize.as_deref().map(str::parse).transpose()?,
            ..EngineOptions::default()
        };
        let t0 = Instant::now();
        let g = TpGroup::load(&source, &opts)?;
        let cfg = g.config();
        eprintln!(
            "model: {} params, hidden {}, {} layers, {}/{} heads, vocab {}, dtype {}{}, tp {} (loaded in {:.1}s)",
            cfg.num_params(),
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.vocab_size,
            dtype_name(dtype),
            a.quantize
                .as_deref()
                .map_or(String::new(), |q| format!(", linear layers quantized to {q}")),
            a.tp,
            t0.elapsed().as_secs_f64()
        );
        if matches!(device, DeviceSpec::Cpu) {
            // Which kernels ran: the best this CPU has (quantized weights: as the
            // kernels say for the model's dtype).
            let isa = sirocco_kernels::Isa::detect();
            let quant = match a.quantize {
                Some(_) => format!(
                    "; quantized weights: {}",
                    sirocco_kernels::quantized_kernels(dtype == candle_core::DType::BF16)
                ),
                None => String::new(),
            };
            eprintln!(
                "kernels: {isa:?} (available: {:?}){quant}",
                sirocco_kernels::Isa::available()
            );
        }
        Ok(Bench {
            a,
            g,
            device,
            dtype,
            next_seq: 1,
            roofline: None,
        })
    }

    /// The machine's bandwidth and matmul peak, measured in this run (unless
    /// `--no-roofline`), against which each figure is reported.
    fn measure_roofline(&mut self) -> Result<()> {
        if self.a.no_roofline {
            return Ok(());
        }
        let machine = crate::roofline::measure(&self.device.open()?, self.dtype)?;
        eprintln!(
            "machine: {:.1} GB/s memory bandwidth, {:.0} GFLOP/s matmul peak ({})",
            machine.bandwidth_gbs, machine.matmul_gflops, machine.method
        );
        self.roofline = Some(crate::roofline::Roofline {
            machine,
            weight_bytes: self.g.weight_bytes(),
            cfg: self.g.config().clone(),
        });
        Ok(())
    }

    fn vocab(&self) -> usize {
        self.g.config().vocab_size
    }

    fn take_seqs(&mut self, n: usize) -> SeqId {
        let first = self.next_seq;
        self.next_seq += n as SeqId;
        first
    }

    /// Pages in the weights and lets the allocator settle.
    fn warm_up(&mut self) -> Result<()> {
        let ids = tokens(16, self.vocab(), 0);
        prefill(&mut self.g, 0, &ids, self.a.prefill_chunk)?;
        self.g.release(&[0])
    }

    /// Prefill tokens/s of one `--prompt-len` prompt (median of `--repeat`).
    fn measure_prefill(&mut self) -> Result<f64> {
        let a = self.a.clone();
        let prompt = tokens(a.prompt_len, self.vocab(), 1);
        let mut runs = Vec::new();
        for _ in 0..a.repeat {
            let seq = self.take_seqs(1);
            let t = Instant::now();
            prefill(&mut self.g, seq, &prompt, a.prefill_chunk)?;
            runs.push(a.prompt_len as f64 / t.elapsed().as_secs_f64());
            self.g.release(&[seq])?;
        }
        let tps = median(runs);
        let roof = self.roofline.as_ref().map(|r| r.prefill(a.prompt_len));
        eprintln!(
            "prefill {} tokens (chunk {}): {:.1} tok/s{}",
            a.prompt_len,
            a.prefill_chunk,
            tps,
            pct(tps, roof)
        );
        Ok(tps)
    }

    /// Decode tokens/s at each of `--batches`, every sequence holding `--context`
    /// tokens before the timed steps.
    fn measure_decode(&mut self) -> Result<Vec<DecodeFigure>> {
        let a = self.a.clone();
        let weight_bytes = self.g.weight_bytes();
        let mut figures = Vec::new();
        for &b in &a.batches {
            let mut runs = Vec::new();
            for _ in 0..a.repeat {
                runs.push(self.timed_decode(b)?);
            }
            let tps = median(runs);
            let gbs = weight_bytes as f64 * tps / b as f64 / 1e9;
            // Context during the timed steps: the prefilled tokens plus half the steps.
            let roof = self
                .roofline
                .as_ref()
                .map(|r| r.decode(b, a.context + a.decode_steps / 2));
            eprintln!(
                "decode batch {b:>3}: {tps:.1} tok/s ({:.1} steps/s, weights read at {gbs:.1} GB/s){}",
                tps / b as f64,
                pct(tps, roof)
            );
            figures.push(DecodeFigure {
                batch: b,
                tokens_per_s: tps,
                roofline: roof,
            });
        }
        Ok(figures)
    }

    /// One run of `--decode-steps` greedy steps of a batch of `b`; tokens/s.
    fn timed_decode(&mut self, b: usize) -> Result<f64> {
        let a = self.a.clone();
        let first = self.take_seqs(b);
        let seqs: Vec<SeqId> = (0..b as SeqId).map(|i| first + i).collect();
        let mut last = Vec::new();
        for (i, &s) in seqs.iter().enumerate() {
            let ids = tokens(a.context, self.vocab(), 10 + i);
            last.push(argmax(&prefill(&mut self.g, s, &ids, a.prefill_chunk)?));
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
            last = self.g.step(&steps)?.iter().map(|o| o.token.unwrap_or(0)).collect();
        }
        let tps = (b * a.decode_steps) as f64 / t.elapsed().as_secs_f64();
        self.g.release(&seqs)?;
        Ok(tps)
    }

    /// The `--streams` serving workload (median of `--repeat`), as JSON.
    fn measure_workload(&mut self) -> Result<Option<serde_json::Value>> {
        let a = self.a.clone();
        let Some(streams) = a.streams else {
            return Ok(None);
        };
        let requests = a.requests.unwrap_or(3 * streams);
        let (mut runs, mut generated) = (Vec::new(), 0);
        for _ in 0..a.repeat {
            let first = self.take_seqs(requests);
            let (secs, tokens) = serving_workload(&mut self.g, &a, streams, requests, first)?;
            runs.push(secs);
            generated = tokens;
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
        Ok(Some(serde_json::json!({
            "streams": streams,
            "requests": requests,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "seconds": secs,
            "generated_tokens": generated,
            "output_tokens_per_s": output,
        })))
    }

    /// The figures as JSON (`--json`) or a table.
    fn report(&self, prefill_tps: f64, decode: &[DecodeFigure], workload: Option<serde_json::Value>) {
        let cfg = self.g.config();
        let weight_bytes = self.g.weight_bytes();
        let prefill_roof = self.roofline.as_ref().map(|r| r.prefill(self.a.prompt_len));
        if self.a.json {
            let summary = serde_json::json!({
                "workload": workload,
                "params": cfg.num_params(),
                "dtype": dtype_name(self.dtype),
                "device": self.device.to_string(),
                "tp": self.a.tp,
                "weight_bytes_per_decode_step": weight_bytes,
                "prefill_tokens_per_s": prefill_tps,
                "prefill_roofline_tokens_per_s": prefill_roof,
                "prompt_len": self.a.prompt_len,
                "machine": self.roofline.as_ref().map(|r| &r.machine),
                "decode": decode
                    .iter()
                    .map(|d| serde_json::json!({
                        "batch": d.batch,
                        "tokens_per_s": d.tokens_per_s,
                        "roofline_tokens_per_s": d.roofline,
                    }))
                    .collect::<Vec<_>>(),
            });
            println!("{summary}");
            return;
        }
        println!(
            "weights read per decode step: {} bytes ({:.1} MB)",
            weight_bytes,
            weight_bytes as f64 / 1e6
        );
        if let Some(r) = &self.roofline {
            println!(
                "machine: {:.1} GB/s, {:.0} GFLOP/s ({})",
                r.machine.bandwidth_gbs, r.machine.matmul_gflops, r.machine.method
            );
        }
        println!("prefill: {prefill_tps:.1} tok/s{}", pct(prefill_tps, prefill_roof));
        for d in decode {
            println!(
                "decode batch {}: {:.1} tok/s{}",
                d.batch,
                d.tokens_per_s,
                pct(d.tokens_per_s, d.roofline)
            );
        }
    }
}

/// " = N% of the roofline" when there is one.
fn pct(value: f64, limit: Option<f64>) -> String {
    match limit {
        Some(l) => format!(" = {:.0}% of the {l:.1} tok/s roofline", 100.0 * value / l),
        None => String::new(),
    }
}
