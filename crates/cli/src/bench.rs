//! `sirocco bench`: a load generator against a running router. Sends streamed
//! requests over gRPC (`GenerateStream`) or the OpenAI-compatible HTTP API
//! (`POST /v1/completions` or `/v1/chat/completions`), at a fixed concurrency or with
//! Poisson arrivals, and reports throughput, TTFT, TPOT, inter-token latency,
//! end-to-end latency and goodput. Token counts are what the client received when the
//! server returns token ids (ours does); any other OpenAI-compatible server is counted
//! by its `usage`, else by a tokenizer over the streamed text, else one token per
//! chunk, and the report names the method. `--compare` tables saved `--json` runs.

mod compare;
mod prompts;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};
use sirocco_proto::v1 as pb;
use sirocco_tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// Error messages kept for the report; the rest are only counted.
const MAX_ERRORS_SHOWN: usize = 5;
/// In-flight streams per gRPC connection, so HTTP/2 stream limits never queue requests
/// on the client side.
const STREAMS_PER_CONNECTION: usize = 64;
const MAX_CONNECTIONS: usize = 16;
/// Token ids below this are the special tokens (unk, BOS, EOS) of Mistral vocabularies.
const FIRST_ORDINARY_TOKEN: u32 = 3;

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

/// What one request sends.
#[derive(Clone, Debug)]
enum Prompt {
    Ids(Vec<u32>),
    Text(String),
}

/// What one request saw. Times are from when it was sent.
#[derive(Debug, Default)]
struct Record {
    input_tokens: usize,
    output_tokens: usize,
    ttft: Option<Duration>,
    /// Gaps between consecutive tokens; tokens arriving in one message have a zero gap.
    itl: Vec<Duration>,
    e2e: Duration,
    error: Option<String>,
    /// How output_tokens was counted.
    output_count: Count,
    /// How input_tokens was counted.
    input_count: Count,
}

/// Where a token count comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Count {
    /// Token ids (or gRPC token events) the client received, or the ids it sent.
    #[default]
    TokenIds,
    /// The server's `usage`.
    Usage,
    /// --tokenizer over the text.
    Tokenizer,
    /// One token per streamed chunk with content.
    Chunks,
    /// Nothing to count with (a text prompt without `usage` or a tokenizer): 0.
    Unknown,
}

impl Count {
    fn name(self) -> &'static str {
        match self {
            Count::TokenIds => "token_ids",
            Count::Usage => "usage",
            Count::Tokenizer => "tokenizer",
            Count::Chunks => "chunks",
            Count::Unknown => "unknown",
        }
    }
}

/// The counting methods of `counts`: one name, or each with its number of requests
/// when they differ (a server that sent `usage` for some streams only).
fn methods(counts: impl Iterator<Item = Count>) -> String {
    let mut by = BTreeMap::new();
    for c in counts {
        *by.entry(c).or_insert(0usize) += 1;
    }
    match by.len() {
        0 => "none".into(),
        1 => by.keys().next().map_or("none", |c| c.name()).into(),
        _ => by
            .iter()
            .map(|(c, n)| format!("{} ({n})", c.name()))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// One streamed chunk of an OpenAI response.
struct Chunk {
    at: Duration,
    /// Its `token_ids`, when the server returns them.
    ids: Option<usize>,
    has_text: bool,
}

impl Record {
    /// Notes `n` tokens arriving now.
    fn tokens(&mut self, n: usize, at: Duration, last: &mut Option<Duration>) {
        for _ in 0..n {
            match *last {
                None => self.ttft = Some(at),
                Some(prev) => self.itl.push(at - prev),
            }
            *last = Some(at);
        }
        self.output_tokens += n;
    }
}

/// Everything a request needs, shared by all of them.
struct Target {
    api: Api,
    channels: Vec<Channel>,
    http: reqwest::Client,
    completions_url: String,
    /// Counts text without token ids or `usage`.
    tokenizer: Option<Tokenizer>,
    model: Option<String>,
    /// `Bearer KEY`, when a key was given.
    bearer: Option<String>,
    output_len: u32,
    ignore_eos: bool,
    /// Send the ignore_eos and return_token_ids extensions.
    extensions: bool,
    temperature: f32,
    timeout: Option<Duration>,
}

/// --tokenizer: a tokenizer.json itself, or whatever `generate --model` accepts (a
/// model directory, a GGUF file).
fn bench_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_file() && path.extension().is_some_and(|e| e == "json") {
        return Tokenizer::from_file(path).with_context(|| format!("cannot load the tokenizer {}", path.display()));
    }
    crate::generate::load_tokenizer(Some(path))?.with_context(|| format!("{} has no tokenizer", path.display()))
}

fn with_scheme(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", addr.trim_end_matches('/'))
    }
}

