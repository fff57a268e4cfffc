//! Meeting the other ranks of a replica: the shard's registration in etcd, and
//! joining the replica's collective (NCCL on a GPU, else TCP), directly at
//! `--peer-addr` or through the rendezvous rank 0 publishes in etcd.

use crate::{MembershipOptions, ShardOptions};
use anyhow::{bail, Context, Result};
use sirocco_collective::{Collective, TcpCollective};
use sirocco_membership::{rendezvous_key, shard_key, Etcd, Registration, Rendezvous, ShardRecord, ShardState};
use std::time::{Duration, Instant};

/// This shard's registration in etcd and the record it publishes there.
pub(crate) struct Member {
    reg: Registration,
    key: String,
    record: ShardRecord,
}

impl Member {
    /// Registers under a lease and publishes the record as starting.
    pub(crate) async fn register(opts: &ShardOptions, m: &MembershipOptions, fingerprint: String) -> Result<Member> {
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
                fingerprint,
                kv_capacity_tokens: 0,
                state: ShardState::Starting,
                run_id: m.run_id.clone().unwrap_or_default(),
            },
        };
        member.set_state(ShardState::Starting).await;
        Ok(member)
    }

    pub(crate) async fn set_state(&mut self, state: ShardState) {
        self.record.state = state;
        let value = serde_json::to_vec(&self.record).expect("records serialize");
        if let Err(e) = self.reg.put(&self.key, value).await {
            tracing::warn!(error = %e, ?state, "could not publish shard state (kept for when etcd is back)");
        }
    }

    /// The run of the replica this shard joined (published with its next state).
    pub(crate) fn set_run_id(&mut self, run_id: String) {
        self.record.run_id = run_id;
    }

    /// Publishes the shard as ready, with the KV capacity it serves.
    pub(crate) async fn ready(&mut self, kv_capacity_tokens: usize) {
        self.record.kv_capacity_tokens = kv_capacity_tokens;
        self.set_state(ShardState::Ready).await;
    }

    /// Deletes this shard's keys and ends its lease.
    pub(crate) async fn leave(self) {
        self.reg.leave().await;
    }
}

/// Joins the replica's collective: NCCL when the shard computes on a GPU, else the TCP
/// collective. Returns it with whether it is NCCL (which has no timeouts of its own)
/// and the run id of the replica it joined (rank 0's).
pub(crate) async fn join_collective(
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
