//! A shard: one tensor-parallel rank of a replica, in a process of its own. It loads
//! its slice of the model, joins its peers' collective, and serves the internal
//! `sirocco.shard.v1` API: every rank receives the same steps in the same order, and
//! rank 0 answers with the sampled tokens.
//!
//! With etcd, a shard registers under a lease (state starting → ready → draining),
//! and the ranks of a replica meet through etcd: rank 0 publishes where its
//! collective listens. On SIGTERM (or the Drain RPC) it drains: it says so, finishes
//! the sequences it holds, deletes its keys and exits.
//!
//! A shard whose collective breaks (a peer died or stalled) cannot take part in any
//! later step, so it reports the failure and exits rather than hang.

pub mod convert;
mod rendezvous;
mod service;

use anyhow::{bail, Context, Result};
use rendezvous::{join_collective, Member};
use sirocco_collective::Collective;
use sirocco_engine::{EngineOptions, Rank};
use sirocco_membership::ShardState;
use sirocco_metrics::prometheus_reexport::Histogram;
use sirocco_metrics::ShardMetrics;
use sirocco_model::{LoadedSource, ModelSource};
use sirocco_proto::shard::v1::shard_server::ShardServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub use service::ShardService;

/// Where a shard registers when the cluster runs on etcd.
#[derive(Clone, Debug)]
pub struct MembershipOptions {
    pub endpoints: Vec<String>,
    pub cluster: String,
    /// The replica this shard belongs to (its ranks share the name).
    pub replica: String,
    pub lease_ttl: Duration,
    /// This start of the replica's processes (the same for all its ranks). Ranks
    /// other than 0 join only a rendezvous of this run; without one they join the
    /// newest rendezvous rank 0 publishes. Rank 0 makes one up when absent.
    pub run_id: Option<String>,
}

/// How to start a shard.
#[derive(Clone, Debug)]
pub struct ShardOptions {
    pub model: ModelSource,
    pub rank: usize,
    pub world_size: usize,
    /// Where this shard serves the internal gRPC API.
    pub listen: SocketAddr,
    /// Where rank 0 listens for its peers' collective connections; with etcd it may
    /// be left out (rank 0 picks a port and publishes it).
    pub peer_addr: Option<String>,
    pub engine: EngineOptions,
    /// How long a collective operation waits for a peer before failing.
    pub collective_timeout: Duration,
    pub membership: Option<MembershipOptions>,
    /// Where /metrics is served.
    pub metrics_addr: Option<SocketAddr>,
}

/// How often a shard pings its router's connection; unanswered for twice as long,
/// the connection (and the router's session) is over.
const SESSION_PING: Duration = Duration::from_secs(5);

/// Loads the rank and serves until `shutdown` resolves (then drains when on etcd) or
/// the collective breaks.
pub async fn run(opts: ShardOptions, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let started = Instant::now();
    let loaded = opts.model.open()?;
    let mut member = match &opts.membership {
        Some(m) => Some(Member::register(&opts, m, loaded.fingerprint()).await?),
        None => None,
    };
    let replica_label = opts
        .membership
        .as_ref()
        .map_or("static".to_string(), |m| m.replica.clone());
    let metrics = Arc::new(ShardMetrics::new(&replica_label, opts.rank));
    // The device is opened once: NCCL must run on the model's own CUDA stream.
    let device = opts.engine.device.open()?;
    let mut shutdown = std::pin::pin!(shutdown);
    // A stop asked for while waiting for peers or loading is honoured at once.
    let started_up = tokio::select! {
        r = start_rank(&opts, member.as_ref(), loaded, device, &metrics) => Some(r),
        _ = &mut shutdown => None,
    };
    let Started {
        rank,
        info,
        nccl,
        run_id,
    } = match started_up {
        Some(r) => r?,
        None => {
            tracing::info!(rank = opts.rank, "stopped before it was ready");
            if let Some(m) = member.take() {
                m.leave().await;
            }
            return Ok(());
        }
    };
    if let Some(m) = member.as_mut() {
        m.set_run_id(run_id);
    }
    metrics.kv_tokens_capacity.set(info.kv_capacity_tokens as i64);
    tracing::info!(
        rank = opts.rank,
        world = opts.world_size,
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        kv_capacity_tokens = info.kv_capacity_tokens,
        "shard loaded"
    );
    let capacity = info.kv_capacity_tokens;
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<String>(1);
    let drain = Arc::new(tokio::sync::Notify::new());
    let mut service = ShardService::new(rank, info, fatal_tx, drain.clone(), metrics.clone());
    if nccl {
        // NCCL waits forever for a peer that died; a step that outlives the collective
        // timeout means one did, and this rank can never step again.
        service = service.with_step_watchdog(opts.collective_timeout);
    }
    if let Some(addr) = opts.metrics_addr {
        serve_metrics(addr, &metrics);
    }
    let handle = service.clone();
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    tracing::info!(addr = %opts.listen, rank = opts.rank, "shard serving");
    if let Some(m) = member.as_mut() {
        m.ready(capacity).await;
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_grpc(listener, service, stop_rx));
    let drain_requested = drain.notified();
    let fatal = tokio::select! {
        _ = &mut shutdown => None,
        _ = drain_requested => None,
        msg = fatal_rx.recv() => msg,
    };
    if fatal.is_none() {
        if let Some(m) = member.as_mut() {
            drain_sequences(opts.rank, m, &mut fatal_rx, &handle).await;
        }
    }
    if let Some(m) = member.take() {
        m.leave().await;
    }
    handle.end_sessions();
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    match fatal {
        Some(msg) => bail!("shard stopped: {msg}"),
        None => {
            tracing::info!(rank = opts.rank, "shard stopped");
            Ok(())
        }
    }
}