fn status_msg(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

async fn connect(addr: &str) -> Result<Channel> {
    Endpoint::from_shared(addr.to_string())
        .with_context(|| format!("bad gRPC address {addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach the router at {addr}"))
}

/// A gRPC request carrying the bearer token, if any.
fn grpc_request<T>(msg: T, bearer: Option<&str>) -> Result<tonic::Request<T>, String> {
    let mut req = tonic::Request::new(msg);
    if let Some(b) = bearer {
        let v = b
            .parse()
            .map_err(|_| "the API key is not a valid header value".to_string())?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

async fn model_info(channel: Channel, bearer: Option<&str>) -> Result<pb::ModelInfoResponse> {
    let mut c = pb::sirocco_client::SiroccoClient::new(channel);
    let info = c
        .model_info(grpc_request(pb::ModelInfoRequest {}, bearer).map_err(anyhow::Error::msg)?)
        .await
        .map_err(|s| anyhow::anyhow!("ModelInfo failed: {}", status_msg(&s)))?;
    Ok(info.into_inner())
}

/// The first model GET /v1/models lists, if any.
async fn served_model(http: &reqwest::Client, base: &str, bearer: Option<&str>) -> Option<String> {
    let mut req = http.get(format!("{base}/v1/models"));
    if let Some(b) = bearer {
        req = req.header("authorization", b);
    }
    let v: Value = req.send().await.ok()?.json().await.ok()?;
    v["data"][0]["id"].as_str().map(String::from)
}

impl Target {
    async fn send(&self, i: usize, tag: &str, prompt: &Prompt) -> Record {
        let mut rec = Record::default();
        let start = Instant::now();
        let request_id = format!("bench-{tag}-{i}");
        let result = {
            let fut = async {
                match self.api {
                    Api::Grpc => self.send_grpc(i, request_id, prompt, start, &mut rec).await,
                    Api::Openai | Api::OpenaiChat => self.send_openai(request_id, prompt, start, &mut rec).await,
                }
            };
            match self.timeout {
                Some(t) => tokio::time::timeout(t, fut)
                    .await
                    .unwrap_or_else(|_| Err(format!("timed out after {t:?}"))),
                None => fut.await,
            }
        };
        rec.e2e = start.elapsed();
        if let Err(e) = result {
            rec.error = Some(e);
        }
        rec
    }

    async fn send_grpc(
        &self,
        i: usize,
        request_id: String,
        prompt: &Prompt,
        start: Instant,
        rec: &mut Record,
    ) -> Result<(), String> {
        let input = match prompt {
            Prompt::Ids(ids) => pb::generate_request::Input::TokenIds(pb::TokenIds { ids: ids.clone() }),
            Prompt::Text(t) => pb::generate_request::Input::Text(t.clone()),
        };
        let req = grpc_request(
            pb::GenerateRequest {
                input: Some(input),
                parameters: Some(pb::SamplingParameters {
                    max_new_tokens: Some(self.output_len),
                    temperature: Some(self.temperature),
                    ignore_eos: self.ignore_eos,
                    ..Default::default()
                }),
                request_id,
                ..Default::default()
            },
            self.bearer.as_deref(),
        )?;
        let mut client = pb::sirocco_client::SiroccoClient::new(self.channels[i % self.channels.len()].clone());
        let mut stream = client
            .generate_stream(req)
            .await
            .map_err(|s| status_msg(&s))?
            .into_inner();
        let mut last = None;
        while let Some(ev) = stream.message().await.map_err(|s| status_msg(&s))? {
            match ev.event {
                Some(pb::generate_stream_response::Event::Token(_)) => rec.tokens(1, start.elapsed(), &mut last),
                Some(pb::generate_stream_response::Event::Finished(f)) => {
                    return settle(
                        rec,
                        prompt,
                        Some(f.prompt_tokens as usize),
                        Some(f.generated_tokens as usize),
                        None,
                    );
                }
                None => {}
            }
        }
        Err("stream ended without a finish event".into())
    }

    async fn send_openai(
        &self,
        request_id: String,
        prompt: &Prompt,
        start: Instant,
        rec: &mut Record,
    ) -> Result<(), String> {
        let mut body = json!({
            "max_tokens": self.output_len,
            "temperature": self.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if self.extensions {
            // Servers that do not know them ignore them (vLLM, llama.cpp, ours); some
            // refuse them, hence --no-extensions.
            body["ignore_eos"] = json!(self.ignore_eos);
            body["return_token_ids"] = json!(true);
        }
        match (self.api, prompt) {
            (Api::OpenaiChat, Prompt::Text(t)) => body["messages"] = json!([{"role": "user", "content": t}]),
            (Api::OpenaiChat, Prompt::Ids(_)) => return Err("chat requests need text prompts".into()),
            (_, Prompt::Ids(ids)) => body["prompt"] = json!(ids),
            (_, Prompt::Text(t)) => body["prompt"] = json!(t),
        }
        if let Some(m) = &self.model {
            body["model"] = json!(m);
        }
        let mut req = self
            .http
            .post(&self.completions_url)
            .header("x-request-id", request_id)
            .json(&body);
        if let Some(b) = &self.bearer {
            req = req.header("authorization", b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("POST {}: {e}", self.completions_url))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(format!("HTTP {status}: {}", truncate(text.trim(), 300)));
        }
        let mut bytes = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut text = String::new();
        let mut usage: Option<(usize, usize)> = None;
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk.map_err(|e| format!("reading the stream: {e}"))?;
            let now = start.elapsed();
            buf.extend_from_slice(&chunk);
            while let Some((event, rest)) = split_event(&buf) {
                let data = sse_data(&event);
                buf = rest;
                let Some(data) = data else { continue };
                if data.trim() == "[DONE]" {
                    return self.count(rec, prompt, &chunks, &text, usage);
                }
                let v: Value =
                    serde_json::from_str(&data).map_err(|e| format!("bad SSE data ({e}): {}", truncate(&data, 200)))?;
                if let Some(err) = v.get("error") {
                    let msg = err["message"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| err.to_string());
                    return Err(format!("server error in stream: {msg}"));
                }
                for choice in v["choices"].as_array().into_iter().flatten() {
                    // Completions stream `text`, chat streams `delta.content`.
                    let content = choice["text"].as_str().or(choice["delta"]["content"].as_str());
                    let content = content.unwrap_or_default();
                    text.push_str(content);
                    chunks.push(Chunk {
                        at: now,
                        ids: choice.get("token_ids").and_then(Value::as_array).map(Vec::len),
                        has_text: !content.is_empty(),
                    });
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    let n = |k: &str| u[k].as_u64().map(|x| x as usize);
                    usage = Some((n("prompt_tokens").unwrap_or(0), n("completion_tokens").unwrap_or(0)));
                }
            }
        }
        Err("stream ended without data: [DONE]".into())
    }

    /// Counts a finished OpenAI stream: by the token ids when every chunk with text had
    /// them, else by `usage`, the tokenizer or the chunks. Without ids, TTFT is the first
    /// chunk with content and ITL the gaps between such chunks, as a user sees them.
    fn count(
        &self,
        rec: &mut Record,
        prompt: &Prompt,
        chunks: &[Chunk],
        text: &str,
        usage: Option<(usize, usize)>,
    ) -> Result<(), String> {
        let (usage_prompt, usage_completion) = usage.unzip();
        let has_ids = chunks.iter().any(|c| c.ids.is_some()) && chunks.iter().all(|c| c.ids.is_some() || !c.has_text);
        if has_ids {
            let mut last = None;
            for c in chunks {
                rec.tokens(c.ids.unwrap_or(0), c.at, &mut last);
            }
            return settle(rec, prompt, usage_prompt, usage_completion, self.tokenizer.as_ref());
        }
        let content: Vec<&Chunk> = chunks.iter().filter(|c| c.has_text).collect();
        rec.ttft = content.first().map(|c| c.at);
        rec.itl = content.windows(2).map(|w| w[1].at - w[0].at).collect();
        (rec.output_tokens, rec.output_count) = match (usage_completion, &self.tokenizer) {
            (Some(n), _) => (n, Count::Usage),
            (None, Some(tok)) => (
                tok.encode(text, false).map_err(|e| format!("{e:#}"))?.len(),
                Count::Tokenizer,
            ),
            (None, None) => (content.len(), Count::Chunks),
        };
        settle(rec, prompt, usage_prompt, None, self.tokenizer.as_ref())
    }
}

/// Sets the input count and checks the server's claims against what was received.
/// A text prompt is counted by `usage`, else by the tokenizer (as the server would,
/// with BOS where the tokenizer adds one; a chat template's tokens are not counted).
fn settle(
    rec: &mut Record,
    prompt: &Prompt,
    server_prompt: Option<usize>,
    server_generated: Option<usize>,
    tokenizer: Option<&Tokenizer>,
) -> Result<(), String> {
    (rec.input_tokens, rec.input_count) = match (prompt, server_prompt, tokenizer) {
        (Prompt::Ids(ids), Some(n), _) if n != ids.len() => {
            return Err(format!("the server counted {n} prompt tokens, {} were sent", ids.len()))
        }
        (Prompt::Ids(ids), _, _) => (ids.len(), Count::TokenIds),
        (Prompt::Text(_), Some(n), _) => (n, Count::Usage),
        (Prompt::Text(t), None, Some(tok)) => (
            tok.encode(t, tok.adds_bos()).map_err(|e| format!("{e:#}"))?.len(),
            Count::Tokenizer,
        ),
        (Prompt::Text(_), None, None) => (0, Count::Unknown),
    };
    match server_generated {
        Some(n) if n != rec.output_tokens => Err(format!(
            "the server reported {n} generated tokens, the client received {}",
            rec.output_tokens
        )),
        _ => Ok(()),
    }
}

/// Splits the first whole SSE event (ended by a blank line) off the buffer.
fn split_event(buf: &[u8]) -> Option<(String, Vec<u8>)> {
    let (end, sep) = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| (p, 2))
        .into_iter()
        .chain(buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4)))
        .min_by_key(|&(p, _)| p)?;
    Some((
        String::from_utf8_lossy(&buf[..end]).into_owned(),
        buf[end + sep..].to_vec(),
    ))
}

/// The `data:` lines of one SSE event, joined; None for comments and other fields.
fn sse_data(event: &str) -> Option<String> {
    let lines: Vec<&str> = event
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// How requests are released.
#[derive(Clone, Copy, Debug)]
enum Load {
    /// A fixed number in flight.
    Closed(usize),
    /// Poisson arrivals (infinite: all at once), optionally capped in flight.
    Poisson { rate: f64, cap: Option<usize> },
}

/// Sends every prompt under `load`; the records in completion order and the time
/// from the first send to the last completion.
async fn drive(
    target: Arc<Target>,
    prompts: Vec<Prompt>,
    load: Load,
    seed: u64,
    tag: &'static str,
    bar: ProgressBar,
) -> (Vec<Record>, Duration) {
    let n = prompts.len();
    let prompts = Arc::new(prompts);
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    let start = Instant::now();
    match load {
        Load::Closed(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c.min(n) {
                let (target, prompts, next, tx) = (target.clone(), prompts.clone(), next.clone(), tx.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = prompts.get(i) else { break };
                        let _ = tx.send(target.send(i, tag, p).await);
                    }
                });
            }
        }
        Load::Poisson { rate, cap } => {
            let sem = cap.map(|c| Arc::new(Semaphore::new(c)));
            let (target, prompts, tx) = (target.clone(), prompts.clone(), tx.clone());
            tokio::spawn(async move {
                // Its own stream, so arrival times do not shift the prompts.
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
                let exp = rand_distr::Exp::new(rate).ok();
                let mut at = start;
                for i in 0..n {
                    if let (Some(exp), true) = (&exp, i > 0 && rate.is_finite()) {
                        at += Duration::from_secs_f64(rng.sample(exp));
                        tokio::time::sleep_until(at).await;
                    }
                    let (target, prompts, tx, sem) = (target.clone(), prompts.clone(), tx.clone(), sem.clone());
                    tokio::spawn(async move {
                        // The request's clock starts once it may go, as a client's would.
                        let _permit = match &sem {
                            Some(s) => s.clone().acquire_owned().await.ok(),
                            None => None,
                        };
                        let _ = tx.send(target.send(i, tag, &prompts[i]).await);
                    });
                }
            });
        }
    }
    drop(tx);
    let mut records = Vec::with_capacity(n);
    let mut failed = 0;
    while let Some(r) = rx.recv().await {
        failed += r.error.is_some() as usize;
        bar.inc(1);
        if failed > 0 {
            bar.set_message(format!("{failed} failed"));
        }
        records.push(r);
        if records.len() == n {
            break;
        }
    }
    let elapsed = start.elapsed();
    // A request task that died sent nothing; it still counts, as a failure.
    records.extend((records.len()..n).map(|_| Record {
        error: Some("the request's task ended without a result".into()),
        ..Default::default()
    }));
    bar.finish_and_clear();
    (records, elapsed)
}

