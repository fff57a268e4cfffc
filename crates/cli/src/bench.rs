//! `sirocco bench`: a load generator against a running router. Sends streamed
//! requests over gRPC (`GenerateStream`) or the OpenAI-compatible HTTP API
//! (`POST /v1/completions` or `/v1/chat/completions`), at a fixed concurrency or with
//! Poisson arrivals, and reports throughput, TTFT, TPOT, inter-token latency,
//! end-to-end latency and goodput. Token counts are what the client received when the
//! server returns token ids (ours does); any other OpenAI-compatible server is counted
//! by its `usage`, else by a tokenizer over the streamed text, else one token per
//! chunk, and the report names the method. `--compare` tables saved `--json` runs.
//!
//! This file holds the flags and the procedure (`bench`); its steps live in bench/:
//! workload.rs and prompts.rs draw the prompts, target.rs reaches the server (with
//! a file per protocol), driver.rs releases the requests, record.rs is what one
//! request saw, report.rs sums them up, compare.rs tables saved reports.

mod compare;
mod driver;
mod prompts;
mod record;
mod report;
mod target;
mod workload;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use driver::{drive, Batch, Load};
use report::{Report, Summary, WarmupReport};
use sirocco_tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use target::{RouterModel, Server, Target};
use workload::{Prompt, Source, Workload};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// sirocco.v1.Sirocco/GenerateStream on --addr.
    Grpc,
    /// POST /v1/completions (stream=true) on --http-addr.
    Openai,
    /// POST /v1/chat/completions (stream=true) on --http-addr, the prompt as one user turn.
    OpenaiChat,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::Openai => "openai",
            Api::OpenaiChat => "openai-chat",
        }
    }

    fn is_http(self) -> bool {
        self != Api::Grpc
    }
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// The router's gRPC address (also asked for the vocabulary size with --api openai).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// The router's HTTP address, for --api openai.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub http_addr: String,
    #[arg(long, value_enum, default_value_t = Api::Grpc)]
    pub api: Api,
    /// Keep this many requests in flight (a closed loop). With --request-rate, caps
    /// the requests in flight instead.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Poisson arrivals at this many requests/s; `inf` sends all at once. The default
    /// when neither this nor --concurrency is given.
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Requests measured.
    #[arg(long, default_value_t = 100)]
    pub num_requests: usize,
    /// Requests sent first and left out of the report.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Prompt length in tokens (random token ids).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Varies each prompt's length uniformly within ±this fraction of --input-len.
    #[arg(long, default_value_t = 0.0)]
    pub input_len_range: f64,
    /// Send this text as every prompt instead of random token ids.
    #[arg(long, conflicts_with = "input_len_range")]
    pub prompt: Option<String>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    pub output_len: u32,
    /// Let requests stop at the end-of-sequence token (output lengths then vary).
    #[arg(long)]
    pub no_ignore_eos: bool,
    /// Seeds prompt generation and arrival times; a different one each run when absent
    /// (so a server's prompt cache cannot serve a repeated run), printed in the report.
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Vocabulary size for random prompts; asked of the router (ModelInfo) when absent.
    #[arg(long)]
    pub vocab_size: Option<u32>,
    /// The `model` of OpenAI requests; the first of GET /v1/models when absent.
    #[arg(long)]
    pub model: Option<String>,
    /// Sent as `authorization: Bearer KEY` on gRPC and HTTP, for a router started with --api-key.
    #[arg(long, env = "SIROCCO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A request taking longer than this many seconds fails.
    #[arg(long)]
    pub request_timeout: Option<f64>,
    /// Time-to-first-token SLO for goodput, in ms.
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// Time-per-output-token SLO for goodput, in ms.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// End-to-end latency SLO for goodput, in ms.
    #[arg(long)]
    pub slo_e2e_ms: Option<f64>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Counts streamed text in tokens when the server returns neither token ids nor
    /// `usage`, and sizes text prompts: a tokenizer.json, a model directory or a GGUF file.
    #[arg(long, value_name = "FILE|DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Text prompts of English sentences from a built-in corpus (about --input-len
    /// tokens) instead of random token ids; the default with --api openai-chat.
    #[arg(long, conflicts_with = "prompt")]
    pub corpus: bool,
    /// Text prompts from a ShareGPT-style file (JSON lines or an array of
    /// {"conversations": [{"from": "human", "value": ...}, ...]}): each record's first
    /// human turn, in an order drawn from --seed.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["prompt", "corpus"])]
    pub dataset: Option<PathBuf>,
    /// Print one table of runs saved with --json, and run nothing.
    #[arg(long, num_args = 1.., value_name = "RUN.json")]
    pub compare: Vec<PathBuf>,
    /// Every prompt starts with the same prefix of this many tokens (a system prompt
    /// all clients share, drawn once per run like the prompts), then its own
    /// --input-len tokens: the workload a prefix cache serves.
    #[arg(long, value_name = "TOKENS", conflicts_with_all = ["prompt", "dataset"])]
    pub shared_prefix: Option<usize>,
    /// Send only standard OpenAI fields (no ignore_eos or return_token_ids), for
    /// servers that refuse unknown ones; outputs may then end early at EOS.
    #[arg(long)]
    pub no_extensions: bool,
}

