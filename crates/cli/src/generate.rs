//! `sirocco generate`: one prompt through an in-process tensor-parallel group.

use anyhow::{bail, Context, Result};
use clap::Args;
use sirocco_engine::{generate_batch, EngineOptions, GenerateRequest, TpGroup};
use sirocco_model::{dtype_name, DeviceSpec, ModelSource};
use sirocco_sampling::SamplingParams;
use sirocco_scheduler::SchedulerConfig;
use sirocco_tokenizer::{StreamDecoder, Tokenizer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Hugging Face checkpoint directory or llama.cpp .gguf file; the built-in model when absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tensor-parallel degree (ranks run as threads).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Prompt tokens per prefill step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Compute and weight dtype: f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda).
    #[arg(long)]
    pub dtype: Option<String>,
    #[arg(long, value_parser = ["int8", "int4"], help = crate::QUANTIZE_HELP)]
    pub quantize: Option<String>,
    /// Where to compute: cpu, cuda or cuda:N (cuda needs a build with the cuda feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Prompt text (tokenized with BOS added).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt token ids, used as given (no BOS added), e.g. 1,5,7.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Greedy decoding (overrides temperature and the other sampling flags).
    #[arg(long)]
    pub greedy: bool,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object: prompt_ids, generated_ids, text, prompt_last_logits.
    #[arg(long)]
    pub json: bool,
    /// Also score the prompt: each token's log-probability after the ones before it
    /// and the perplexity (`prompt_logprobs`, `perplexity` in --json).
    #[arg(long)]
    pub score: bool,
}

impl GenerateArgs {
    fn sampling(&self) -> SamplingParams {
        if self.greedy {
            return SamplingParams::greedy();
        }
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ..SamplingParams::greedy()
        }
    }
}

/// The tokenizer that goes with a model: the vocabulary inside a GGUF file,
/// `tokenizer.json` in a checkpoint directory, or the built-in one. `None` when the
/// checkpoint has no tokenizer.
pub fn load_tokenizer(model: Option<&Path>) -> Result<Option<Tokenizer>> {
    match model {
        None => Ok(Some(Tokenizer::builtin())),
        Some(file) if sirocco_model::gguf::is_gguf(file) => {
            let content = sirocco_model::gguf::read_content(file)?;
            if !content.metadata.contains_key("tokenizer.ggml.model") {
                return Ok(None);
            }
            let tokenizer = Tokenizer::from_gguf_metadata(&content.metadata)
                .with_context(|| format!("cannot build the tokenizer of {}", file.display()))?;
            Ok(Some(tokenizer))
        }
        Some(dir) => Tokenizer::from_model_dir(dir),
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = args.sampling();
    sampling.validate()?;
    let tokenizer = load_tokenizer(args.model.as_deref())?;
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            if text.is_empty() {
                bail!("--prompt is empty (to start from BOS alone, pass --prompt-ids with the BOS id)");
            }
            let tok = tokenizer.as_ref().with_context(|| {
                format!(
                    "{} has no tokenizer (tokenizer.json, or tokenizer.ggml.* metadata in a GGUF file): \
                     pass --prompt-ids instead of --prompt",
                    args.model.as_deref().unwrap_or(Path::new(".")).display()
                )
            })?;
            tok.encode(text, true)?
        }
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let device = DeviceSpec::parse(&args.device)?;
    let dtype = device.dtype_or_default(args.dtype.as_deref())?;
    let opts = EngineOptions {
        tp: args.tp,
        dtype,
        device,
        quantize: args.quantize.as_deref().map(str::parse).transpose()?,
        ..EngineOptions::default()
    };
    let source = ModelSource::from_arg(args.model.as_deref());
    let t0 = Instant::now();
    let mut group = TpGroup::load(&source, &opts)?;
    let cfg = group.config().clone();
    tracing::info!(
        model = %args.model.as_deref().map_or("built-in".into(), |p| p.display().to_string()),
        tp = args.tp,
        dtype = dtype_name(dtype),
        device = %device,
        params = cfg.num_params(),
        secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
        "model loaded"
    );
    if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!(
            "prompt token id {bad} is outside the vocabulary (size {})",
            cfg.vocab_size
        );
    }
    if let Some(t) = &tokenizer {
        t.check_fits(cfg.vocab_size)?;
    }
    let mut eos_ids = cfg.eos_token_ids.clone();
    for &e in tokenizer.as_ref().map_or(&[][..], |t| t.eos_ids()) {
        if !eos_ids.contains(&e) {
            eos_ids.push(e);
        }
    }
    let request = GenerateRequest {
        prompt_ids: prompt_ids.clone(),
        max_new_tokens: args.max_new_tokens,
        sampling,
        eos_ids,
        ignore_eos: args.ignore_eos,
        // One request in a fresh engine: nothing to share.
        prefix_cache: false,
    };

    let mut stream = tokenizer
        .as_ref()
        .filter(|_| !args.json)
        .map(|t| StreamDecoder::new(t, &prompt_ids));
    if let (Some(text), Some(_)) = (&args.prompt, &stream) {
        print!("{text}");
    }
    // One request: the whole chunk is its step's prefill budget.
    let schedule = SchedulerConfig {
        prefill_chunk: args.prefill_chunk,
        prefill_budget: args.prefill_chunk,
        ..SchedulerConfig::default()
    };
    let t1 = Instant::now();
    let mut stdout = std::io::stdout();
    let mut on_token = |_: usize, tok: u32| {
        if let Some(s) = stream.as_mut() {
            if let Ok(piece) = s.push(tok) {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
        }
    };
    let out = generate_batch(&mut group, &[request], &schedule, 0, &mut on_token)?
        .pop()
        .expect("one request gives one generation");
    let secs = t1.elapsed().as_secs_f64();
    if let Some(s) = stream.as_mut() {
        println!("{}", s.finish()?);
    }
    let scored = if args.score {
        let lp = sirocco_engine::score(&mut group, &prompt_ids, 1)?;
        let ppl = (-lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len().max(1) as f64).exp();
        if !args.json {
            println!("perplexity of the prompt: {ppl:.4} over {} tokens", lp.len());
        }
        Some((lp, ppl))
    } else {
        None
    };
    let text = match &tokenizer {
        Some(t) => t.decode(&out.generated_ids, true)?,
        None => String::new(),
    };
    if args.json {
        let mut j = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": out.generated_ids,
            "text": text,
            "prompt_last_logits": out.prompt_last_logits,
            "finish_reason": out.finish_reason,
        });
        if let Some((lp, ppl)) = &scored {
            j["prompt_logprobs"] = serde_json::json!(lp);
            j["perplexity"] = serde_json::json!(ppl);
        }
        println!("{j}");
    } else if stream.is_none() {
        println!("{:?}", out.generated_ids);
    }
    tracing::info!(
        prompt_tokens = prompt_ids.len(),
        generated_tokens = out.generated_ids.len(),
        finish = ?out.finish_reason,
        secs = format!("{secs:.2}"),
        "done"
    );
    Ok(())
}