fn progress(n: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_string());
    bar
}

/// Random token-id prompts: lengths within the jitter range, ids in [3, vocab).
/// `prompts`, each after `prefix` (ids before ids; text before text, a blank line
/// between).
fn with_shared_prefix(prompts: Vec<Prompt>, prefix: &Prompt) -> Vec<Prompt> {
    prompts
        .into_iter()
        .map(|p| match (prefix, p) {
            (Prompt::Ids(pre), Prompt::Ids(own)) => Prompt::Ids(pre.iter().chain(&own).copied().collect()),
            (Prompt::Text(pre), Prompt::Text(own)) => Prompt::Text(format!("{pre}\n\n{own}")),
            (_, own) => own,
        })
        .collect()
}

fn random_prompts(rng: &mut ChaCha8Rng, n: usize, len: usize, range: f64, vocab: u32) -> Vec<Prompt> {
    let lo = ((len as f64 * (1.0 - range)).floor() as usize).max(1);
    let hi = ((len as f64 * (1.0 + range)).ceil() as usize).max(lo);
    (0..n)
        .map(|_| {
            let l = rng.random_range(lo..=hi);
            Prompt::Ids((0..l).map(|_| rng.random_range(FIRST_ORDINARY_TOKEN..vocab)).collect())
        })
        .collect()
}

