//! `sirocco bench`: a load generator against a running router. Sends streamed
//! requests over gRPC (`GenerateStream`) or the OpenAI-compatible HTTP API
//! (`POST /v1/completions` or `/v1/chat/completions`), at a fixed concurrency or with
//! Poisson arrivals, and reports throughput, TTFT, TPOT, inter-token latency,
//! end-to-end latency, goodput and the prefix cache's hit rate. `--workload
//! shared-prefix` and `multi-turn` run a prefix-cache workload twice, the cache off
//! then on, and compare the two. `--structured json-schema` runs requests constrained
//! by a JSON Schema, unconstrained and mixed, at 1 and 16 streams, and compares their
//! TPOT. Token counts are what the client received when the
//! server returns token ids (ours does); any other OpenAI-compatible server is counted
//! by its `usage`, else by a tokenizer over the streamed text, else one token per
//! chunk, and the report names the method. `--compare` tables saved `--json` runs.
//!
//! This file holds the flags and the procedure (`bench`); its steps live in bench/:
//! workload.rs and prompts.rs draw the prompts, target.rs reaches the server (with
//! a file per protocol), driver.rs releases the requests, record.rs is what one
//! request saw, report.rs sums them up, compare.rs tables saved reports; prefix.rs
//! runs the prefix-cache workloads and structured.rs the structured-output one (each
//! with a folder of its own); stub.rs is the tests' stub router.

mod compare;
mod driver;
mod prefix;
mod prompts;
mod record;
mod report;
mod structured;
#[cfg(test)]
mod stub;
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
use structured::Structured;
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
    /// sirocco.v1.Sirocco/Session on --addr: every request of the run on one
    /// multiplexed stream.
    Session,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::Openai => "openai",
            Api::OpenaiChat => "openai-chat",
            Api::Session => "session",
        }
    }

    fn is_http(self) -> bool {
        matches!(self, Api::Openai | Api::OpenaiChat)
    }
}

/// What the requests are.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Independent prompts, from --prompt, --dataset, --corpus or random ids.
    Independent,
    /// Every request is one of --prefix-groups system prompts (--shared-prefix tokens,
    /// default 1024) and its own question (--input-len, default 32); run with the
    /// prefix cache off, then on. gRPC only.
    SharedPrefix,
    /// --conversations chats of --turns turns; each turn resends the conversation so
    /// far (a system prompt of --shared-prefix tokens, default 256, then every user
    /// turn and answer) and a new user turn of --input-len tokens (default 32); run
    /// with the prefix cache off, then on. gRPC only.
    MultiTurn,
}

impl WorkloadKind {
    fn name(self) -> &'static str {
        match self {
            WorkloadKind::Independent => "independent",
            WorkloadKind::SharedPrefix => "shared-prefix",
            WorkloadKind::MultiTurn => "multi-turn",
        }
    }
}

/// How requests (or conversations) are spread over the --prefix-groups.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum GroupOrder {
    /// Request i to group i mod K.
    RoundRobin,
    /// Each to a group drawn from --seed.
    Random,
}

