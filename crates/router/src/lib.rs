//! The router: the process clients talk to. It validates and tokenizes requests,
//! queues them with a bound, and runs continuous batching over replicas of shards,
//! serving the public gRPC API (with gRPC health and reflection, `v1` and `v1alpha`,
//! which older clients such as grpcurl and Python's grpcio-reflection speak) and an
//! OpenAI-compatible HTTP API. Other crates see [`run`], its [`RouterOptions`] and
//! [`Discovery`], and [`BatchConfig`]; everything else is private.
//!
//! # Crate map
//!
//! Requests flow from the frontends down; each module imports only those listed
//! before it (and `batcher`, `pool` the ones after `replica`).
//!
//! - `structured`: structured output: the served tokenizer's grammars, a request's
//!   constraint, the allowed tokens of constrained sequences.
//! - `validation`: checks a client's request (input, each sampling parameter, context
//!   and KV fit) into a `ValidRequest`; every refusal names its field.
//! - `request`: a queued request (`Entry`, its `Progress`) and the events its client
//!   hears (`Event`; why it ended is `sirocco_scheduler::FinishReason`).
//! - `load`: each replica's load (`LoadBoard`) and readiness (`Readiness`).
//! - `cluster`: the cluster as operators see it (`ClusterBoard`): each replica's
//!   state, shards, KV use and last step, and etcd's reachability.
//! - `traffic`: recent throughput and latency, read from the router's own metrics
//!   every few seconds and kept in memory for the console's charts.
//! - `queue`: the bounded queue of requests waiting for a replica.
//! - `infer`: what the frontends call: queue a valid request and get its events; the
//!   expiry of requests that waited too long.
//! - `replica`: one replica's shards over the internal API (connect, session, step).
//! - `step_deadline`: how long a step may take before its replica is given up.
//! - `batcher`: continuous batching on one replica.
//! - `pool`: the replicas in rotation (a static list or etcd membership), one batcher each.
//! - `headers`: the API-key check and the request id, read alike by both frontends.
//! - `server`: the gRPC frontend (`sirocco.v1.Sirocco`).
//! - `openai`: the OpenAI-compatible HTTP frontend (`/v1/*`), with the Files and
//!   Batch APIs.
//! - `batch_file` (public): OpenAI's batch file format, shared with `sirocco batch`.
//! - `http`: `/metrics`, `/health`, `/ready`, and whole-body reading for all HTTP.
//! - `console`: the web console (`/`), and the JSON it reads: `/v1/cluster`,
//!   `/v1/traffic`, `/v1/replicas/{id}/drain`; no cross-origin requests.

pub mod batch_file;
mod batcher;
mod cluster;
mod console;
mod headers;
mod http;
mod infer;
mod load;
mod openai;
mod pool;
mod queue;
mod replica;
mod request;
mod server;
mod session;
mod step_deadline;
mod structured;
mod traffic;
mod validation;

pub use batcher::BatchConfig;

use anyhow::{bail, Context, Result};
use infer::Infer;
use load::LoadBoard;
use pool::Pool;
use queue::Queue;
use replica::Replica;
use sirocco_proto::v1::sirocco_server::SiroccoServer;
use sirocco_scheduler::KvGeometry;
use sirocco_tokenizer::Tokenizer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the router knows of the served model and cluster.
#[derive(Clone, Debug)]
pub(crate) struct ModelInfo {
    pub(crate) name: String,
    pub(crate) vocab_size: usize,
    pub(crate) max_context: usize,
    pub(crate) sliding_window: Option<usize>,
    pub(crate) eos_ids: Vec<u32>,
    pub(crate) attention_heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) tp: usize,
    /// Each rank's KV pool, the smallest of all replicas', as admission reserves it.
    pub(crate) kv: KvGeometry,
    pub(crate) max_new_tokens_limit: usize,
    /// The most bytes of input text a request may carry (see
    /// [`validation::max_input_bytes`]).
    pub(crate) max_input_bytes: usize,
    /// Compiles structured-output constraints for the served tokenizer.
    pub(crate) structured: structured::StructuredOutput,
}

