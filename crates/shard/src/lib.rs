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
mod service;

use anyhow::{bail, Context, Result};
use sirocco_collective::{Collective, TcpCollective};
use sirocco_engine::{EngineOptions, Rank};
use sirocco_membership::{rendezvous_key, shard_key, Etcd, Registration, ShardRecord, ShardState};
use sirocco_metrics::prometheus_reexport::Histogram;
use sirocco_metrics::ShardMetrics;
use sirocco_model::{LoadedSource, Mistral, ModelSource, Partition};
use sirocco_proto::shard::v1::shard_server::ShardServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use service::ShardService;

/// Where a shard registers when the cluster runs on etcd.
#[derive(Clone, Debug)]
pub struct MembershipOptions {
    pub endpoints: Vec<String>,
    pub cluster: String,
    /// The replica this shard belongs to (its ranks share the name).
    pub replica: String,
    pub lease_ttl: Duration,
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

struct Member {
    reg: Registration,
    key: String,
    record: ShardRecord,
}

impl Member {
    async fn set_state(&mut self, state: ShardState) {
        self.record.state = state;
        let value = serde_json::to_vec(&self.record).expect("records serialize");
        if let Err(e) = self.reg.put(&self.key, value).await {
            tracing::warn!(error = %e, ?state, "could not publish shard state (kept for when etcd is back)");
        }
    }
}

/// Loads the rank and serves until `shutdown` resolves (then drains when on etcd) or
/// the collective breaks.
pub async fn run(opts: ShardOptions, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let started = Instant::now();
    let loaded = opts.model.open()?;
    let fingerprint = loaded.fingerprint();
    let mut member = match &opts.membership {
        Some(m) => {
            let etcd = Etcd::new(&m.endpoints)?;
            let reg = Registration::start(etcd, m.lease_ttl)
                .await
                .context("cannot register in etcd")?;
            let mut member = Member {
                reg,
                key: shard_key(&m.cluster, &m.replica, opts.rank),
                record: ShardRecord {
                    replica: m.replica.clone(),
                    rank: opts.rank,
                    world_size: opts.world_size,
                    addr: opts.listen.to_string(),
                    fingerprint: fingerprint.clone(),
                    kv_capacity_tokens: 0,
                    state: ShardState::Starting,
                },
            };
            member.set_state(ShardState::Starting).await;
            Some(member)
        }
        None => None,
    };
    let replica_label = opts
        .membership
        .as_ref()
        .map_or("static".to_string(), |m| m.replica.clone());
    let metrics = Arc::new(ShardMetrics::new(&replica_label, opts.rank));
    let collective = join_collective(&opts, member.as_ref()).await?;
    let collective: Box<dyn Collective> = Box::new(TimedCollective {
        inner: collective,
        allreduce: metrics.allreduce_duration.clone(),
    });
    let o = opts.clone();
    let load_started = Instant::now();
    let (rank, info) = tokio::task::spawn_blocking(move || load(&o, loaded, collective))
        .await
        .context("loading task panicked")??;
    metrics.model_load_seconds.set(load_started.elapsed().as_secs_f64());
    metrics.kv_tokens_capacity.set(info.kv_capacity_tokens as i64);
    tracing::info!(
        rank = opts.rank,
        world = opts.world_size,
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        kv_capacity_tokens = info.kv_capacity_tokens,
        "shard loaded"
    );
    let capacity = info.kv_capacity_tokens;
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    let drain = Arc::new(tokio::sync::Notify::new());
    let service = ShardService::new(rank, info, fatal_tx, drain.clone(), metrics.clone());
    if let Some(addr) = opts.metrics_addr {
        let app = sirocco_metrics::metrics_route(metrics.registry.clone());
        tokio::spawn(async move {
            if let Err(e) = sirocco_metrics::serve(addr, app, std::future::pending()).await {
                tracing::error!(error = %format!("{e:#}"), "metrics endpoint failed");
            }
        });
    }
    let handle = service.clone();
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    tracing::info!(addr = %opts.listen, rank = opts.rank, "shard serving");
    if let Some(m) = member.as_mut() {
        m.record.kv_capacity_tokens = capacity;
        m.set_state(ShardState::Ready).await;
    }
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                ShardServer::new(service)
                    .max_decoding_message_size(256 << 20)
                    .max_encoding_message_size(256 << 20),
            )
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    let drain_requested = drain.notified();
    let fatal = tokio::select! {
        _ = shutdown => None,
        _ = drain_requested => None,
        msg = fatal_rx.recv() => msg,
    };
    if fatal.is_none() {
        if let Some(m) = member.as_mut() {
            // Drain: the router stops sending new sequences once it sees this; the
            // ones already here finish (or fail over, if the collective breaks).
            tracing::info!(rank = opts.rank, "draining");
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
    }
    if let Some(m) = member.take() {
        m.reg.leave().await;
    }
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

/// Joins the replica's collective: rank 0 listens (on `peer_addr`, or a free port it
/// publishes in etcd), the other ranks connect.
async fn join_collective(opts: &ShardOptions, member: Option<&Member>) -> Result<Box<dyn Collective>> {
    let (rank, world, timeout) = (opts.rank, opts.world_size, opts.collective_timeout);
    if world == 1 {
        return Ok(Box::new(sirocco_collective::Solo));
    }
    let etcd_key = opts.membership.as_ref().map(|m| rendezvous_key(&m.cluster, &m.replica));
    if rank == 0 {
        let bind = opts
            .peer_addr
            .clone()
            .unwrap_or_else(|| format!("{}:0", opts.listen.ip()));
        let listener =
            std::net::TcpListener::bind(&bind).with_context(|| format!("cannot listen for peers on {bind}"))?;
        let addr = listener.local_addr()?.to_string();
        if let (Some(m), Some(key)) = (member, etcd_key) {
            m.reg.put(&key, addr.clone().into_bytes()).await?;
        }
        tracing::info!(peer_addr = %addr, "waiting for the other ranks");
        let join_timeout = timeout.max(Duration::from_secs(300));
        let c = tokio::task::spawn_blocking(move || TcpCollective::rank0_with_listener(listener, world, join_timeout))
            .await??;
        // Operations after joining use the (shorter) collective timeout.
        return Ok(Box::new(c.with_op_timeout(timeout)?));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let addr = match (&opts.peer_addr, &etcd_key, member) {
            (Some(a), _, _) => a.clone(),
            (None, Some(key), Some(m)) => match m.reg.etcd().get(key).await.ok().flatten() {
                Some(a) => String::from_utf8_lossy(&a).into_owned(),
                None => {
                    if Instant::now() > deadline {
                        bail!("rank 0 of this replica never published its address in etcd");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ => bail!("rank {rank} needs --peer-addr (or --etcd to find rank 0)"),
        };
        let try_for = Duration::from_secs(60).min(deadline.saturating_duration_since(Instant::now()));
        let a = addr.clone();
        let joined = tokio::task::spawn_blocking(move || {
            TcpCollective::connect(rank, world, &a, try_for).and_then(|c| c.with_op_timeout(timeout))
        })
        .await?;
        match joined {
            Ok(c) => return Ok(Box::new(c)),
            Err(e) if Instant::now() < deadline && opts.membership.is_some() => {
                tracing::info!(peer_addr = %addr, error = %e, "rank 0 not reachable yet; looking it up again");
            }
            Err(e) => return Err(e).with_context(|| format!("rank {rank} could not join the collective at {addr}")),
        }
    }
}

fn load(opts: &ShardOptions, loaded: LoadedSource, collective: Box<dyn Collective>) -> Result<(Rank, service::Info)> {
    let part = Partition::new(&loaded.config, opts.rank, opts.world_size)?;
    let coll: Arc<dyn Collective> = Arc::from(collective);
    let device = opts.engine.device.open()?;
    let model = Mistral::load(
        &loaded.config,
        loaded.weights.as_ref(),
        part,
        opts.engine.dtype,
        &device,
        coll,
    )?;
    let capacity = opts.engine.kv_capacity_tokens(&model);
    let info = service::Info {
        rank: opts.rank,
        world_size: opts.world_size,
        config_json: serde_json::to_string(&loaded.config)?,
        kv_capacity_tokens: capacity,
        kv_block_size: opts.engine.kv_block_size,
        kv_positions_per_seq: loaded.config.kv_positions(),
        fingerprint: loaded.fingerprint(),
        dtype: format!("{:?}", opts.engine.dtype).to_lowercase(),
    };
    Ok((Rank::new(model, capacity, opts.engine.kv_block_size), info))
}
