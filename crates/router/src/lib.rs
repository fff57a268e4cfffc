//! The router: the process clients talk to. It validates and tokenizes requests
//! ([`validation`]), queues them with a bound ([`queue`], [`infer`]), and runs
//! continuous batching ([`batcher`]) over replicas of shards ([`replica`]), serving
//! the public gRPC API ([`server`]) with gRPC health and reflection (`v1` and
//! `v1alpha`, which older clients such as grpcurl and Python's grpcio-reflection speak).

pub mod batcher;
pub mod http;
pub mod infer;
pub mod openai;
pub mod pool;
pub mod queue;
pub mod replica;
pub mod server;
mod step_deadline;
pub mod validation;

use anyhow::{bail, Context, Result};
use batcher::BatchConfig;
use infer::Infer;
use queue::Queue;
use replica::Replica;
use sirocco_proto::v1::sirocco_server::SiroccoServer;
use sirocco_tokenizer::Tokenizer;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

/// What the router knows of the served model and cluster.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub vocab_size: usize,
    pub max_context: usize,
    pub sliding_window: Option<usize>,
    pub eos_ids: Vec<u32>,
    pub tp: usize,
    pub kv_capacity_tokens: usize,
    pub kv_block_size: usize,
    pub kv_positions_per_seq: usize,
    pub max_new_tokens_limit: usize,
    /// The most bytes of input text a request may carry (see
    /// [`validation::max_input_bytes`]).
    pub max_input_bytes: usize,
}

impl ModelInfo {
    /// KV slots a sequence of `len` positions takes on each rank: at most one window,
    /// in whole blocks (exactly as the shards' caches allocate them).
    pub fn kv_slots_needed(&self, len: usize) -> usize {
        let held = len.min(self.kv_positions_per_seq);
        (held.div_ceil(self.kv_block_size) * self.kv_block_size).min(self.kv_positions_per_seq)
    }
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
}

/// Connects to the replicas and serves until `shutdown` resolves.
/// Where the router finds its replicas.
#[derive(Clone, Debug)]
pub enum Discovery {
    /// Each replica's shard addresses, in rank order.
    Static(Vec<Vec<String>>),
    /// Follow the shards registered in etcd under `cluster`.
    Etcd { endpoints: Vec<String>, cluster: String },
}

