//! The replicas a router serves with. In static mode they are listed once, and a
//! replica that failed is connected again (a new session) once its shards answer;
//! with etcd they follow membership: a replica joins the rotation once all its ranks
//! are ready with the router's model, drains when a rank says so, and leaves the
//! moment a rank's key disappears (its requests then resume on other replicas).

use crate::batcher::{BatchConfig, Batcher, Control};
use crate::cluster::{ClusterBoard, Joined, State};
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
    pub(crate) board: Arc<ClusterBoard>,
    /// How to tell each serving replica to drain, by id.
    controls: std::sync::Mutex<HashMap<usize, Steer>>,
}

/// A serving replica's control, and its shards.
struct Steer {
    control: Arc<watch::Sender<Control>>,
    addrs: Vec<String>,
    /// Whether it is a member of etcd (its shards drain themselves and leave).
    member: bool,
}

/// Why a replica cannot be drained.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DrainRefused {
    Unknown,
    NotServing(State),
}

impl Pool {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        queue: Arc<Queue>,
        loads: Arc<LoadBoard>,
        tokenizer: Option<Tokenizer>,
        model: ModelInfo,
        config: BatchConfig,
        health: HealthReporter,
        fingerprint: String,
        ready_window: Duration,
    ) -> Self {
        Pool {
            queue,
            loads,
            live: Arc::new(AtomicUsize::new(0)),
            tokenizer,
            model,
            config,
            health,
            fingerprint,
            metrics: Arc::new(RouterMetrics::new()),
            readiness: Arc::new(Readiness::new(ready_window)),
            board: Arc::new(ClusterBoard::new()),
            controls: Default::default(),
        }
    }

    /// Starts serving with `replica` (membership's `name` for it, if any); `exited`
    /// hears its id when its batcher ends. Returns its control.
    pub(crate) async fn spawn(
        &self,
        replica: Replica,
        name: Option<String>,
        exited: mpsc::UnboundedSender<usize>,
    ) -> Arc<watch::Sender<Control>> {
        let id = replica.id;
        let (control_tx, control) = watch::channel(Control::Serve);
        let control_tx = Arc::new(control_tx);
        tracing::info!(replica = id, shards = ?replica.addrs, "replica joins the rotation");
        self.board.joined(Joined {
            id,
            name: name.clone(),
            addrs: &replica.addrs,
            fingerprint: &replica.info.fingerprint,
            rank_capacity: &replica.info.rank_kv_capacity,
        });
        self.controls.lock().unwrap().insert(
            id,
            Steer {
                control: control_tx.clone(),
                addrs: replica.addrs.clone(),
                member: name.is_some(),
            },
        );
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
            board: self.board.clone(),
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
        control_tx
    }

    /// Drains replica `id`: it takes no new requests and leaves once its running
    /// ones finish. Its shards are told too: with etcd at once (they mark themselves
    /// draining and leave when empty); statically listed ones once the replica has
    /// drained (they would stop at once, and their sequences fail over).
    pub(crate) async fn drain(&self, id: usize) -> Result<(), DrainRefused> {
        match self.board.state(id) {
            None => return Err(DrainRefused::Unknown),
            Some(State::Ready) => {}
            Some(s) => return Err(DrainRefused::NotServing(s)),
        }
        let (control, addrs, member) = {
            let controls = self.controls.lock().unwrap();
            let s = controls.get(&id).ok_or(DrainRefused::Unknown)?;
            (s.control.clone(), s.addrs.clone(), s.member)
        };
        tracing::info!(replica = id, shards = ?addrs, "drain asked for over HTTP");
        self.board.set_state(id, State::Draining);
        control.send_replace(Control::Drain);
        if member {
            let failed = crate::replica::drain_shards(&addrs).await;
            if !failed.is_empty() {
                tracing::warn!(replica = id, ?failed, "could not tell every shard to drain");
            }
        }
        Ok(())
    }

    /// The batcher of `id` ended: it can no longer be steered.
    fn forget(&self, id: usize) {
        self.controls.lock().unwrap().remove(&id);
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
        let control = pool.spawn(r, None, exited_tx).await;
        if exited_rx.recv().await.is_none() {
            return;
        }
        pool.forget(id);
        if *control.borrow() == Control::Drain {
            // Drained: its shards stop now (a supervisor may start them afresh).
            let failed = crate::replica::drain_shards(&addrs).await;
            if !failed.is_empty() {
                tracing::warn!(replica = id, ?failed, "could not tell every shard to drain");
            }
            wait_until_gone(&addrs).await;
        }
        tracing::info!(
            replica = id,
            "replica left the rotation; reconnecting when its shards answer"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (a minute at most) until no shard at `addrs` accepts connections, so that
/// the next connection reaches the shards' next run.
async fn wait_until_gone(addrs: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let mut any = false;
        for a in addrs {
            let a = a.trim_start_matches("http://");
            if tokio::net::TcpStream::connect(a).await.is_ok() {
                any = true;
            }
        }
        if !any {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Member {
    id: usize,
    addrs: Vec<String>,
    /// The run of the replica's shards: a restarted replica is a new member.
    run_id: String,
    control: Arc<watch::Sender<Control>>,
}

/// Keeps the pool in line with membership until the view's sender goes away.
pub(crate) async fn follow_membership(pool: Arc<Pool>, mut view: watch::Receiver<MemberView>, mut next_id: usize) {
    let mut members: HashMap<String, Member> = HashMap::new();
    let (exited_tx, mut exited_rx) = mpsc::unbounded_channel::<usize>();
    loop {
        let current = view.borrow_and_update().clone();
        let replicas = replicas_from(&current);
        members.retain(|name, m| {
            let addrs: Option<(Vec<String>, &str)> = replicas.get(name).filter(|r| r.complete).map(|r| {
                (
                    r.ranks.iter().map(|x| x.addr.clone()).collect(),
                    r.ranks[0].run_id.as_str(),
                )
            });
            match addrs {
                Some((a, run)) if a == m.addrs && run == m.run_id => {
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
            let run_id = r.ranks[0].run_id.clone();
            match Replica::connect(next_id, &addrs, Duration::from_secs(2)).await {
                Ok(replica) => {
                    let control = pool.spawn(replica, Some(name.clone()), exited_tx.clone()).await;
                    members.insert(
                        name.clone(),
                        Member {
                            id: next_id,
                            addrs,
                            run_id,
                            control,
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
                // A replica that failed may come back under the same name. One that
                // drained stays a member until its keys go: its shards are leaving
                // (they may not say so in etcd yet), and it must not be joined again.
                members.retain(|_, m| m.id != id || *m.control.borrow() == Control::Drain);
                pool.forget(id);
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if pending => {}
        }
    }
}