impl GroupOrder {
    fn name(self) -> &'static str {
        match self {
            GroupOrder::RoundRobin => "round-robin",
            GroupOrder::Random => "random",
        }
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
    /// the requests in flight instead. With --workload multi-turn, the conversations
    /// in flight; with shared-prefix, 16 when neither this nor --request-rate is given;
    /// with --structured, the only number of streams run (instead of 1 and 16).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Poisson arrivals at this many requests/s; `inf` sends all at once. The default
    /// when neither this nor --concurrency is given (but for the prefix-cache
    /// workloads).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Requests measured [default: 100; per phase and number of streams with
    /// --structured: 2 per stream, at least 8].
    #[arg(long)]
    pub num_requests: Option<usize>,
    /// Requests sent first and left out of the report [default: 0; 2 before each phase
    /// of a prefix-cache workload, with prompts of their own; 2 before a --structured
    /// run, constrained and not].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Prompt length in tokens (random token ids) [default: 128; the question or user
    /// turn after the shared prefix with --workload shared-prefix or multi-turn: 32].
    #[arg(long)]
    pub input_len: Option<usize>,
    /// Varies each prompt's length uniformly within ±this fraction of --input-len.
    #[arg(long, default_value_t = 0.0)]
    pub input_len_range: f64,
    /// Send this text as every prompt instead of random token ids.
    #[arg(long, conflicts_with = "input_len_range")]
    pub prompt: Option<String>,
    /// Tokens generated per request [default: 64; with --structured, at most this
    /// many, default 256].
    #[arg(long)]
    pub output_len: Option<u32>,
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
    /// --input-len tokens: the workload a prefix cache serves. The system prompt's
    /// length with --workload shared-prefix (default 1024) or multi-turn (default 256).
    #[arg(long, value_name = "TOKENS", conflicts_with_all = ["prompt", "dataset"])]
    pub shared_prefix: Option<usize>,
    /// What the requests are; shared-prefix and multi-turn run twice, with every
    /// request opted out of the prefix cache and then with the server's default (on),
    /// on fresh prompts each time, and report both and their ratios.
    #[arg(long, value_enum, default_value_t = WorkloadKind::Independent)]
    pub workload: WorkloadKind,
    /// Distinct system prompts with --workload shared-prefix or multi-turn [default: 1].
    #[arg(long, value_name = "K")]
    pub prefix_groups: Option<usize>,
    /// How requests (multi-turn: conversations) are assigned to the --prefix-groups
    /// [default: round-robin].
    #[arg(long, value_enum)]
    pub group_order: Option<GroupOrder>,
    /// Conversations with --workload multi-turn, all in flight unless --concurrency
    /// caps them [default: 16].
    #[arg(long)]
    pub conversations: Option<usize>,
    /// Turns per conversation with --workload multi-turn [default: 6].
    #[arg(long)]
    pub turns: Option<usize>,
    /// Measure what constraining outputs costs: at 1 and 16 streams (or --concurrency),
    /// a closed loop of --num-requests (default: 2 per stream, at least 8) constrained
    /// requests, as many unconstrained ones each as long as the constrained one of its
    /// number, then the two mixed; report their TPOT side by side and check the outputs.
    #[arg(long, value_enum, value_name = "KIND")]
    pub structured: Option<Structured>,
    /// The JSON Schema of --structured json-schema [default: a built-in customer record].
    #[arg(long, value_name = "FILE")]
    pub schema: Option<PathBuf>,
    /// With --structured, run each phase's requests in this many rounds, the phases
    /// taking turns, so that a machine whose speed drifts (a shared one) slows every
    /// phase alike; keep --num-requests / N at least the streams, or rounds run
    /// below them [default: 1].
    #[arg(long, value_name = "N")]
    pub rounds: Option<usize>,
    /// Send only standard OpenAI fields (no ignore_eos or return_token_ids), for
    /// servers that refuse unknown ones; outputs may then end early at EOS.
    #[arg(long)]
    pub no_extensions: bool,
}

impl BenchArgs {
    /// --num-requests, or its default.
    pub fn num_requests(&self) -> usize {
        self.num_requests.unwrap_or(100)
    }

    /// --warmup, or its default for the workload (per phase of a prefix-cache one).
    pub fn warmup(&self) -> usize {
        self.warmup.unwrap_or(match (self.workload, self.structured) {
            (WorkloadKind::Independent, None) => 0,
            _ => 2,
        })
    }

    /// --output-len, or its default (room for a JSON output with --structured).
    pub fn output_len(&self) -> u32 {
        self.output_len.unwrap_or(match self.structured {
            Some(_) => structured::DEFAULT_OUTPUT_LEN,
            None => 64,
        })
    }

    /// --input-len, or its default for the workload.
    pub fn input_len(&self) -> usize {
        self.input_len.unwrap_or(match self.workload {
            WorkloadKind::Independent => 128,
            _ => 32,
        })
    }
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
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    match a.workload {
        WorkloadKind::Independent if a.structured.is_some() => rt.block_on(structured::bench(a, timeout)),
        WorkloadKind::Independent => {
            let load = Load::of(&a);
            rt.block_on(bench(a, load, timeout))
        }
        WorkloadKind::SharedPrefix | WorkloadKind::MultiTurn => rt.block_on(prefix::bench(a, timeout)),
    }
}