#[derive(Serialize, Debug, Clone, Copy)]
struct Dist {
    mean: f64,
    median: f64,
    p90: f64,
    p99: f64,
}

/// Linear-interpolated percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Mean and percentiles, in ms, of durations in seconds.
fn dist(secs: impl IntoIterator<Item = f64>) -> Option<Dist> {
    let mut v: Vec<f64> = secs.into_iter().map(|s| s * 1000.0).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(Dist {
        mean: v.iter().sum::<f64>() / v.len() as f64,
        median: percentile(&v, 50.0),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
    })
}

/// (e2e - ttft) / (tokens - 1): decode time per token after the first.
fn tpot(r: &Record) -> Option<f64> {
    let ttft = r.ttft?;
    (r.output_tokens > 1).then(|| (r.e2e - ttft).as_secs_f64() / (r.output_tokens - 1) as f64)
}

#[derive(Serialize, Debug)]
struct Slo {
    ttft_ms: Option<f64>,
    tpot_ms: Option<f64>,
    e2e_ms: Option<f64>,
}

impl Slo {
    fn any(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2e_ms.is_some()
    }

    /// A request with one token has no TPOT, so it cannot miss that SLO.
    fn met(&self, r: &Record) -> bool {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        self.ttft_ms.is_none_or(|s| r.ttft.is_some_and(|t| ms(t) <= s))
            && self.tpot_ms.is_none_or(|s| tpot(r).is_none_or(|t| t * 1000.0 <= s))
            && self.e2e_ms.is_none_or(|s| ms(r.e2e) <= s)
    }
}

