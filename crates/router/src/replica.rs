//! A replica: the shards of one tensor-parallel group, driven together. Every step
//! goes to every rank at once; rank 0's answer is the result, and any rank's failure
//! fails the step (the replica cannot continue without it).
//!
//! Each connection is a session of its own on the shards (their `Attach` RPC): the
//! shards drop whatever an earlier session left, refuse steps of any other, and free
//! this session's sequences when it ends (the `Replica` is dropped, or the router
//! dies). Sequence ids therefore never mean anything across a rejoin.

use anyhow::{bail, Context, Result};
use sirocco_proto::shard::v1 as pb;
use sirocco_proto::shard::v1::shard_client::ShardClient;
use sirocco_scheduler::KvGeometry;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// What the ranks of a replica reported when it was connected.
#[derive(Clone, Debug)]
pub(crate) struct ReplicaInfo {
    pub(crate) vocab_size: usize,
    /// The longest context the model takes (`max_position_embeddings`).
    pub(crate) max_context: usize,
    pub(crate) sliding_window: Option<usize>,
    pub(crate) eos_token_ids: Vec<u32>,
    pub(crate) attention_heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) world_size: usize,
    /// The smallest rank's KV pool.
    pub(crate) kv: KvGeometry,
    /// Each rank's own KV capacity, in tokens.
    pub(crate) rank_kv_capacity: Vec<usize>,
    pub(crate) fingerprint: String,
}

pub(crate) struct Replica {
    pub(crate) id: usize,
    pub(crate) addrs: Vec<String>,
    clients: Vec<ShardClient<Channel>>,
    pub(crate) info: ReplicaInfo,
    /// What each rank said of its KV pool in its last step's answer.
    rank_kv: std::sync::Arc<std::sync::Mutex<Vec<Option<pb::KvStats>>>>,
    /// This connection's session id on every rank.
    session: String,
    /// Turns true when a rank's session stream ends (the shard restarted, closed it, or
    /// its connection broke): the session is over and no step can succeed.
    lost: tokio::sync::watch::Receiver<bool>,
    /// The task holding the session streams open: dropping the replica aborts it
    /// (a `JoinSet` aborts its tasks when dropped), which ends the session.
    _sessions: tokio::task::JoinSet<()>,
}

/// How long attaching may take: a rank finishes a step in flight first.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

const MAX_MESSAGE: usize = 256 << 20;

async fn connect_one(addr: &str, deadline: Instant) -> Result<(ShardClient<Channel>, pb::InfoResponse)> {
    let uri = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("bad shard address {addr:?}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    let mut last_log = Instant::now();
    loop {
        let attempt = async {
            let ch = endpoint.connect().await?;
            let mut c = ShardClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            let info = c.info(pb::InfoRequest {}).await?.into_inner();
            anyhow::Ok((c, info))
        };
        // A shard that accepts but does not answer (a paused process) must not hold
        // the caller past its deadline.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let attempt = async {
            tokio::time::timeout(left, attempt)
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {left:?}")))
        };
        match attempt.await {
            Ok(x) => return Ok(x),
            Err(e) if Instant::now() < deadline => {
                if last_log.elapsed() > Duration::from_secs(5) {
                    tracing::info!(shard = addr, error = %e, "waiting for shard");
                    last_log = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context(format!("shard {addr} did not answer in time"))),
        }
    }
}

impl Replica {
    /// Connects to every rank (waiting for them to come up until `timeout`) and checks
    /// that they form one replica: ranks in order, same world size, same model.
    pub(crate) async fn connect(id: usize, addrs: &[String], timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut clients = Vec::new();
        let mut infos = Vec::new();
        for a in addrs {
            let (c, i) = connect_one(a, deadline).await?;
            clients.push(c);
            infos.push(i);
        }
        let first = &infos[0];
        for (pos, (i, a)) in infos.iter().zip(addrs).enumerate() {
            if i.rank as usize != pos || i.world_size as usize != addrs.len() {
                bail!(
                    "replica {id}: shard {a} is rank {} of {}, but was listed as rank {pos} of {}",
                    i.rank,
                    i.world_size,
                    addrs.len()
                );
            }
            if i.fingerprint != first.fingerprint {
                bail!(
                    "replica {id}: shard {a} serves a different model (fingerprint {} vs {})",
                    i.fingerprint,
                    first.fingerprint
                );
            }
        }
        let session = uuid::Uuid::new_v4().to_string();
        let (lost, sessions) = attach(&clients, addrs, &session).await?;
        Ok(Replica {
            id,
            addrs: addrs.to_vec(),
            rank_kv: std::sync::Arc::new(std::sync::Mutex::new(vec![None; addrs.len()])),
            clients,
            session,
            lost,
            _sessions: sessions,
            info: ReplicaInfo {
                vocab_size: first.vocab_size as usize,
                max_context: first.max_position_embeddings as usize,
                sliding_window: first.sliding_window.map(|w| w as usize),
                eos_token_ids: first.eos_token_ids.clone(),
                attention_heads: first.num_attention_heads as usize,
                kv_heads: first.num_key_value_heads as usize,
                world_size: addrs.len(),
                kv: KvGeometry {
                    capacity_tokens: infos.iter().map(|i| i.kv_capacity_tokens as usize).min().unwrap_or(0),
                    block_size: first.kv_block_size as usize,
                    positions_per_seq: first.kv_positions_per_seq as usize,
                },
                rank_kv_capacity: infos.iter().map(|i| i.kv_capacity_tokens as usize).collect(),
                fingerprint: first.fingerprint.clone(),
            },
        })
    }

    /// Resolves once this replica's session has ended on some rank.
    /// What each rank said of its KV pool in its last step's answer (`None` before one).
    pub(crate) fn rank_kv(&self) -> Vec<Option<pb::KvStats>> {
        self.rank_kv.lock().unwrap().clone()
    }

    pub(crate) async fn session_lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|l| *l).await;
    }

    /// Runs one step on every rank; resolves to rank 0's response. The future owns
    /// what it needs, so a step the batcher gave up on can still be seen through.
    pub(crate) fn step(&self, mut req: pb::StepRequest) -> StepFuture {
        req.session.clone_from(&self.session);
        let rank_kv = self.rank_kv.clone();
        // Each rank gets a copy, the last one the request itself.
        let last = self.clients.len().saturating_sub(1);
        let mut req = Some(req);
        let calls: Vec<_> = self
            .clients
            .iter()
            .zip(&self.addrs)
            .enumerate()
            .map(|(rank, (c, addr))| {
                let mut c = c.clone();
                let req = if rank == last { req.take() } else { req.clone() }.expect("taken by the last rank only");
                let addr = addr.clone();
                async move {
                    c.step(req)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| anyhow::anyhow!("rank {rank} ({addr}): {}", s.message()))
                }
            })
            .collect();
        Box::pin(async move {
            // The first failure fails the step at once: a stalled rank must not hold
            // the others' answers (or the clients) hostage.
            let mut results = futures::future::try_join_all(calls).await?;
            *rank_kv.lock().unwrap() = results.iter().map(|r| r.kv).collect();
            // Ranks decide on cached prefixes alike (same steps, same rule); a
            // disagreement would compute with keys some ranks do not have.
            if let Some((rank, r)) = results
                .iter()
                .enumerate()
                .find(|(_, r)| r.attached != results[0].attached)
            {
                anyhow::bail!(
                    "ranks disagree on cached prefixes (rank 0: {:?}, rank {rank}: {:?}); \
                     are their KV cache budgets and block sizes the same?",
                    results[0].attached,
                    r.attached
                );
            }
            Ok(results.swap_remove(0))
        })
    }
}