/// Refuses flags out of range before anything is sent.
fn check_args(a: &BenchArgs) -> Result<()> {
    if a.num_requests == Some(0) {
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
    if a.prompt.is_none() && a.input_len() == 0 {
        bail!("--input-len must be at least 1");
    }
    if a.output_len == Some(0) {
        bail!("--output-len must be at least 1");
    }
    prefix::check_args(a)?;
    structured::check_args(a)
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
    let Setup {
        seed,
        tokenizer,
        source,
        router,
        vocab,
    } = Setup::of(&a, &server).await?;
    // Connections enough for the most requests in flight, warmup or measured.
    let max_in_flight = load.in_flight(a.num_requests()).min(a.num_requests().max(a.warmup()));
    let target = Arc::new(server.open(&a, router, max_in_flight, tokenizer, timeout).await?);
    let Workload { warmup, measured } = workload::build(&a, &source, seed, vocab, target.tokenizer.as_ref())?;
    let warmup = warm_up(&target, warmup, load, seed, Batch::new("warmup", "warmup")).await?;
    let cpu_before = target.router_cpu_seconds().await;
    let run = drive(target.clone(), measured, load, seed, Batch::new("run", "bench")).await;
    let router_cpu = cpu_before.zip(target.router_cpu_seconds().await).map(|(b, a)| a - b);
    let report = Report::new(&a, load, seed, &source, &target, warmup, &run).with_router_cpu(router_cpu);
    report.print(a.json)?;
    if report.stats.completed == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}

/// What a run of independent prompts settles before it connects: its seed, tokenizer,
/// prompts' source, the router's model (where asked) and the vocabulary.
struct Setup {
    seed: u64,
    tokenizer: Option<Tokenizer>,
    source: Source,
    router: Option<RouterModel>,
    vocab: Option<u32>,
}

impl Setup {
    /// Settles `a`'s run against `server`, asking the router for its model where the
    /// run needs it and refusing a run that does not fit it.
    async fn of(a: &BenchArgs, server: &Server) -> Result<Setup> {
        let seed = a.seed.unwrap_or_else(rand::random);
        let tokenizer = a.tokenizer.as_deref().map(load_tokenizer).transpose()?;
        let source = Source::of(a);
        let router = ask_router(a, server, &source).await?;
        if let Some(router) = &router {
            check_fits_router(a, longest_prompt(a, &source), &router.info)?;
        }
        let vocab = a.vocab_size.or(router.as_ref().map(|r| r.info.vocab_size));
        Ok(Setup {
            seed,
            tokenizer,
            source,
            router,
            vocab,
        })
    }
}

/// Asks the router for its model when the run needs its gRPC: for the requests
/// themselves, or for the vocabulary of random prompts.
async fn ask_router(a: &BenchArgs, server: &Server, source: &Source) -> Result<Option<RouterModel>> {
    let needs_grpc = !a.api.is_http() || (matches!(source, Source::RandomIds) && a.vocab_size.is_none());
    Ok(if needs_grpc {
        Some(server.ask_model(a.api).await?)
    } else {
        None
    })
}

/// The longest prompt of an independent workload in tokens, where --input-len sizes
/// it.
fn longest_prompt(a: &BenchArgs, source: &Source) -> Option<usize> {
    let (_, hi) = workload::length_range(a.input_len(), a.input_len_range);
    source.sized().then(|| hi + a.shared_prefix.unwrap_or(0))
}

/// Refuses a run the router would refuse: outputs over its limit, or prompts of up to
/// `longest` tokens (where known) that cannot fit the model's context with their
/// outputs.
fn check_fits_router(a: &BenchArgs, longest: Option<usize>, info: &sirocco_proto::v1::ModelInfoResponse) -> Result<()> {
    let output_len = a.output_len();
    if info.max_new_tokens_limit > 0 && output_len > info.max_new_tokens_limit {
        bail!(
            "--output-len {output_len} is over the router's limit of {} new tokens",
            info.max_new_tokens_limit
        );
    }
    let over = |l: usize| l as u64 + output_len as u64 > info.max_context as u64;
    if let Some(longest) = longest.filter(|&l| info.max_context > 0 && over(l)) {
        bail!(
            "prompts of up to {longest} tokens plus {output_len} output tokens exceed the model's context of {}",
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    /// `sirocco bench` with `flags`, as clap reads them.
    pub(super) fn args(flags: &[&str]) -> BenchArgs {
        Cli::parse_from(std::iter::once("bench").chain(flags.iter().copied())).bench
    }

    /// Why `flags` are refused before anything is sent; panics if they are not.
    pub(super) fn refused(flags: &[&str]) -> String {
        match check_args(&args(flags)) {
            Ok(()) => panic!("{flags:?} passed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_follow_the_workload() {
        let a = args(&[]);
        assert_eq!((a.num_requests(), a.warmup(), a.input_len()), (100, 0, 128));
        let a = args(&["--workload", "shared-prefix"]);
        assert_eq!((a.num_requests(), a.warmup(), a.input_len()), (100, 2, 32));
        let a = args(&["--workload", "multi-turn", "--input-len", "16", "--warmup", "0"]);
        assert_eq!((a.warmup(), a.input_len()), (0, 16));
    }
}