#[derive(Serialize, Debug)]
struct WarmupReport {
    requests: usize,
    completed: usize,
    failed: usize,
    input_tokens: usize,
    output_tokens: usize,
}

#[derive(Serialize, Debug)]
struct Report {
    api: &'static str,
    target: String,
    model: Option<String>,
    concurrency: Option<usize>,
    /// A number, or "inf".
    request_rate: Option<Value>,
    num_requests: usize,
    input_len: Option<usize>,
    /// Tokens every prompt shares at its start (--shared-prefix).
    shared_prefix: Option<usize>,
    output_len: u32,
    ignore_eos: bool,
    seed: u64,
    /// Where prompts came from: random_ids, text (--prompt), corpus or dataset.
    prompts: &'static str,
    /// How output and input tokens were counted (see `Count`).
    output_token_count: String,
    input_token_count: String,
    warmup: WarmupReport,
    completed: usize,
    failed: usize,
    errors: Vec<String>,
    duration_s: f64,
    total_input_tokens: usize,
    total_output_tokens: usize,
    /// Completed requests/s.
    request_throughput: f64,
    /// Output tokens/s.
    output_throughput: f64,
    /// Input plus output tokens/s.
    total_token_throughput: f64,
    slo: Slo,
    /// Completed requests meeting every SLO given, per second; null without SLOs.
    goodput: Option<f64>,
    goodput_requests: Option<usize>,
    ttft_ms: Option<Dist>,
    tpot_ms: Option<Dist>,
    itl_ms: Option<Dist>,
    e2e_ms: Option<Dist>,
}

fn summarize(records: &[Record]) -> (Vec<&Record>, usize, Vec<String>) {
    let ok: Vec<&Record> = records.iter().filter(|r| r.error.is_none()).collect();
    let errors = records
        .iter()
        .filter_map(|r| r.error.clone())
        .take(MAX_ERRORS_SHOWN)
        .collect();
    let failed = records.len() - ok.len();
    (ok, failed, errors)
}

