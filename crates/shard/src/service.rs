//! The internal gRPC service of a shard. Steps run one at a time on a blocking
//! thread (the model is synchronous); a collective failure is fatal to the process.
//!
//! A shard serves one router session at a time (the `Attach` RPC). Sequence ids are
//! the router's and mean something only within its session: attaching drops every
//! sequence of an earlier session, steps of any other session are refused, and when
//! the session's stream closes (the router left, crashed or stopped answering its
//! HTTP/2 pings) its sequences are freed. So a replica that rejoins starts clean, and
//! a shard never serves a sequence id that a dead session left behind.

use crate::convert::{kv_to_pb, output_to_pb, step_from_pb};
use sirocco_collective::CollectiveError;
use sirocco_engine::Rank;
use sirocco_metrics::ShardMetrics;
use sirocco_model::MistralConfig;
use sirocco_proto::shard::v1 as pb;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Notify};
use tonic::{Request, Response, Status};

/// What a shard tells the router about itself.
#[derive(Clone, Debug)]
pub struct Info {
    pub rank: usize,
    pub world_size: usize,
    /// The loaded config: the router is told the parts it needs.
    pub config: MistralConfig,
    pub kv_capacity_tokens: usize,
    pub kv_block_size: usize,
    pub kv_positions_per_seq: usize,
    pub fingerprint: String,
    pub dtype: String,
}

/// The rank and the router session it serves, changed together under one lock so
/// that no step runs across a change of session.
struct Served {
    rank: Rank,
    session: Option<String>,
}

/// A step or release of a session that is not the attached one.
#[derive(Debug)]
struct NotAttached(String);

impl std::fmt::Display for NotAttached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "router session {:?} is not attached to this shard (superseded or closed); attach again",
            self.0
        )
    }
}

impl std::error::Error for NotAttached {}

impl Served {
    fn check_session(&self, session: &str) -> anyhow::Result<()> {
        if self.session.as_deref() == Some(session) {
            Ok(())
        } else {
            Err(NotAttached(session.to_string()).into())
        }
    }
}

#[derive(Clone)]
pub struct ShardService {
    served: Arc<Mutex<Served>>,
    info: Arc<Info>,
    broken: Arc<AtomicBool>,
    fatal: mpsc::Sender<String>,
    drain: Arc<Notify>,
    /// Turns true when the shard stops: router sessions end then, so their
    /// connections close and the server's graceful shutdown does not wait on them.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
    steps: Arc<AtomicU64>,
    /// Sequences holding KV after the last step (read without taking the rank's lock).
    held: Arc<AtomicU64>,
    evictions_seen: Arc<AtomicU64>,
    metrics: Arc<ShardMetrics>,
    /// Longest a step may run before the shard declares its collective dead.
    watchdog: Option<std::time::Duration>,
}

