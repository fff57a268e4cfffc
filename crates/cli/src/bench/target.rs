//! The server under test: where it is (`Server`, before any connection), what its
//! router says of the model, the connections every request shares (`Target`), and one
//! request under its timeout. Each protocol's request is in its own file: grpc.rs,
//! openai.rs, session.rs.

mod grpc;
mod openai;
mod session;

use super::record::Record;
use super::workload::Prompt;
use super::{Api, BenchArgs};
use anyhow::{Context, Result};
use sirocco_proto::v1 as pb;
use sirocco_tokenizer::Tokenizer;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

/// In-flight streams per gRPC connection, so HTTP/2 stream limits never queue requests
/// on the client side.
const STREAMS_PER_CONNECTION: usize = 64;
const MAX_CONNECTIONS: usize = 16;

/// Where the server is and how to authenticate, before anything is sent.
pub struct Server {
    grpc_addr: String,
    http_base: String,
    http: reqwest::Client,
    /// `Bearer KEY`, when a key was given.
    bearer: Option<String>,
}

/// What the router said of its model, and the connection that asked (kept for
/// requests).
pub struct RouterModel {
    channel: Channel,
    pub info: pb::ModelInfoResponse,
}

/// What one request asks for beyond its prompt; where unset, the run's flags decide.
#[derive(Clone, Debug, Default)]
pub struct Ask {
    /// The request's say on the server's prefix cache (None: the server's default).
    pub prefix_cache: Option<bool>,
    /// A JSON Schema (as JSON text) the output must match. Such a request ends when
    /// its JSON is complete, so it never sends ignore_eos.
    pub json_schema: Option<Arc<str>>,
    /// Its max_new_tokens, instead of --output-len.
    pub output_len: Option<u32>,
}

/// Everything a request needs, shared by all of them.
pub struct Target {
    api: Api,
    grpc_addr: String,
    channels: Vec<Channel>,
    /// The one Session stream of `--api session`.
    session: Option<session::Mux>,
    http: reqwest::Client,
    completions_url: String,
    /// The router's Prometheus metrics (on --http-addr).
    metrics_url: String,
    /// Counts text without token ids or `usage`.
    pub tokenizer: Option<Tokenizer>,
    pub model: Option<String>,
    /// `Bearer KEY`, when a key was given.
    bearer: Option<String>,
    output_len: u32,
    ignore_eos: bool,
    /// Send the ignore_eos and return_token_ids extensions.
    extensions: bool,
    temperature: f32,
    timeout: Option<Duration>,
}

fn with_scheme(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", addr.trim_end_matches('/'))
    }
}

impl Server {
    pub fn new(a: &BenchArgs) -> Result<Server> {
        Ok(Server {
            grpc_addr: with_scheme(&a.addr),
            http_base: with_scheme(&a.http_addr),
            http: reqwest::Client::builder().tcp_nodelay(true).build()?,
            bearer: a.api_key.as_ref().map(|k| format!("Bearer {k}")),
        })
    }

    /// Connects to the router's gRPC and asks it for the model (its vocabulary and
    /// limits); `api` is what the requests will use, for the hint a failure gives.
    pub async fn ask_model(&self, api: Api) -> Result<RouterModel> {
        let grpc_addr = &self.grpc_addr;
        let channel = grpc::connect(grpc_addr).await.with_context(|| {
            if api.is_http() {
                "the OpenAI API has no vocabulary size to draw random prompts from: give --addr (the router's gRPC) or --vocab-size, or send text prompts (--corpus, --dataset)".to_string()
            } else {
                "is the router running?".to_string()
            }
        })?;
        let info = grpc::model_info(channel.clone(), self.bearer.as_deref())
            .await
            .with_context(|| {
                if api.is_http() {
                    format!("asking {grpc_addr} for the vocabulary size (or give --vocab-size, or --corpus)")
                } else {
                    format!("asking {grpc_addr} for the model")
                }
            })?;
        Ok(RouterModel { channel, info })
    }