fn print_table(r: &Report) {
    let line = |k: &str, v: String| println!("{k:<40} {v}");
    let f2 = |x: f64| format!("{x:.2}");
    println!("{:=^60}", " Serving Benchmark Result ");
    line("API:", format!("{} ({})", r.api, r.target));
    if let Some(m) = &r.model {
        line("Model:", m.clone());
    }
    let rate = r.request_rate.as_ref().map(|v| match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    });
    let load = match (rate, r.concurrency) {
        (Some(rate), Some(c)) => format!("Poisson, {rate} req/s, at most {c} in flight"),
        (Some(rate), None) => format!("Poisson, {rate} req/s"),
        (None, c) => format!("{} in flight", c.unwrap_or(1)),
    };
    line("Load:", load);
    line("Seed:", r.seed.to_string());
    line("Prompts:", r.prompts.to_string());
    line(
        "Token counts (output / input):",
        format!("{} / {}", r.output_token_count, r.input_token_count),
    );
    if r.warmup.requests > 0 {
        line(
            "Warmup requests (not counted):",
            format!("{} ({} failed)", r.warmup.requests, r.warmup.failed),
        );
    }
    line("Successful requests:", r.completed.to_string());
    line("Failed requests:", r.failed.to_string());
    for e in &r.errors {
        println!("  error: {e}");
    }
    line("Benchmark duration (s):", f2(r.duration_s));
    line("Total input tokens:", r.total_input_tokens.to_string());
    line("Total output tokens:", r.total_output_tokens.to_string());
    line("Request throughput (req/s):", f2(r.request_throughput));
    if let Some(g) = r.goodput {
        line("Request goodput (req/s):", f2(g));
    }
    line("Output token throughput (tok/s):", f2(r.output_throughput));
    line("Total token throughput (tok/s):", f2(r.total_token_throughput));
    for (title, short, d) in [
        ("Time to First Token", "TTFT", r.ttft_ms),
        ("Time per Output Token (excl. 1st token)", "TPOT", r.tpot_ms),
        ("Inter-token Latency", "ITL", r.itl_ms),
        ("End-to-end Latency", "E2E", r.e2e_ms),
    ] {
        println!("{:-^60}", format!(" {title} "));
        match d {
            Some(d) => {
                line(&format!("Mean {short} (ms):"), f2(d.mean));
                line(&format!("Median {short} (ms):"), f2(d.median));
                line(&format!("P90 {short} (ms):"), f2(d.p90));
                line(&format!("P99 {short} (ms):"), f2(d.p99));
            }
            None => line(&format!("{short} (ms):"), "n/a".into()),
        }
    }
    println!("{}", "=".repeat(60));
}