#[derive(Clone, Debug)]
pub struct RouterOptions {
    pub listen: SocketAddr,
    pub discovery: Discovery,
    /// The tokenizer; `None` accepts token ids only.
    pub tokenizer: Option<Tokenizer>,
    pub model_name: String,
    pub max_queue: usize,
    pub batch: BatchConfig,
    pub max_new_tokens_limit: Option<usize>,
    /// How long to wait for shards to come up.
    pub connect_timeout: Duration,
    /// Where `/metrics`, `/health` and `/ready` are served.
    pub http_addr: SocketAddr,
    /// A replica is ready while its last completed step is at most this old.
    pub ready_window: Duration,
    /// How chat conversations become prompts.
    pub chat: sirocco_tokenizer::ChatTemplate,
    /// When set, HTTP (/v1/*) and gRPC (sirocco.v1) calls must carry it as a bearer token.
    pub api_key: Option<String>,
    /// A request still waiting for its first replica after this long is refused.
    pub max_queue_wait: Option<Duration>,
    /// Time allowed to read an HTTP request's head.
    pub http_header_timeout: Duration,
    /// Time allowed to read an HTTP request's body.
    pub http_body_timeout: Duration,
    /// Where the Files and Batch APIs keep their files and batches (made when first
    /// needed).
    pub data_dir: std::path::PathBuf,
}

/// Where the router finds its replicas.
#[derive(Clone, Debug)]
pub enum Discovery {
    /// Each replica's shard addresses, in rank order.
    Static(Vec<Vec<String>>),
    /// Follow the shards registered in etcd under `cluster`.
    Etcd { endpoints: Vec<String>, cluster: String },
}

/// Connects to the replicas and serves until `shutdown` resolves.
pub async fn run(opts: RouterOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    // A stop asked for while waiting for shards is honoured at once.
    let connected = tokio::select! {
        r = connect_replicas(&opts) => r?,
        _ = &mut shutdown => {
            tracing::info!("router stopped before any replica was ready");
            return Ok(());
        }
    };
    let model = model_info(&opts, &connected.replicas)?;
    model.structured.warm_up();
    let (health, health_service) = tonic_health::server::health_reporter();
    let pool = new_pool(&opts, &model, health, connected.replicas[0].info.fingerprint.clone());
    let infer = Arc::new(Infer {
        queue: pool.queue.clone(),
        model: model.clone(),
        live_replicas: pool.live.clone(),
        metrics: pool.metrics.clone(),
    });
    let background = spawn_batchers(&pool, connected, opts.max_queue_wait);
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let http = serve_http(&opts, &model, &pool, infer.clone(), stop_rx.clone());
    tracing::info!(addr = %opts.listen, http = %opts.http_addr, tp = model.tp, heads = model.attention_heads, kv_heads = model.kv_heads, kv_capacity_tokens = model.kv.capacity_tokens, "router serving");
    let grpc = serve_grpc(&opts, &model, listener, infer, health_service, stop_rx)?;
    shut_down(grpc, http, shutdown, stop_tx).await?;
    for t in background {
        t.abort();
    }
    tracing::info!("router stopped");
    Ok(())
}

/// The replicas connected at start, and the membership view to follow with etcd.
struct Connected {
    /// Never empty: with etcd, the first ready replica (probed for the model).
    replicas: Vec<Replica>,
    membership: Option<(Vec<String>, sirocco_membership::Membership)>,
}

/// Connects every listed replica, or (with etcd) the first ready one.
async fn connect_replicas(opts: &RouterOptions) -> Result<Connected> {
    match &opts.discovery {
        Discovery::Static(list) => {
            if list.is_empty() {
                bail!("the router needs at least one replica (--shards or --etcd)");
            }
            let mut replicas = Vec::new();
            for (id, addrs) in list.iter().enumerate() {
                tracing::info!(replica = id, shards = ?addrs, "connecting to replica");
                replicas.push(
                    Replica::connect(id, addrs, opts.connect_timeout)
                        .await
                        .with_context(|| format!("replica {id}"))?,
                );
            }
            Ok(Connected {
                replicas,
                membership: None,
            })
        }
        Discovery::Etcd { endpoints, cluster } => {
            let etcd = sirocco_membership::Etcd::new(endpoints)?;
            let membership = sirocco_membership::watch_members(etcd, cluster);
            let first = first_ready_replica(membership.view.clone(), opts.connect_timeout).await?;
            Ok(Connected {
                replicas: vec![first],
                membership: Some((endpoints.clone(), membership)),
            })
        }
    }
}