impl ShardService {
    pub fn new(
        rank: Rank,
        info: Info,
        fatal: mpsc::Sender<String>,
        drain: Arc<Notify>,
        metrics: Arc<ShardMetrics>,
    ) -> Self {
        ShardService {
            served: Arc::new(Mutex::new(Served { rank, session: None })),
            info: Arc::new(info),
            broken: Arc::new(AtomicBool::new(false)),
            fatal,
            drain,
            steps: Arc::new(AtomicU64::new(0)),
            held: Arc::new(AtomicU64::new(0)),
            evictions_seen: Arc::new(AtomicU64::new(0)),
            metrics,
            watchdog: None,
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Makes a step that runs longer than `limit` fatal: for collectives (NCCL) that
    /// would otherwise wait forever on a dead peer.
    pub fn with_step_watchdog(mut self, limit: std::time::Duration) -> Self {
        self.watchdog = Some(limit);
        self
    }

    /// Reports a step stuck past the watchdog and ends the process: the stuck thread
    /// sits in the GPU runtime and can never be joined, so an orderly exit would hang.
    fn stuck(&self, limit: std::time::Duration) -> Status {
        self.broken.store(true, Ordering::SeqCst);
        let msg = format!(
            "rank {}: a step ran longer than {:.0} s; a peer of this collective is gone",
            self.info.rank,
            limit.as_secs_f64()
        );
        tracing::error!(rank = self.info.rank, "{msg}; shard exits");
        let _ = self.fatal.try_send(msg.clone());
        tokio::spawn(async {
            // Time for the drain path to delete this shard's keys.
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            std::process::exit(70);
        });
        Status::unavailable(msg)
    }

    fn observe_kv(&self, kv: &sirocco_model::KvStats) {
        self.held.store(kv.sequences as u64, Ordering::SeqCst);
        let m = &self.metrics;
        m.kv_tokens_used.set(kv.used_tokens as i64);
        m.kv_blocks_used.set(kv.blocks as i64);
        m.kv_wrapped_sequences.set(kv.wrapped_sequences as i64);
        m.prefix_cache_blocks.set(kv.cached_blocks as i64);
        // Stats of concurrent calls may arrive out of order: count each eviction once.
        let counted = self.evictions_seen.fetch_max(kv.evicted_blocks, Ordering::SeqCst);
        m.prefix_cache_evictions
            .inc_by(kv.evicted_blocks.saturating_sub(counted));
        m.sequences.set(kv.sequences as i64);
    }

    /// Ends every router session (the shard is stopping).
    pub fn end_sessions(&self) {
        self.stopping.send_replace(true);
    }

    /// Sequences whose KV this shard holds.
    pub fn sequences_held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    fn check_alive(&self) -> Result<(), Status> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!(
                "shard rank {} lost its collective and is shutting down",
                self.info.rank
            )));
        }
        Ok(())
    }

    /// Runs `f` on the rank and its session in a blocking thread.
    async fn with_served<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Served) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        self.check_alive()?;
        let served = self.served.clone();
        let out = tokio::task::spawn_blocking(move || {
            let mut s = served
                .lock()
                .map_err(|_| anyhow::anyhow!("rank state poisoned by an earlier panic"))?;
            f(&mut s)
        })
        .await
        .map_err(|e| Status::internal(format!("step task failed: {e}")))?;
        out.map_err(|e| {
            if let Some(n) = e.downcast_ref::<NotAttached>() {
                return Status::failed_precondition(n.to_string());
            }
            let collective = e.chain().any(|c| c.is::<CollectiveError>());
            if collective {
                self.broken.store(true, Ordering::SeqCst);
                let msg = format!("rank {}: {e:#}", self.info.rank);
                tracing::error!(rank = self.info.rank, error = %format!("{e:#}"), "collective failed; shard exits");
                let _ = self.fatal.try_send(msg.clone());
                Status::unavailable(msg)
            } else {
                Status::internal(format!("rank {}: {e:#}", self.info.rank))
            }
        })
    }

    /// Ends `session` if it is still the attached one, freeing its sequences.
    async fn detach(&self, session: String) {
        let s = session.clone();
        let ended = self
            .with_served(move |sv| {
                if sv.session.as_deref() != Some(s.as_str()) {
                    return Ok(None);
                }
                sv.session = None;
                let n = sv.rank.release_all();
                Ok(Some((n, sv.rank.kv_stats())))
            })
            .await;
        if let Ok(Some((n, kv))) = ended {
            self.observe_kv(&kv);
            tracing::info!(rank = self.info.rank, %session, freed = n, "router session closed; its sequences are freed");
        }
    }
}

type AttachStream = tokio_stream::wrappers::ReceiverStream<Result<pb::AttachEvent, Status>>;

#[tonic::async_trait]
impl pb::shard_server::Shard for ShardService {
    type AttachStream = AttachStream;

    async fn attach(&self, req: Request<pb::AttachRequest>) -> Result<Response<AttachStream>, Status> {
        let session = req.into_inner().session;
        if session.is_empty() {
            return Err(Status::invalid_argument("session must not be empty"));
        }
        let s = session.clone();
        let (dropped, previous, kv) = self
            .with_served(move |sv| {
                let dropped = sv.rank.release_all();
                let previous = sv.session.replace(s);
                Ok((dropped, previous, sv.rank.kv_stats()))
            })
            .await?;
        self.observe_kv(&kv);
        tracing::info!(rank = self.info.rank, %session, ?previous, dropped, "router session attached");
        let (tx, rx) = mpsc::channel(1);
        let _ = tx
            .send(Ok(pb::AttachEvent {
                dropped_sequences: dropped as u64,
            }))
            .await;
        let me = self.clone();
        let mut stopping = self.stopping.subscribe();
        tokio::spawn(async move {
            // The receiver goes when the router's stream does (or its connection dies);
            // dropping the sender ends the stream from this side.
            tokio::select! {
                _ = tx.closed() => {}
                _ = stopping.wait_for(|s| *s) => drop(tx),
            }
            me.detach(session).await;
        });
        Ok(Response::new(AttachStream::new(rx)))
    }