pub fn run(a: BenchArgs) -> Result<()> {
    if !a.compare.is_empty() {
        return compare::print(&a.compare);
    }
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
    let timeout = match a.request_timeout {
        Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => bail!("--request-timeout must be > 0 seconds, got {t}"),
        None => None,
    };
    let load = match (a.concurrency, a.request_rate) {
        (Some(c), None) => Load::Closed(c),
        (cap, rate) => Load::Poisson {
            rate: rate.unwrap_or(f64::INFINITY),
            cap,
        },
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    rt.block_on(bench(a, load, timeout))
}

async fn bench(a: BenchArgs, load: Load, timeout: Option<Duration>) -> Result<()> {
    let grpc_addr = with_scheme(&a.addr);
    let http_base = with_scheme(&a.http_addr);
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let bearer = a.api_key.as_ref().map(|k| format!("Bearer {k}"));
    let seed = a.seed.unwrap_or_else(rand::random);
    let tokenizer = a.tokenizer.as_deref().map(bench_tokenizer).transpose()?;
    let corpus = a.corpus || (a.api == Api::OpenaiChat && a.prompt.is_none() && a.dataset.is_none());
    let random_ids = a.prompt.is_none() && a.dataset.is_none() && !corpus;

    // gRPC is needed for the requests themselves, or for the vocabulary of random prompts.
    let needs_grpc = a.api == Api::Grpc || (random_ids && a.vocab_size.is_none());
    let (first, info) = if needs_grpc {
        let ch = connect(&grpc_addr).await.with_context(|| {
            if a.api.is_http() {
                "the OpenAI API has no vocabulary size to draw random prompts from: give --addr (the router's gRPC) or --vocab-size, or send text prompts (--corpus, --dataset)".to_string()
            } else {
                "is the router running?".to_string()
            }
        })?;
        let info = model_info(ch.clone(), bearer.as_deref()).await.with_context(|| {
            if a.api.is_http() {
                format!("asking {grpc_addr} for the vocabulary size (or give --vocab-size, or --corpus)")
            } else {
                format!("asking {grpc_addr} for the model")
            }
        })?;
        (Some(ch), Some(info))
    } else {
        (None, None)
    };
    if let Some(info) = &info {
        if info.max_new_tokens_limit > 0 && a.output_len > info.max_new_tokens_limit {
            bail!(
                "--output-len {} is over the router's limit of {} new tokens",
                a.output_len,
                info.max_new_tokens_limit
            );
        }
        let longest =
            (a.input_len as f64 * (1.0 + a.input_len_range)).ceil() as u64 + a.shared_prefix.unwrap_or(0) as u64;
        if (random_ids || corpus) && info.max_context > 0 && longest + a.output_len as u64 > info.max_context as u64 {
            bail!(
                "prompts of up to {longest} tokens plus {} output tokens exceed the model's context of {}",
                a.output_len,
                info.max_context
            );
        }
    }

    let max_in_flight = match load {
        Load::Closed(c) => c,
        Load::Poisson { cap, .. } => cap.unwrap_or(a.num_requests),
    }
    .min(a.num_requests.max(a.warmup));
    let mut channels = Vec::new();
    if a.api == Api::Grpc {
        channels.extend(first);
        let want = max_in_flight.div_ceil(STREAMS_PER_CONNECTION).clamp(1, MAX_CONNECTIONS);
        while channels.len() < want {
            channels.push(connect(&grpc_addr).await?);
        }
    }
    let model = match (a.api, &a.model) {
        (Api::Grpc, _) => info.as_ref().map(|i| i.model.clone()).filter(|m| !m.is_empty()),
        (_, Some(m)) => Some(m.clone()),
        (_, None) => served_model(&http, &http_base, bearer.as_deref()).await,
    };

    let total = a.warmup + a.num_requests;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut prompts, prompt_source) = if let Some(t) = &a.prompt {
        (vec![Prompt::Text(t.clone()); total], "text")
    } else if let Some(path) = &a.dataset {
        let turns = prompts::dataset_turns(path)?;
        (prompts::from_dataset(&mut rng, &turns, total), "dataset")
    } else if corpus {
        let p = prompts::corpus(&mut rng, total, a.input_len, a.input_len_range, tokenizer.as_ref())?;
        (p, "corpus")
    } else {
        match a.vocab_size.or(info.as_ref().map(|i| i.vocab_size)) {
            Some(vocab) if vocab > FIRST_ORDINARY_TOKEN => (
                random_prompts(&mut rng, total, a.input_len, a.input_len_range, vocab),
                "random_ids",
            ),
            v => bail!("cannot draw random prompts from a vocabulary of {v:?} tokens"),
        }
    };
    if let Some(len) = a.shared_prefix.filter(|&n| n > 0) {
        let prefix = if corpus {
            prompts::corpus(&mut rng, 1, len, 0.0, tokenizer.as_ref())?
        } else {
            let vocab = a.vocab_size.or(info.as_ref().map(|i| i.vocab_size)).unwrap_or(0);
            random_prompts(&mut rng, 1, len, 0.0, vocab)
        };
        prompts = with_shared_prefix(prompts, &prefix[0]);
    }
    let measured = prompts.split_off(a.warmup);

    let target = Arc::new(Target {
        api: a.api,
        channels,
        http,
        completions_url: match a.api {
            Api::OpenaiChat => format!("{http_base}/v1/chat/completions"),
            _ => format!("{http_base}/v1/completions"),
        },
        tokenizer,
        model: model.clone(),
        bearer,
        output_len: a.output_len,
        ignore_eos: !a.no_ignore_eos,
        extensions: !a.no_extensions,
        temperature: a.temperature,
        timeout,
    });

    let mut warmup = WarmupReport {
        requests: a.warmup,
        completed: 0,
        failed: 0,
        input_tokens: 0,
        output_tokens: 0,
    };
    if a.warmup > 0 {
        let c = match load {
            Load::Closed(c) => c,
            Load::Poisson { cap, .. } => cap.unwrap_or(a.warmup),
        };
        let bar = progress(a.warmup, "warmup");
        let (recs, _) = drive(target.clone(), prompts, Load::Closed(c), seed, "warmup", bar).await;
        let (ok, failed, errors) = summarize(&recs);
        warmup.completed = ok.len();
        warmup.failed = failed;
        warmup.input_tokens = ok.iter().map(|r| r.input_tokens).sum();
        warmup.output_tokens = ok.iter().map(|r| r.output_tokens).sum();
        if ok.is_empty() {
            bail!("every warmup request failed; the first: {}", errors.join("; "));
        }
    }

    let bar = progress(a.num_requests, "bench");
    let (records, elapsed) = drive(target.clone(), measured, load, seed, "run", bar).await;
    let (ok, failed, errors) = summarize(&records);
    let duration = elapsed.as_secs_f64();
    let input_tokens: usize = ok.iter().map(|r| r.input_tokens).sum();
    let output_tokens: usize = ok.iter().map(|r| r.output_tokens).sum();
    let slo = Slo {
        ttft_ms: a.slo_ttft_ms,
        tpot_ms: a.slo_tpot_ms,
        e2e_ms: a.slo_e2e_ms,
    };
    let goodput_requests = slo.any().then(|| ok.iter().filter(|r| slo.met(r)).count());
    let (concurrency, request_rate) = match load {
        Load::Closed(c) => (Some(c), None),
        Load::Poisson { rate, cap } => (cap, Some(if rate.is_finite() { json!(rate) } else { json!("inf") })),
    };
    let report = Report {
        api: a.api.name(),
        target: match a.api {
            Api::Grpc => grpc_addr,
            Api::Openai | Api::OpenaiChat => target.completions_url.clone(),
        },
        model,
        concurrency,
        request_rate,
        num_requests: a.num_requests,
        input_len: (random_ids || corpus).then_some(a.input_len),
        shared_prefix: a.shared_prefix,
        output_len: a.output_len,
        ignore_eos: !a.no_ignore_eos,
        seed,
        prompts: prompt_source,
        output_token_count: methods(ok.iter().map(|r| r.output_count)),
        input_token_count: methods(ok.iter().map(|r| r.input_count)),
        warmup,
        completed: ok.len(),
        failed,
        errors,
        duration_s: duration,
        total_input_tokens: input_tokens,
        total_output_tokens: output_tokens,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: output_tokens as f64 / duration,
        total_token_throughput: (input_tokens + output_tokens) as f64 / duration,
        goodput: goodput_requests.map(|g| g as f64 / duration),
        goodput_requests,
        slo,
        ttft_ms: dist(ok.iter().filter_map(|r| r.ttft).map(|t| t.as_secs_f64())),
        tpot_ms: dist(ok.iter().filter_map(|r| tpot(r))),
        itl_ms: dist(ok.iter().flat_map(|r| r.itl.iter().map(Duration::as_secs_f64))),
        e2e_ms: dist(ok.iter().map(|r| r.e2e.as_secs_f64())),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if report.completed == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_and_order() {
        let d = dist([0.001, 0.002, 0.003, 0.004]).unwrap();
        assert!((d.mean - 2.5).abs() < 1e-9);
        assert!((d.median - 2.5).abs() < 1e-9);
        assert!((d.p90 - 3.7).abs() < 1e-9);
        assert!(d.median <= d.p90 && d.p90 <= d.p99);
        assert!(dist([]).is_none());
    }

    #[test]
    fn sse_events_split_on_blank_lines() {
        let buf = b"data: {\"a\":1}\n\n: comment\r\n\r\ndata: [DONE]\n\npartial".to_vec();
        let (e, rest) = split_event(&buf).unwrap();
        assert_eq!(sse_data(&e).as_deref(), Some("{\"a\":1}"));
        let (e, rest) = split_event(&rest).unwrap();
        assert_eq!(sse_data(&e), None);
        let (e, rest) = split_event(&rest).unwrap();
        assert_eq!(sse_data(&e).as_deref(), Some("[DONE]"));
        assert!(split_event(&rest).is_none());
    }

    #[test]
    fn random_prompts_are_reproducible_and_in_range() {
        let p1 = random_prompts(&mut ChaCha8Rng::seed_from_u64(7), 20, 10, 0.5, 50);
        let p2 = random_prompts(&mut ChaCha8Rng::seed_from_u64(7), 20, 10, 0.5, 50);
        for (a, b) in p1.iter().zip(&p2) {
            let (Prompt::Ids(a), Prompt::Ids(b)) = (a, b) else {
                panic!("ids expected")
            };
            assert_eq!(a, b);
            assert!((5..=15).contains(&a.len()));
            assert!(a.iter().all(|&t| (3..50).contains(&t)));
        }
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        let r = Record {
            output_tokens: 5,
            ttft: Some(Duration::from_millis(100)),
            e2e: Duration::from_millis(500),
            ..Default::default()
        };
        assert!((tpot(&r).unwrap() - 0.1).abs() < 1e-9);
        let slo = Slo {
            ttft_ms: Some(150.0),
            tpot_ms: Some(99.0),
            e2e_ms: None,
        };
        assert!(!slo.met(&r));
    }
}