/// Asks every shard at `addrs` to drain: each stops taking sequences, finishes the
/// ones it holds (with etcd; without, it stops at once) and leaves. Returns the
/// ranks that could not be told, with why.
pub(crate) async fn drain_shards(addrs: &[String]) -> Vec<String> {
    let calls = addrs.iter().map(|addr| async move {
        let uri = if addr.starts_with("http") {
            addr.clone()
        } else {
            format!("http://{addr}")
        };
        let told = async {
            let channel = Endpoint::from_shared(uri)?
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await?;
            ShardClient::new(channel).drain(pb::DrainRequest {}).await?;
            Ok::<_, anyhow::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), told).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{addr}: {e:#}")),
            Err(_) => Some(format!("{addr}: no answer within 5 s")),
        }
    });
    futures::future::join_all(calls).await.into_iter().flatten().collect()
}

/// A step in flight on every rank of a replica.
pub(crate) type StepFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<pb::StepResponse>> + Send>>;

/// Attaches `session` on every rank (each drops what earlier sessions left) and keeps
/// the streams open in a task; the returned flag turns true when any of them ends.
async fn attach(
    clients: &[ShardClient<Channel>],
    addrs: &[String],
    session: &str,
) -> Result<(tokio::sync::watch::Receiver<bool>, tokio::task::JoinSet<()>)> {
    let calls = clients.iter().zip(addrs).map(|(c, addr)| {
        let mut c = c.clone();
        let req = pb::AttachRequest {
            session: session.to_string(),
        };
        async move {
            let attached = async {
                let mut stream = c.attach(req).await?.into_inner();
                let first = stream.message().await?;
                Ok::<_, tonic::Status>((stream, first))
            };
            match tokio::time::timeout(ATTACH_TIMEOUT, attached).await {
                Ok(Ok((stream, Some(ev)))) => {
                    if ev.dropped_sequences > 0 {
                        tracing::warn!(
                            shard = %addr,
                            dropped = ev.dropped_sequences,
                            "shard held sequences of an earlier session; dropped them"
                        );
                    }
                    Ok(stream)
                }
                Ok(Ok((_, None))) => bail!("shard {addr} closed the session at once"),
                Ok(Err(s)) => bail!("shard {addr} refused the session: {}", s.message()),
                Err(_) => bail!("shard {addr} did not attach within {ATTACH_TIMEOUT:?}"),
            }
        }
    });
    let streams = futures::future::try_join_all(calls).await?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut watch = tokio::task::JoinSet::new();
    watch.spawn(async move {
        let ends = streams.into_iter().map(|mut s| {
            Box::pin(async move {
                // The shard sends nothing after the first event: any message or end
                // here means the session is over.
                let _ = s.message().await;
            })
        });
        futures::future::select_all(ends).await;
        let _ = tx.send(true);
    });
    Ok((rx, watch))
}
