//! The replicas a router serves with. In static mode they are listed once, and a
//! replica that failed is connected again (a new session) once its shards answer;
//! with etcd they follow membership: a replica joins the rotation once all its ranks
//! are ready with the router's model, drains when a rank says so, and leaves the
//! moment a rank's key disappears (its requests then resume on other replicas).

use crate::batcher::{BatchConfig, Batcher, Control};
use crate::load::{LoadBoard, Readiness};
use crate::queue::Queue;
use crate::replica::Replica;
use crate::ModelInfo;
use sirocco_membership::{replicas_from, MemberView};
use sirocco_metrics::RouterMetrics;
use sirocco_proto::v1::sirocco_server::SiroccoServer;
use sirocco_tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tonic_health::server::HealthReporter;

type Api = SiroccoServer<crate::server::SiroccoService>;

pub(crate) struct Pool {
    pub(crate) queue: Arc<Queue>,
    pub(crate) loads: Arc<LoadBoard>,
    pub(crate) live: Arc<AtomicUsize>,
    pub(crate) tokenizer: Option<Tokenizer>,
    pub(crate) model: ModelInfo,
    pub(crate) config: BatchConfig,
    pub(crate) health: HealthReporter,
    /// Model fingerprint every replica must have.
    pub(crate) fingerprint: String,
    pub(crate) metrics: Arc<RouterMetrics>,
    pub(crate) readiness: Arc<Readiness>,
}

impl Pool {
    /// Starts serving with `replica`; `exited` hears its id when its batcher ends.
    pub(crate) async fn spawn(
        &self,
        replica: Replica,
        control: watch::Receiver<Control>,
        exited: mpsc::UnboundedSender<usize>,
    ) {
        let id = replica.id;
        tracing::info!(replica = id, shards = ?replica.addrs, "replica joins the rotation");
        self.loads.set(id, 0, 0, true);
        self.live.fetch_add(1, Ordering::SeqCst);
        self.health.set_serving::<Api>().await;
        let b = Batcher {
            replica,
            queue: self.queue.clone(),
            tokenizer: self.tokenizer.clone(),
            model: self.model.clone(),
            config: self.config.clone(),
            live_replicas: self.live.clone(),
            loads: self.loads.clone(),
            control,
            metrics: self.metrics.clone(),
            readiness: self.readiness.clone(),
            deadline: crate::step_deadline::StepDeadline::new(
                self.config.step_deadline_floor,
                self.config.step_timeout,
            ),
            abandoned: None,
        };
        let health = self.health.clone();
        let live = self.live.clone();
        tokio::spawn(async move {
            b.run().await;
            if live.load(Ordering::SeqCst) == 0 {
                health.set_not_serving::<Api>().await;
            }
            let _ = exited.send(id);
        });
    }
}

/// Serves with a statically listed replica for as long as the router runs: whenever
/// its batcher ends (the replica failed), connects to its shards again, waiting for
/// them as long as it takes (a restarted shard comes back on the same address).
pub(crate) async fn keep_static(pool: Arc<Pool>, first: Replica) {
    let (id, addrs) = (first.id, first.addrs.clone());
    let mut replica = Some(first);
    let mut backoff = Duration::from_millis(500);
    loop {
        let r = match replica.take() {
            Some(r) => r,
            None => match Replica::connect(id, &addrs, Duration::from_secs(5)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(replica = id, error = %format!("{e:#}"), "replica not back yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(500);
        let (exited_tx, mut exited_rx) = mpsc::unbounded_channel();
        // Static replicas are never told to drain or leave: the sender just stays.
        let (_control, rx) = watch::channel(Control::Serve);
        pool.spawn(r, rx, exited_tx).await;
        if exited_rx.recv().await.is_none() {
            return;
        }
        tracing::info!(
            replica = id,
            "replica left the rotation; reconnecting when its shards answer"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct Member {
    id: usize,
    addrs: Vec<String>,
    control: watch::Sender<Control>,
}

/// Keeps the pool in line with membership until the view's sender goes away.
pub(crate) async fn follow_membership(pool: Arc<Pool>, mut view: watch::Receiver<MemberView>, mut next_id: usize) {
    let mut members: HashMap<String, Member> = HashMap::new();
    let (exited_tx, mut exited_rx) = mpsc::unbounded_channel::<usize>();
    loop {
        let current = view.borrow_and_update().clone();
        let replicas = replicas_from(&current);
        members.retain(|name, m| {
            let addrs: Option<Vec<String>> = replicas
                .get(name)
                .filter(|r| r.complete)
                .map(|r| r.ranks.iter().map(|x| x.addr.clone()).collect());
            match addrs {
                Some(a) if a == m.addrs => {
                    if replicas[name].draining {
                        let _ = m.control.send(Control::Drain);
                    }
                    true
                }
                _ => {
                    tracing::warn!(replica = m.id, name = %name, "replica left the membership");
                    let _ = m.control.send(Control::Gone);
                    false
                }
            }
        });
        let mut pending = false;
        for (name, r) in &replicas {
            if members.contains_key(name) || !r.ready || r.draining {
                continue;
            }
            if r.ranks[0].fingerprint != pool.fingerprint {
                tracing::warn!(name = %name, "replica serves a different model; ignored");
                continue;
            }
            let addrs: Vec<String> = r.ranks.iter().map(|x| x.addr.clone()).collect();
            match Replica::connect(next_id, &addrs, Duration::from_secs(2)).await {
                Ok(replica) => {
                    let (tx, rx) = watch::channel(Control::Serve);
                    pool.spawn(replica, rx, exited_tx.clone()).await;
                    members.insert(
                        name.clone(),
                        Member {
                            id: next_id,
                            addrs,
                            control: tx,
                        },
                    );
                    next_id += 1;
                }
                Err(e) => {
                    tracing::warn!(name = %name, error = %format!("{e:#}"), "replica registered but not reachable; retrying");
                    pending = true;
                }
            }
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            Some(id) = exited_rx.recv() => {
                // A replica that failed or drained may come back under the same name.
                members.retain(|_, m| m.id != id);
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if pending => {}
        }
    }
}