/// A loaded rank, ready to serve.
struct Started {
    rank: Rank,
    info: service::Info,
    /// Whether the collective is NCCL (which has no timeouts of its own).
    nccl: bool,
    /// The run of the replica this shard joined.
    run_id: String,
}

/// Joins the replica's collective and loads this shard's rank onto `device`.
async fn start_rank(
    opts: &ShardOptions,
    member: Option<&Member>,
    loaded: LoadedSource,
    device: candle_core::Device,
    metrics: &ShardMetrics,
) -> Result<Started> {
    let (collective, nccl, run_id) = join_collective(opts, member, &device).await?;
    let collective: Box<dyn Collective> = Box::new(TimedCollective {
        inner: collective,
        allreduce: metrics.allreduce_duration.clone(),
    });
    let o = opts.clone();
    let load_started = Instant::now();
    let (rank, info) = tokio::task::spawn_blocking(move || load(&o, loaded, collective, &device))
        .await
        .context("loading task panicked")??;
    metrics.model_load_seconds.set(load_started.elapsed().as_secs_f64());
    Ok(Started {
        rank,
        info,
        nccl,
        run_id,
    })
}

/// Serves /metrics at `addr` in the background.
fn serve_metrics(addr: SocketAddr, metrics: &ShardMetrics) {
    let app = sirocco_metrics::metrics_route(metrics.registry.clone());
    tokio::spawn(async move {
        if let Err(e) = sirocco_metrics::serve(addr, app, std::future::pending()).await {
            tracing::error!(error = %format!("{e:#}"), "metrics endpoint failed");
        }
    });
}

/// Serves the shard API on `listener` until `stop` fires.
async fn serve_grpc(
    listener: tokio::net::TcpListener,
    service: ShardService,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> std::result::Result<(), tonic::transport::Error> {
    // No Nagle: a step's reply must not wait for the router's delayed ACK (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        // A router that stops answering pings has gone (stopped, partitioned):
        // its connection closes, and with it its session's sequences are freed.
        .http2_keepalive_interval(Some(SESSION_PING))
        .http2_keepalive_timeout(Some(SESSION_PING * 2))
        .add_service(
            ShardServer::new(service)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        )
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop.await;
        })
        .await
}

/// Drains: the router stops sending new sequences once it sees the state; the ones
/// already here finish (or fail over, if the collective breaks).
async fn drain_sequences(rank: usize, m: &mut Member, fatal_rx: &mut mpsc::Receiver<String>, handle: &ShardService) {
    tracing::info!(rank, "draining");
    m.set_state(ShardState::Draining).await;
    let since = Instant::now();
    loop {
        tokio::select! {
            msg = fatal_rx.recv() => { if let Some(msg) = msg { tracing::warn!(%msg, "collective broke while draining"); } break; }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        // Give the router a moment to see the state before judging "empty".
        if since.elapsed() > Duration::from_secs(1) && handle.sequences_held() == 0 {
            break;
        }
    }
}

/// Times the all-reduce calls of a collective.
struct TimedCollective {
    inner: Box<dyn Collective>,
    allreduce: Histogram,
}

impl Collective for TimedCollective {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, t: &candle_core::Tensor) -> sirocco_collective::Result<candle_core::Tensor> {
        let start = Instant::now();
        let out = self.inner.all_reduce_sum(t);
        self.allreduce.observe(start.elapsed().as_secs_f64());
        out
    }
    fn all_gather(&self, t: &candle_core::Tensor) -> sirocco_collective::Result<candle_core::Tensor> {
        self.inner.all_gather(t)
    }
    fn broadcast(&self, t: &candle_core::Tensor, root: usize) -> sirocco_collective::Result<candle_core::Tensor> {
        self.inner.broadcast(t, root)
    }
    fn barrier(&self) -> sirocco_collective::Result<()> {
        self.inner.barrier()
    }
}

/// Loads this shard's rank (blocking) and what it tells the router about itself.
fn load(
    opts: &ShardOptions,
    loaded: LoadedSource,
    collective: Box<dyn Collective>,
    device: &candle_core::Device,
) -> Result<(Rank, service::Info)> {
    let rank = Rank::load(
        &loaded,
        opts.rank,
        opts.world_size,
        &opts.engine,
        device,
        Arc::from(collective),
    )?;
    let capacity = rank.kv_capacity_tokens();
    let info = service::Info {
        rank: opts.rank,
        world_size: opts.world_size,
        config: loaded.config.clone(),
        kv_capacity_tokens: capacity,
        kv_block_size: opts.engine.kv_block_size,
        kv_positions_per_seq: loaded.config.kv_positions(),
        fingerprint: loaded.fingerprint(),
        dtype: format!("{:?}", opts.engine.dtype).to_lowercase(),
    };
    Ok((rank, info))
}