    /// Opens the gRPC connections `max_in_flight` requests need (reusing the router's,
    /// when asked), and finds the model to name: the router's over gRPC, else --model
    /// or the server's first.
    pub async fn open(
        self,
        a: &BenchArgs,
        router: Option<RouterModel>,
        max_in_flight: usize,
        tokenizer: Option<Tokenizer>,
        timeout: Option<Duration>,
    ) -> Result<Target> {
        let (first, info) = router.map(|r| (r.channel, r.info)).unzip();
        let mut channels = Vec::new();
        let mut session = None;
        match a.api {
            Api::Grpc => {
                channels.extend(first);
                let want = max_in_flight.div_ceil(STREAMS_PER_CONNECTION).clamp(1, MAX_CONNECTIONS);
                while channels.len() < want {
                    channels.push(grpc::connect(&self.grpc_addr).await?);
                }
            }
            Api::Session => {
                let channel = match first {
                    Some(c) => c,
                    None => grpc::connect(&self.grpc_addr).await?,
                };
                session = Some(session::Mux::open(channel, self.bearer.as_deref()).await?);
            }
            Api::Openai | Api::OpenaiChat => {}
        }
        let model = match (a.api, &a.model) {
            (Api::Grpc | Api::Session, _) => info.map(|i| i.model).filter(|m| !m.is_empty()),
            (_, Some(m)) => Some(m.clone()),
            (_, None) => openai::served_model(&self.http, &self.http_base, self.bearer.as_deref()).await,
        };
        Ok(Target {
            api: a.api,
            channels,
            session,
            completions_url: match a.api {
                Api::OpenaiChat => format!("{}/v1/chat/completions", self.http_base),
                _ => format!("{}/v1/completions", self.http_base),
            },
            metrics_url: format!("{}/metrics", self.http_base),
            grpc_addr: self.grpc_addr,
            http: self.http,
            tokenizer,
            model,
            bearer: self.bearer,
            output_len: a.output_len(),
            ignore_eos: !a.no_ignore_eos,
            extensions: !a.no_extensions,
            temperature: a.temperature,
            timeout,
        })
    }
}

impl Target {
    /// Where requests go: the router's gRPC, or the completions URL.
    pub fn address(&self) -> &str {
        match self.api {
            Api::Grpc | Api::Session => &self.grpc_addr,
            Api::Openai | Api::OpenaiChat => &self.completions_url,
        }
    }

    /// Sends `prompt` as request `i` (which picks its connection) with what `ask` adds,
    /// and records what streams back. A failure, timeout included, is the record's
    /// error.
    pub async fn send(&self, i: usize, request_id: String, prompt: &Prompt, ask: &Ask) -> Record {
        let mut rec = Record {
            constrained: ask.json_schema.is_some(),
            ..Default::default()
        };
        let start = Instant::now();
        let result = {
            let fut = async {
                match self.api {
                    Api::Grpc => self.send_grpc(i, request_id, prompt, ask, start, &mut rec).await,
                    Api::Session => self.send_session(request_id, prompt, ask, start, &mut rec).await,
                    Api::Openai | Api::OpenaiChat => self.send_openai(request_id, prompt, ask, start, &mut rec).await,
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

    /// The max_new_tokens and ignore_eos of a request asking `ask`.
    fn limits(&self, ask: &Ask) -> (u32, bool) {
        (
            ask.output_len.unwrap_or(self.output_len),
            self.ignore_eos && ask.json_schema.is_none(),
        )
    }

    /// The router process's CPU time so far (`sirocco_process_cpu_seconds_total` of its
    /// metrics), in seconds; None when its metrics cannot be had.
    pub async fn router_cpu_seconds(&self) -> Option<f64> {
        let text = self.scrape_metrics().await?;
        text.lines()
            .find_map(|l| l.strip_prefix("sirocco_process_cpu_seconds_total "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The router's metrics as Prometheus text, from --http-addr; None when it does
    /// not answer within a few seconds (the bench reports what it can without them).
    pub async fn scrape_metrics(&self) -> Option<String> {
        let req = self.http.get(&self.metrics_url).timeout(Duration::from_secs(5));
        let resp = req.send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.text().await.ok()
    }
}