/// What the router knows of the model, from the replicas and the tokenizer; the
/// replicas must all serve the same model, and the tokenizer must fit it.
fn model_info(opts: &RouterOptions, replicas: &[Replica]) -> Result<ModelInfo> {
    let first = &replicas[0].info;
    for r in &replicas[1..] {
        if r.info.fingerprint != first.fingerprint {
            bail!("replica {} serves a different model than replica 0", r.id);
        }
    }
    if let Some(t) = &opts.tokenizer {
        t.check_fits(first.vocab_size)?;
    }
    let mut eos_ids = first.eos_token_ids.clone();
    for &e in opts.tokenizer.as_ref().map_or(&[][..], |t| t.eos_ids()) {
        if !eos_ids.contains(&e) {
            eos_ids.push(e);
        }
    }
    Ok(ModelInfo {
        name: opts.model_name.clone(),
        vocab_size: first.vocab_size,
        max_context: first.max_context,
        sliding_window: first.sliding_window,
        eos_ids,
        attention_heads: first.attention_heads,
        kv_heads: first.kv_heads,
        tp: first.world_size,
        kv: KvGeometry {
            capacity_tokens: replicas.iter().map(|r| r.info.kv.capacity_tokens).min().unwrap_or(0),
            ..first.kv
        },
        max_new_tokens_limit: opts.max_new_tokens_limit.unwrap_or(first.max_context),
        max_input_bytes: validation::max_input_bytes(opts.tokenizer.as_ref(), first.max_context),
        structured: structured::StructuredOutput::new(opts.tokenizer.clone(), first.vocab_size),
    })
}

/// The pool of replicas, empty yet, with the queue its batchers take from.
fn new_pool(
    opts: &RouterOptions,
    model: &ModelInfo,
    health: tonic_health::server::HealthReporter,
    fingerprint: String,
) -> Arc<Pool> {
    let loads = Arc::new(LoadBoard::default());
    Arc::new(Pool::new(
        Arc::new(Queue::new(
            opts.max_queue,
            opts.batch.schedule.max_batch_size,
            loads.clone(),
        )),
        loads,
        opts.tokenizer.clone(),
        model.clone(),
        opts.batch.clone(),
        health,
        fingerprint,
        opts.ready_window,
    ))
}

/// Puts the replicas into rotation, one batcher each: the static ones (reconnected
/// when they fail), or whatever membership shows; and the expiry of queued requests
/// past their deadline or (with `max_queue_wait`) waiting too long. Returns the
/// tasks to stop on shutdown.
fn spawn_batchers(pool: &Arc<Pool>, connected: Connected, max_queue_wait: Option<Duration>) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    match connected.membership {
        None => {
            for replica in connected.replicas {
                tasks.push(tokio::spawn(pool::keep_static(pool.clone(), replica)));
            }
        }
        Some((endpoints, m)) => {
            // The first replica was only probed for the model; membership adds it.
            let next_id = connected.replicas.len();
            drop(connected.replicas);
            pool.board.follow_membership(endpoints, m.view.clone(), m.reach);
            tasks.push(tokio::spawn(pool::follow_membership(pool.clone(), m.view, next_id)));
        }
    }
    tasks.push(tokio::spawn(infer::expire_queued(
        pool.queue.clone(),
        pool.metrics.clone(),
        max_queue_wait,
    )));
    tasks
}