    async fn info(&self, _req: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let i = &self.info;
        Ok(Response::new(pb::InfoResponse {
            rank: i.rank as u32,
            world_size: i.world_size as u32,
            kv_capacity_tokens: i.kv_capacity_tokens as u64,
            kv_block_size: i.kv_block_size as u32,
            kv_positions_per_seq: i.kv_positions_per_seq as u64,
            fingerprint: i.fingerprint.clone(),
            dtype: i.dtype.clone(),
            vocab_size: i.config.vocab_size as u64,
            max_position_embeddings: i.config.max_context() as u64,
            sliding_window: i.config.sliding_window.map(|w| w as u64),
            eos_token_ids: i.config.eos_token_ids.clone(),
            num_attention_heads: i.config.num_attention_heads as u32,
            num_key_value_heads: i.config.num_key_value_heads as u32,
        }))
    }

    async fn step(&self, req: Request<pb::StepRequest>) -> Result<Response<pb::StepResponse>, Status> {
        let req = req.into_inner();
        for s in req.seqs.iter().filter(|s| !s.request_id.is_empty()) {
            tracing::info!(request_id = %s.request_id, seq = s.seq_id, rank = self.info.rank, "sequence started");
        }
        let kind = if req.seqs.iter().any(|s| s.tokens.len() > 1 || !s.sample) {
            "prefill"
        } else {
            "decode"
        };
        let started = std::time::Instant::now();
        let n_seqs = req.seqs.len();
        let seqs: Vec<_> = req.seqs.into_iter().map(step_from_pb).collect();
        let release = req.release;
        let attach: Vec<(u64, Vec<u32>)> = req.attach.into_iter().map(|a| (a.seq_id, a.tokens)).collect();
        let forks = req.fork;
        let session = req.session;
        let steps = self.steps.clone();
        let run = self.with_served(move |sv| {
            sv.check_session(&session)?;
            let r = &mut sv.rank;
            r.release(&release);
            let attached = attach
                .iter()
                .map(|(seq, tokens)| {
                    Ok(pb::AttachedPrefix {
                        seq_id: *seq,
                        cached_tokens: r.attach(*seq, tokens)? as u32,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            for f in &forks {
                r.fork(f.parent, f.child)?;
            }
            let outs = if seqs.is_empty() {
                Vec::new()
            } else {
                steps.fetch_add(1, Ordering::SeqCst);
                r.step(&seqs)?
            };
            Ok((outs, attached, r.kv_stats()))
        });
        let (outs, attached, kv) = match self.watchdog {
            Some(limit) => tokio::time::timeout(limit, run)
                .await
                .map_err(|_| self.stuck(limit))??,
            None => run.await?,
        };
        if n_seqs > 0 {
            self.metrics
                .step_duration
                .with_label_values(&[kind])
                .observe(started.elapsed().as_secs_f64());
        }
        self.observe_kv(&kv);
        Ok(Response::new(pb::StepResponse {
            results: outs.into_iter().map(output_to_pb).collect(),
            kv: Some(kv_to_pb(&kv)),
            attached,
        }))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = req.into_inner();
        let kv = self
            .with_served(move |sv| {
                sv.check_session(&req.session)?;
                sv.rank.release(&req.seq_ids);
                Ok(sv.rank.kv_stats())
            })
            .await?;
        self.observe_kv(&kv);
        Ok(Response::new(pb::ReleaseResponse {
            kv: Some(kv_to_pb(&kv)),
        }))
    }

    async fn health(&self, _req: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        self.check_alive()?;
        let kv = self.with_served(|sv| Ok(sv.rank.kv_stats())).await?;
        Ok(Response::new(pb::HealthResponse {
            ok: true,
            kv: Some(kv_to_pb(&kv)),
            steps: self.steps.load(Ordering::SeqCst),
        }))
    }

    async fn drain(&self, _req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        tracing::info!(rank = self.info.rank, "drain requested");
        self.drain.notify_one();
        Ok(Response::new(pb::DrainResponse {}))
    }
}