/// --tokenizer: a tokenizer.json itself, or whatever `generate --model` accepts (a
/// model directory, a GGUF file).
fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_file() && path.extension().is_some_and(|e| e == "json") {
        return Tokenizer::from_file(path).with_context(|| format!("cannot load the tokenizer {}", path.display()));
    }
    crate::generate::load_tokenizer(Some(path))?.with_context(|| format!("{} has no tokenizer", path.display()))
}

pub fn run(a: BenchArgs) -> Result<()> {
    if !a.compare.is_empty() {
        return compare::print(&a.compare);
    }
    check_args(&a)?;
    let timeout = request_timeout(&a)?;
    let load = Load::of(&a);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    rt.block_on(bench(a, load, timeout))
}

/// Refuses flags out of range before anything is sent.
fn check_args(a: &BenchArgs) -> Result<()> {
    if a.num_requests == 0 {
        bail!("--num-requests must be at least 1");
    }
    if a.concurrency == Some(0) {
        bail!("--concurrency must be at least 1");
    }
    if let Some(r) = a.request_rate {
        if r.is_nan() || r <= 0.0 {
            bail!("--request-rate must be > 0 (or inf), got {r}");
        }
    }
    if !(0.0..1.0).contains(&a.input_len_range) {
        bail!("--input-len-range must be in [0, 1), got {}", a.input_len_range);
    }
    if a.prompt.is_none() && a.input_len == 0 {
        bail!("--input-len must be at least 1");
    }
    if a.output_len == 0 {
        bail!("--output-len must be at least 1");
    }
    Ok(())
}

/// --request-timeout as a duration.
fn request_timeout(a: &BenchArgs) -> Result<Option<Duration>> {
    Ok(match a.request_timeout {
        Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => bail!("--request-timeout must be > 0 seconds, got {t}"),
        None => None,
    })
}

/// The procedure: ask the router for its model where needed and check the run fits
/// it, connect, draw the prompts, warm up, run the measured load, report.
async fn bench(a: BenchArgs, load: Load, timeout: Option<Duration>) -> Result<()> {
    let server = Server::new(&a)?;
    let seed = a.seed.unwrap_or_else(rand::random);
    let tokenizer = a.tokenizer.as_deref().map(load_tokenizer).transpose()?;
    let source = Source::of(&a);
    let router = ask_router(&a, &server, &source).await?;
    if let Some(router) = &router {
        check_fits_router(&a, &source, &router.info)?;
    }
    let vocab = a.vocab_size.or(router.as_ref().map(|r| r.info.vocab_size));
    // Connections enough for the most requests in flight, warmup or measured.
    let max_in_flight = load.in_flight(a.num_requests).min(a.num_requests.max(a.warmup));
    let target = Arc::new(server.open(&a, router, max_in_flight, tokenizer, timeout).await?);
    let Workload { warmup, measured } = workload::build(&a, &source, seed, vocab, target.tokenizer.as_ref())?;
    let warmup = warm_up(&target, warmup, load, seed, Batch::new("warmup", "warmup")).await?;
    let run = drive(target.clone(), measured, load, seed, Batch::new("run", "bench")).await;
    let report = Report::new(&a, load, seed, &source, &target, warmup, &run);
    report.print(a.json)?;
    if report.stats.completed == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}

/// Asks the router for its model when the run needs its gRPC: for the requests
/// themselves, or for the vocabulary of random prompts.
async fn ask_router(a: &BenchArgs, server: &Server, source: &Source) -> Result<Option<RouterModel>> {
    let needs_grpc = a.api == Api::Grpc || (matches!(source, Source::RandomIds) && a.vocab_size.is_none());
    Ok(if needs_grpc {
        Some(server.ask_model(a.api).await?)
    } else {
        None
    })
}

/// Refuses a run the router would refuse: outputs over its limit, or prompts sized
/// by --input-len that cannot fit the model's context with their outputs.
fn check_fits_router(a: &BenchArgs, source: &Source, info: &sirocco_proto::v1::ModelInfoResponse) -> Result<()> {
    if info.max_new_tokens_limit > 0 && a.output_len > info.max_new_tokens_limit {
        bail!(
            "--output-len {} is over the router's limit of {} new tokens",
            a.output_len,
            info.max_new_tokens_limit
        );
    }
    let longest = (a.input_len as f64 * (1.0 + a.input_len_range)).ceil() as u64 + a.shared_prefix.unwrap_or(0) as u64;
    if source.sized() && info.max_context > 0 && longest + a.output_len as u64 > info.max_context as u64 {
        bail!(
            "prompts of up to {longest} tokens plus {} output tokens exceed the model's context of {}",
            a.output_len,
            info.max_context
        );
    }
    Ok(())
}

/// Sends the warmup prompts as `batch`, left out of the measurement, as many in flight
/// as the measured load allows; fails when every one does.
async fn warm_up(
    target: &Arc<Target>,
    prompts: Vec<Prompt>,
    load: Load,
    seed: u64,
    batch: Batch,
) -> Result<WarmupReport> {
    let n = prompts.len();
    if n == 0 {
        return Ok(WarmupReport::none());
    }
    let closed = Load::Closed(load.in_flight(n));
    let run = drive(target.clone(), prompts, closed, seed, batch).await;
    let s = Summary::of(&run.records);
    if s.ok.is_empty() {
        bail!("every warmup request failed; the first: {}", s.errors.join("; "));
    }
    Ok(WarmupReport::of(n, &s))
}