/// Connects to the replicas and serves until `shutdown` resolves.
pub async fn run(opts: RouterOptions, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let connect = async {
        let mut first_replicas = Vec::new();
        let mut membership = None;
        match &opts.discovery {
            Discovery::Static(list) => {
                if list.is_empty() {
                    bail!("the router needs at least one replica (--shards or --etcd)");
                }
                for (id, addrs) in list.iter().enumerate() {
                    tracing::info!(replica = id, shards = ?addrs, "connecting to replica");
                    first_replicas.push(
                        Replica::connect(id, addrs, opts.connect_timeout)
                            .await
                            .with_context(|| format!("replica {id}"))?,
                    );
                }
            }
            Discovery::Etcd { endpoints, cluster } => {
                let etcd = sirocco_membership::Etcd::new(endpoints)?;
                let view = sirocco_membership::watch_members(etcd, cluster);
                first_replicas.push(first_ready_replica(view.clone(), opts.connect_timeout).await?);
                membership = Some(view);
            }
        }
        anyhow::Ok((first_replicas, membership))
    };
    // A stop asked for while waiting for shards is honoured at once.
    let connected = tokio::select! {
        r = connect => Some(r),
        _ = &mut shutdown => None,
    };
    let Some(connected) = connected else {
        tracing::info!("router stopped before any replica was ready");
        return Ok(());
    };
    let (first_replicas, membership) = connected?;
    let first = first_replicas[0].info.clone();
    for r in &first_replicas[1..] {
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
    let model = ModelInfo {
        name: opts.model_name.clone(),
        vocab_size: first.vocab_size,
        max_context: first.max_context,
        sliding_window: first.sliding_window,
        eos_ids,
        tp: first.world_size,
        kv_capacity_tokens: first_replicas
            .iter()
            .map(|r| r.info.kv_capacity_tokens)
            .min()
            .unwrap_or(0),
        kv_block_size: first.kv_block_size,
        kv_positions_per_seq: first.kv_positions_per_seq,
        max_new_tokens_limit: opts.max_new_tokens_limit.unwrap_or(first.max_context),
        max_input_bytes: validation::max_input_bytes(opts.tokenizer.as_ref(), first.max_context),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let metrics = Arc::new(sirocco_metrics::RouterMetrics::new());
    let readiness = Arc::new(infer::Readiness::new(opts.ready_window));
    let loads = Arc::new(infer::LoadBoard::default());
    let pool = Arc::new(pool::Pool {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        queue: Arc::new(Queue::new(opts.max_queue, opts.batch.max_batch_size, loads.clone())),
        loads,
        live: Arc::new(AtomicUsize::new(0)),
        tokenizer: opts.tokenizer.clone(),
        model: model.clone(),
        config: opts.batch.clone(),
        health,
        fingerprint: first.fingerprint.clone(),
    });
    let infer = Arc::new(Infer {
        queue: pool.queue.clone(),
        model: model.clone(),
        live_replicas: pool.live.clone(),
        metrics: metrics.clone(),
    });
    let next_id = first_replicas.len();
    let mut static_tasks = Vec::new();
    match membership {
        None => {
            for replica in first_replicas {
                static_tasks.push(tokio::spawn(pool::keep_static(pool.clone(), replica)));
            }
        }
        Some(view) => {
            // The first replica was only probed for the model; membership adds it.
            drop(first_replicas);
            tokio::spawn(pool::follow_membership(pool.clone(), view, next_id));
        }
    }
    let expiry = opts
        .max_queue_wait
        .map(|wait| tokio::spawn(infer::expire_waiting(pool.queue.clone(), metrics.clone(), wait)));
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
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http_app = http::app(http::HttpState {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        infer: service.infer.clone(),
        tokenizer: opts.tokenizer.clone(),
    })
    .merge(openai::routes(openai::OpenAiState {
        infer: service.infer.clone(),
        tokenizer: opts.tokenizer.clone(),
        chat: opts.chat.clone(),
        model_name: opts.model_name.clone(),
        api_key: opts.api_key.clone(),
    }));
    // JSON may escape each byte of text as six, and spells token ids in up to 11.
    let http_app = http::read_bodies_whole(
        http_app,
        opts.http_body_timeout,
        validation::max_message_bytes(&model, 6, 11),
    );
    let key = opts.api_key.clone();
    let check_key = move |req: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(k) = &key {
            let given = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given != Some(k.as_str()) {
                return Err(tonic::Status::unauthenticated(
                    "missing or wrong API key (send metadata authorization: Bearer <key>)",
                ));
            }
        }
        Ok(req)
    };
    let mut http_stop = stop_rx.clone();
    let http_limits = sirocco_metrics::HttpLimits {
        header_read_timeout: opts.http_header_timeout,
        ..Default::default()
    };
    let http = tokio::spawn(sirocco_metrics::serve_with(
        opts.http_addr,
        http_app,
        http_limits,
        async move {
            let _ = http_stop.wait_for(|s| *s).await;
        },
    ));
    tracing::info!(addr = %opts.listen, http = %opts.http_addr, tp = model.tp, kv_capacity_tokens = model.kv_capacity_tokens, "router serving");
    let mut grpc_stop = stop_rx;
    let grpc = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            // Token ids take up to 5 bytes each.
            SiroccoServer::new(service).max_decoding_message_size(validation::max_message_bytes(&model, 1, 5)),
            check_key,
        ))
        .serve_with_incoming_shutdown(
            // No Nagle: streamed tokens must not wait for the client's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            },
        );
    tokio::pin!(grpc);
    tokio::select! {
        r = &mut grpc => r?,
        r = http => { r??; }
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            grpc.await?;
        }
    }
    for t in static_tasks {
        t.abort();
    }
    if let Some(e) = expiry {
        e.abort();
    }
    tracing::info!("router stopped");
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
