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
use sirocco_membership::{rendezvous_key, shard_key, Etcd, Registration, Rendezvous, ShardRecord, ShardState};
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
                    run_id: m.run_id.clone().unwrap_or_default(),
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
    // The device is opened once: NCCL must run on the model's own CUDA stream.
    let device = opts.engine.device.open()?;
    let mut shutdown = std::pin::pin!(shutdown);
    let startup = async {
        let (collective, nccl, run_id) = join_collective(&opts, member.as_ref(), &device).await?;
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
        anyhow::Ok((rank, info, nccl, run_id))
    };
    // A stop asked for while waiting for peers or loading is honoured at once.
    let started_up = tokio::select! {
        r = startup => Some(r),
        _ = &mut shutdown => None,
    };
    let (rank, info, nccl, run_id) = match started_up {
        Some(r) => r?,
        None => {
            tracing::info!(rank = opts.rank, "stopped before it was ready");
            if let Some(m) = member.take() {
                m.reg.leave().await;
            }
            return Ok(());
        }
    };
    if let Some(m) = member.as_mut() {
        m.record.run_id = run_id;
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
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    let drain = Arc::new(tokio::sync::Notify::new());
    let mut service = ShardService::new(rank, info, fatal_tx, drain.clone(), metrics.clone());
    if nccl {
        // NCCL waits forever for a peer that died; a step that outlives the collective
        // timeout means one did, and this rank can never step again.
        service = service.with_step_watchdog(opts.collective_timeout);
    }
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
    // No Nagle: a step's reply must not wait for the router's delayed ACK (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
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
                let _ = stop_rx.await;
            }),
    );
    let drain_requested = drain.notified();
    let fatal = tokio::select! {
        _ = &mut shutdown => None,
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

/// Joins the replica's collective: NCCL when the shard computes on a GPU, else the TCP
/// collective. Returns it with whether it is NCCL (which has no timeouts of its own)
/// and the run id of the replica it joined (rank 0's).
async fn join_collective(
    opts: &ShardOptions,
    member: Option<&Member>,
    device: &candle_core::Device,
) -> Result<(Box<dyn Collective>, bool, String)> {
    let own_run = opts.membership.as_ref().and_then(|m| m.run_id.clone());
    if opts.world_size == 1 {
        return Ok((Box::new(sirocco_collective::Solo), false, own_run.unwrap_or_default()));
    }
    #[cfg(feature = "cuda")]
    if matches!(opts.engine.device, sirocco_model::DeviceSpec::Cuda(_)) {
        let (c, run) = join_nccl(opts, member, device).await?;
        return Ok((c, true, run));
    }
    let _ = device;
    let (c, run) = join_tcp(opts, member).await?;
    Ok((Box::new(c), false, run))
}

/// The run id rank 0 publishes: the one it was given, or a fresh one.
fn rank0_run_id(opts: &ShardOptions) -> String {
    opts.membership
        .as_ref()
        .and_then(|m| m.run_id.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Reads rank 0's [`Rendezvous`] from etcd: one of `run` when given (a dead run's
/// key is not ours), else whatever is there.
async fn read_rendezvous(m: &Member, key: &str, run: Option<&str>) -> Option<Rendezvous> {
    let bytes = m.reg.etcd().get(key).await.ok().flatten()?;
    match Rendezvous::from_bytes(&bytes) {
        Some(r) if run.is_none_or(|run| r.run_id() == run) => Some(r),
        Some(_) => None,
        None => {
            tracing::warn!(key, "unreadable rendezvous in etcd; waiting for rank 0 to rewrite it");
            None
        }
    }
}

/// Waits for rank 0's [`Rendezvous`] (of `run`, when given) in etcd.
async fn lookup_rendezvous(m: &Member, key: &str, run: Option<&str>, deadline: Instant) -> Result<Rendezvous> {
    loop {
        if let Some(r) = read_rendezvous(m, key, run).await {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("rank 0 of this replica never published its rendezvous in etcd ({key})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resolves when rank 0 publishes a rendezvous other than `current` (a new run's
/// rank 0 replacing a dead one's key).
async fn rendezvous_replaced(m: &Member, key: &str, current: &Rendezvous) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if read_rendezvous(m, key, None).await.is_some_and(|r| &r != current) {
            return;
        }
    }
}

/// The TCP collective: rank 0 listens (on `peer_addr`, or a free port it publishes in
/// etcd), the other ranks connect. Returns it with the replica's run id.
async fn join_tcp(opts: &ShardOptions, member: Option<&Member>) -> Result<(TcpCollective, String)> {
    let (rank, world, timeout) = (opts.rank, opts.world_size, opts.collective_timeout);
    let etcd_key = opts.membership.as_ref().map(|m| rendezvous_key(&m.cluster, &m.replica));
    let own_run = opts.membership.as_ref().and_then(|m| m.run_id.clone());
    if rank == 0 {
        let run_id = rank0_run_id(opts);
        let bind = opts
            .peer_addr
            .clone()
            .unwrap_or_else(|| format!("{}:0", opts.listen.ip()));
        let listener =
            std::net::TcpListener::bind(&bind).with_context(|| format!("cannot listen for peers on {bind}"))?;
        let addr = listener.local_addr()?.to_string();
        if let (Some(m), Some(key)) = (member, etcd_key) {
            let r = Rendezvous::Tcp {
                addr: addr.clone(),
                run_id: run_id.clone(),
            };
            m.reg.put(&key, r.to_bytes()).await?;
        }
        tracing::info!(peer_addr = %addr, run_id = %run_id, "waiting for the other ranks");
        let join_timeout = timeout.max(Duration::from_secs(300));
        let c = tokio::task::spawn_blocking(move || TcpCollective::rank0_with_listener(listener, world, join_timeout))
            .await??;
        // Operations after joining use the (shorter) collective timeout.
        return Ok((c.with_op_timeout(timeout)?, run_id));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (addr, rendezvous) = match (&opts.peer_addr, &etcd_key, member) {
            (Some(a), _, _) => (a.clone(), None),
            (None, Some(key), Some(m)) => {
                let r = lookup_rendezvous(m, key, own_run.as_deref(), deadline).await?;
                let Rendezvous::Tcp { addr, .. } = &r else {
                    bail!(
                        "rank 0 of replica {} computes on a GPU (NCCL) but this rank is on {}: \
                         give every rank of a replica the same --device kind",
                        opts.membership.as_ref().map_or("?", |m| m.replica.as_str()),
                        opts.engine.device
                    )
                };
                (addr.clone(), Some(r))
            }
            _ => bail!("rank {rank} needs --peer-addr (or --etcd to find rank 0)"),
        };
        let try_for = Duration::from_secs(60).min(deadline.saturating_duration_since(Instant::now()));
        let a = addr.clone();
        let joining = tokio::task::spawn_blocking(move || {
            TcpCollective::connect(rank, world, &a, try_for).and_then(|c| c.with_op_timeout(timeout))
        });
        let replaced = async {
            match (member, &etcd_key, &rendezvous) {
                (Some(m), Some(key), Some(r)) => rendezvous_replaced(m, key, r).await,
                _ => std::future::pending().await,
            }
        };
        let joined = tokio::select! {
            j = joining => j?,
            _ = replaced => {
                // The attempt goes on in its thread until it gives up; it dials a
                // dead address and can join nothing.
                tracing::info!(stale = %addr, "rank 0 published a new rendezvous; joining that one");
                continue;
            }
        };
        match joined {
            Ok(c) => return Ok((c, rendezvous.map_or_else(String::new, |r| r.run_id().to_string()))),
            Err(e) if Instant::now() < deadline && opts.membership.is_some() => {
                tracing::info!(peer_addr = %addr, error = %e, "rank 0 not reachable yet; looking it up again");
            }
            Err(e) => return Err(e).with_context(|| format!("rank {rank} could not join the collective at {addr}")),
        }
    }
}

/// NCCL on this shard's GPU. Rank 0 makes the unique id; it reaches the other ranks
/// through etcd, or without etcd over a one-off TCP rendezvous at `--peer-addr`.
#[cfg(feature = "cuda")]
async fn join_nccl(
    opts: &ShardOptions,
    member: Option<&Member>,
    device: &candle_core::Device,
) -> Result<(Box<dyn Collective>, String)> {
    use sirocco_collective::nccl;
    let (rank, world) = (opts.rank, opts.world_size);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut run = opts
        .membership
        .as_ref()
        .and_then(|m| m.run_id.clone())
        .unwrap_or_default();
    let id: [u8; nccl::ID_BYTES] = match (member, &opts.membership) {
        (Some(m), Some(mo)) => {
            let key = rendezvous_key(&mo.cluster, &mo.replica);
            if rank == 0 {
                let id = nccl::new_id_bytes()?;
                run = rank0_run_id(opts);
                let r = Rendezvous::Nccl {
                    id: nccl::id_to_hex(&id),
                    run_id: run.clone(),
                };
                m.reg.put(&key, r.to_bytes()).await?;
                id
            } else {
                match lookup_rendezvous(m, &key, mo.run_id.as_deref(), deadline).await? {
                    Rendezvous::Nccl { id, run_id } => {
                        run = run_id;
                        nccl::id_from_hex(&id)?
                    }
                    Rendezvous::Tcp { .. } => bail!(
                        "rank 0 of replica {} computes on the CPU (TCP collective) but this rank is on {}: \
                         give every rank of a replica the same --device kind",
                        mo.replica,
                        opts.engine.device
                    ),
                }
            }
        }
        _ => {
            // Static: the TCP collective carries the id once (as f32 values, exact for bytes).
            let (tcp, _) = join_tcp(opts, None).await?;
            let mine = if rank == 0 {
                nccl::new_id_bytes()?
            } else {
                [0u8; nccl::ID_BYTES]
            };
            tokio::task::spawn_blocking(move || -> Result<[u8; nccl::ID_BYTES]> {
                let t = candle_core::Tensor::new(mine.map(f32::from).as_slice(), &candle_core::Device::Cpu)?;
                let got = tcp.broadcast(&t, 0)?.to_vec1::<f32>()?;
                let mut id = [0u8; nccl::ID_BYTES];
                for (b, v) in id.iter_mut().zip(got) {
                    *b = v as u8;
                }
                Ok(id)
            })
            .await??
        }
    };
    tracing::info!(rank, world, device = %opts.engine.device, "joining NCCL");
    let dev = device.clone();
    let join =
        tokio::task::spawn_blocking(move || sirocco_collective::NcclCollective::with_device(rank, world, &id, &dev));
    match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), join).await {
        Ok(joined) => Ok((Box::new(joined??), run)),
        Err(_) => bail!("NCCL rank {rank} of {world}: the other ranks did not join within 300 s"),
    }
}

fn load(
    opts: &ShardOptions,
    loaded: LoadedSource,
    collective: Box<dyn Collective>,
    device: &candle_core::Device,
) -> Result<(Rank, service::Info)> {
    let part = Partition::new(&loaded.config, opts.rank, opts.world_size)?;
    let coll: Arc<dyn Collective> = Arc::from(collective);
    let model = Mistral::load(
        &loaded.config,
        loaded.weights.as_ref(),
        part,
        opts.engine.dtype,
        device,
        coll,
    )?;
    let capacity = opts.engine.kv_capacity_tokens(&model);
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
    Ok((Rank::new(model, capacity, opts.engine.kv_block_size)?, info))
}