/// The least time an upload to `/v1/files` is given to arrive.
const FILE_UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves `/metrics`, `/health`, `/ready` and the OpenAI API on `opts.http_addr`
/// until `stop` turns true.
fn serve_http(
    opts: &RouterOptions,
    model: &ModelInfo,
    pool: &Arc<Pool>,
    infer: Arc<Infer>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<Result<()>> {
    let traffic = Arc::new(traffic::Traffic::new());
    let queue = pool.queue.clone();
    let recorder = traffic.clone().record(pool.metrics.clone(), move || queue.len());
    let api = openai::routes(openai::OpenAiState {
        infer: infer.clone(),
        tokenizer: opts.tokenizer.clone(),
        chat: opts.chat.clone(),
        model_name: opts.model_name.clone(),
        api_key: opts.api_key.clone(),
    });
    let batches = openai::Batches::new(opts.data_dir.clone(), api.clone(), opts.api_key.clone());
    batches.resume();
    let app = http::app(http::HttpState {
        metrics: pool.metrics.clone(),
        readiness: pool.readiness.clone(),
        infer: infer.clone(),
    })
    .merge(api.clone())
    .merge(console::routes(console::ConsoleState {
        pool: pool.clone(),
        traffic,
        api_key: opts.api_key.clone(),
        max_queue: opts.max_queue,
    }))
    .layer(axum::middleware::from_fn(console::same_origin_only));
    // JSON may escape each byte of text as six, and spells token ids in up to 11.
    let app = http::read_bodies_whole(app, opts.http_body_timeout, validation::max_message_bytes(model, 6, 11));
    // Batch files are larger than any request, and take longer to arrive.
    let files = openai::batch_routes(batches).layer(axum::middleware::from_fn(console::same_origin_only));
    let app = app.merge(http::read_bodies_whole(
        files,
        opts.http_body_timeout.max(FILE_UPLOAD_TIMEOUT),
        openai::MAX_FILE_BYTES,
    ));
    let limits = sirocco_metrics::HttpLimits {
        header_read_timeout: opts.http_header_timeout,
        ..Default::default()
    };
    let served = sirocco_metrics::serve_with(opts.http_addr, app, limits, async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    tokio::spawn(async move {
        let r = served.await;
        recorder.abort();
        r
    })
}

/// The public gRPC API (behind the API key), health and reflection, served on
/// `listener` until `stop` turns true.
fn serve_grpc(
    opts: &RouterOptions,
    model: &ModelInfo,
    listener: tokio::net::TcpListener,
    infer: Arc<Infer>,
    health_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    mut stop: watch::Receiver<bool>,
) -> Result<impl Future<Output = Result<(), tonic::transport::Error>>> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sirocco_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let service = server::SiroccoService {
        infer,
        tokenizer: opts.tokenizer.clone(),
        chat: opts.chat.clone(),
    };
    Ok(tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            // Token ids take up to 5 bytes each.
            SiroccoServer::new(service).max_decoding_message_size(validation::max_message_bytes(model, 1, 5)),
            server::check_key(opts.api_key.clone()),
        ))
        .serve_with_incoming_shutdown(
            // No Nagle: streamed tokens must not wait for the client's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ))
}

/// Serves until either server fails or `shutdown` resolves; then tells both to stop
/// and lets gRPC finish the calls in flight.
async fn shut_down(
    grpc: impl Future<Output = Result<(), tonic::transport::Error>>,
    http: JoinHandle<Result<()>>,
    shutdown: impl Future<Output = ()>,
    stop: watch::Sender<bool>,
) -> Result<()> {
    tokio::pin!(grpc);
    tokio::select! {
        r = &mut grpc => r?,
        r = http => { r??; }
        _ = shutdown => {
            let _ = stop.send(true);
            grpc.await?;
        }
    }
    Ok(())
}

/// Waits for the first replica that membership shows ready and that answers.
async fn first_ready_replica(
    mut view: tokio::sync::watch::Receiver<sirocco_membership::MemberView>,
    timeout: Duration,
) -> Result<Replica> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let reps = sirocco_membership::replicas_from(&view.borrow_and_update().clone());
        for r in reps.values().filter(|r| r.ready && !r.draining) {
            let addrs: Vec<String> = r.ranks.iter().map(|x| x.addr.clone()).collect();
            if let Ok(replica) = Replica::connect(0, &addrs, Duration::from_secs(2)).await {
                return Ok(replica);
            }
        }
        tracing::info!("waiting for a ready replica in etcd");
        tokio::select! {
            _ = view.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::time::sleep_until(deadline) => bail!("no replica became ready in etcd within {timeout:?}"),
        }
    }
}
