//! The cluster as its operators see it (`/v1/cluster`): each replica the router has
//! served with (its shards, state, KV use, last step), the ones membership lists
//! that it does not serve with (yet), the queue, and whether etcd answers. The pool
//! and the batchers keep the board current; it imports no other module here.

use serde::Serialize;
use sirocco_membership::{replicas_from, EtcdReach, MemberView, ShardState};
use sirocco_proto::shard::v1::KvStats;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Where a replica is in its life, as the console and `/v1/cluster` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    /// Listed by membership, not (yet) all ranks ready or connected.
    Starting,
    Ready,
    /// Takes no new requests; finishes its running ones, then leaves.
    Draining,
    /// Out of rotation after an error; static replicas are reconnected when they answer.
    Failed,
}

/// The replicas and what the router last heard of each.
pub(crate) struct ClusterBoard {
    replicas: Mutex<BTreeMap<usize, Entry>>,
    membership: OnceLock<MembershipSource>,
}

struct MembershipSource {
    endpoints: Vec<String>,
    view: watch::Receiver<MemberView>,
    reach: watch::Receiver<EtcdReach>,
}

struct Entry {
    /// The replica's name in membership; none for a statically listed one.
    name: Option<String>,
    addrs: Vec<String>,
    fingerprint: String,
    rank_capacity: Vec<usize>,
    state: State,
    steps: u64,
    last_step: Option<(Instant, Duration)>,
    rank_kv: Vec<Option<KvStats>>,
    error: Option<String>,
}

/// What a replica that joins the rotation is.
pub(crate) struct Joined<'a> {
    pub(crate) id: usize,
    pub(crate) name: Option<String>,
    pub(crate) addrs: &'a [String],
    pub(crate) fingerprint: &'a str,
    pub(crate) rank_capacity: &'a [usize],
}

impl ClusterBoard {
    pub(crate) fn new() -> Self {
        ClusterBoard {
            replicas: Mutex::default(),
            membership: OnceLock::new(),
        }
    }

    /// Follows etcd: the replicas it lists, and whether it answers.
    pub(crate) fn follow_membership(
        &self,
        endpoints: Vec<String>,
        view: watch::Receiver<MemberView>,
        reach: watch::Receiver<EtcdReach>,
    ) {
        let _ = self.membership.set(MembershipSource { endpoints, view, reach });
    }

    pub(crate) fn joined(&self, r: Joined) {
        let mut board = self.replicas.lock().unwrap();
        // A replica back under its name replaces what was left of its last run.
        if r.name.is_some() {
            board.retain(|_, e| e.name != r.name);
        }
        board.insert(
            r.id,
            Entry {
                name: r.name,
                addrs: r.addrs.to_vec(),
                fingerprint: r.fingerprint.to_string(),
                rank_capacity: r.rank_capacity.to_vec(),
                state: State::Ready,
                steps: 0,
                last_step: None,
                rank_kv: vec![None; r.addrs.len()],
                error: None,
            },
        );
    }

    /// `id` completed a step that took `took`; its ranks' KV pools as they answered.
    pub(crate) fn stepped(&self, id: usize, took: Duration, rank_kv: Vec<Option<KvStats>>) {
        if let Some(e) = self.replicas.lock().unwrap().get_mut(&id) {
            e.steps += 1;
            e.last_step = Some((Instant::now(), took));
            e.rank_kv = rank_kv;
        }
    }

    pub(crate) fn set_state(&self, id: usize, state: State) {
        if let Some(e) = self.replicas.lock().unwrap().get_mut(&id) {
            e.state = state;
        }
    }

    pub(crate) fn state(&self, id: usize) -> Option<State> {
        self.replicas.lock().unwrap().get(&id).map(|e| e.state)
    }

    pub(crate) fn failed(&self, id: usize, error: String) {
        if let Some(e) = self.replicas.lock().unwrap().get_mut(&id) {
            e.state = State::Failed;
            e.error = Some(error);
        }
    }

    /// `id` drained and left the rotation. A member of etcd stays shown (draining)
    /// until membership no longer lists it: its shards leave after the router does.
    pub(crate) fn left(&self, id: usize) {
        let followed = self.membership.get().is_some();
        let mut board = self.replicas.lock().unwrap();
        if !(followed && board.get(&id).is_some_and(|e| e.name.is_some())) {
            board.remove(&id);
        }
    }

    /// The board now, with the queue's `waiting` of at most `queue_limit`.
    pub(crate) fn view(&self, waiting: usize, queue_limit: usize) -> ClusterView {
        let members = self.membership.get().map(|m| replicas_from(&m.view.borrow()));
        let mut board = self.replicas.lock().unwrap();
        // A failed or drained replica that membership no longer lists is gone for good.
        if let Some(members) = &members {
            board.retain(|_, e| {
                matches!(e.state, State::Ready | State::Starting)
                    || e.name.as_ref().is_some_and(|n| members.contains_key(n))
            });
        }
        let mut replicas: Vec<ReplicaView> = board
            .iter()
            .map(|(&id, e)| {
                let record_states: Vec<Option<ShardState>> = (0..e.addrs.len())
                    .map(|rank| {
                        let m = members.as_ref()?.get(e.name.as_ref()?)?;
                        let r = m.ranks.iter().find(|r| r.rank == rank && r.addr == e.addrs[rank])?;
                        Some(r.state)
                    })
                    .collect();
                entry_view(id, e, &record_states)
            })
            .collect();
        if let Some(members) = &members {
            let shown: Vec<&str> = board.values().filter_map(|e| e.name.as_deref()).collect();
            for (name, m) in members {
                if !shown.contains(&name.as_str()) {
                    replicas.push(unserved_view(m));
                }
            }
        }
        let etcd = self.membership.get().map(|m| {
            let reach = m.reach.borrow().clone();
            EtcdView {
                endpoints: m.endpoints.clone(),
                reachable: reach.reachable,
                error: reach.error,
            }
        });
        ClusterView {
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            discovery: if etcd.is_some() { "etcd" } else { "static" },
            etcd,
            queue: QueueView {
                waiting,
                limit: queue_limit,
            },
            replicas,
        }
    }
}

fn shard_state(s: ShardState) -> State {
    match s {
        ShardState::Starting => State::Starting,
        ShardState::Ready => State::Ready,
        ShardState::Draining => State::Draining,
    }
}

fn entry_view(id: usize, e: &Entry, record_states: &[Option<ShardState>]) -> ReplicaView {
    let ranks: Vec<RankView> = e
        .addrs
        .iter()
        .enumerate()
        .map(|(rank, addr)| {
            let kv = e.rank_kv.get(rank).copied().flatten();
            let capacity = e.rank_capacity.get(rank).copied().unwrap_or(0);
            RankView {
                rank,
                addr: addr.clone(),
                // A failed replica's ranks are shown failed whatever their records say.
                state: match (e.state, record_states.get(rank).copied().flatten()) {
                    (State::Failed, _) => State::Failed,
                    (_, Some(s)) => shard_state(s),
                    (s, None) => s,
                },
                kv_used_tokens: kv.map(|k| k.used_tokens as usize),
                kv_capacity_tokens: kv.map_or(capacity, |k| k.capacity_tokens as usize),
                sequences: kv.map(|k| k.sequences as usize),
                cached_blocks: kv.map(|k| k.cached_blocks as usize),
            }
        })
        .collect();
    // Every rank holds the same positions (its slice of heads), so the fullest one
    // and the smallest pool are the replica's.
    ReplicaView {
        id: Some(id),
        name: e.name.clone(),
        state: e.state,
        fingerprint: e.fingerprint.clone(),
        running: ranks.iter().filter_map(|r| r.sequences).max().unwrap_or(0),
        steps: e.steps,
        last_step_ms_ago: e.last_step.map(|(at, _)| at.elapsed().as_millis() as u64),
        last_step_duration_ms: e.last_step.map(|(_, took)| took.as_secs_f64() * 1e3),
        kv_used_tokens: ranks.iter().filter_map(|r| r.kv_used_tokens).max().unwrap_or(0),
        kv_capacity_tokens: ranks.iter().map(|r| r.kv_capacity_tokens).min().unwrap_or(0),
        error: e.error.clone(),
        ranks,
    }
}

/// A replica membership lists that the router does not serve with: starting,
/// incomplete (a rank missing), draining, or refused (another model).
fn unserved_view(m: &sirocco_membership::ReplicaView) -> ReplicaView {
    let state = if m.draining { State::Draining } else { State::Starting };
    ReplicaView {
        id: None,
        name: Some(m.name.clone()),
        state,
        fingerprint: m.ranks.first().map(|r| r.fingerprint.clone()).unwrap_or_default(),
        running: 0,
        steps: 0,
        last_step_ms_ago: None,
        last_step_duration_ms: None,
        kv_used_tokens: 0,
        kv_capacity_tokens: m.ranks.iter().map(|r| r.kv_capacity_tokens).min().unwrap_or(0),
        error: (!m.complete).then(|| "not every rank is registered (yet)".to_string()),
        ranks: m
            .ranks
            .iter()
            .map(|r| RankView {
                rank: r.rank,
                addr: r.addr.clone(),
                state: shard_state(r.state),
                kv_used_tokens: None,
                kv_capacity_tokens: r.kv_capacity_tokens,
                sequences: None,
                cached_blocks: None,
            })
            .collect(),
    }
}

/// `/v1/cluster`'s body.
#[derive(Debug, Serialize)]
pub(crate) struct ClusterView {
    pub(crate) time_unix_ms: u64,
    pub(crate) discovery: &'static str,
    pub(crate) etcd: Option<EtcdView>,
    pub(crate) queue: QueueView,
    pub(crate) replicas: Vec<ReplicaView>,
}

#[derive(Debug, Serialize)]
pub(crate) struct EtcdView {
    pub(crate) endpoints: Vec<String>,
    pub(crate) reachable: bool,
    pub(crate) error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct QueueView {
    pub(crate) waiting: usize,
    pub(crate) limit: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct ReplicaView {
    /// The router's id for it; none while it does not serve with it.
    pub(crate) id: Option<usize>,
    pub(crate) name: Option<String>,
    pub(crate) state: State,
    pub(crate) fingerprint: String,
    pub(crate) running: usize,
    pub(crate) steps: u64,
    pub(crate) last_step_ms_ago: Option<u64>,
    pub(crate) last_step_duration_ms: Option<f64>,
    pub(crate) kv_used_tokens: usize,
    pub(crate) kv_capacity_tokens: usize,
    pub(crate) error: Option<String>,
    pub(crate) ranks: Vec<RankView>,
}

#[derive(Debug, Serialize)]
pub(crate) struct RankView {
    pub(crate) rank: usize,
    pub(crate) addr: String,
    pub(crate) state: State,
    pub(crate) kv_used_tokens: Option<usize>,
    pub(crate) kv_capacity_tokens: usize,
    pub(crate) sequences: Option<usize>,
    pub(crate) cached_blocks: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use sirocco_membership::ShardRecord;

    fn joined(board: &ClusterBoard, id: usize, name: Option<&str>) {
        board.joined(Joined {
            id,
            name: name.map(str::to_string),
            addrs: &["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()],
            fingerprint: "fp",
            rank_capacity: &[100, 90],
        });
    }

    fn kv(used: u64, seqs: u64) -> Option<KvStats> {
        Some(KvStats {
            sequences: seqs,
            used_tokens: used,
            capacity_tokens: 100,
            cached_blocks: 3,
            ..Default::default()
        })
    }

    #[test]
    fn a_replica_goes_from_ready_to_failed_to_gone() {
        let board = ClusterBoard::new();
        assert!(board.view(0, 8).replicas.is_empty());
        joined(&board, 0, None);
        let v = board.view(2, 8);
        assert_eq!((v.discovery, v.queue.waiting, v.queue.limit), ("static", 2, 8));
        let r = &v.replicas[0];
        assert_eq!((r.state, r.steps, r.last_step_ms_ago), (State::Ready, 0, None));
        // Before any step, each rank's capacity is what it said when connected.
        assert_eq!(r.ranks[1].kv_capacity_tokens, 90);
        assert_eq!(r.kv_capacity_tokens, 90);
        assert_eq!(r.ranks[0].kv_used_tokens, None);

        board.stepped(0, Duration::from_millis(7), vec![kv(40, 2), kv(40, 2)]);
        let r = &board.view(0, 8).replicas[0];
        assert_eq!((r.steps, r.running, r.kv_used_tokens), (1, 2, 40));
        assert_eq!(r.last_step_duration_ms, Some(7.0));
        assert_eq!(r.ranks[0].cached_blocks, Some(3));

        board.failed(0, "boom".into());
        let r = &board.view(0, 8).replicas[0];
        assert_eq!((r.state, r.error.as_deref()), (State::Failed, Some("boom")));
        assert!(r.ranks.iter().all(|k| k.state == State::Failed));
        // A static replica stays listed (it is reconnected when it answers).
        board.left(0);
        assert!(board.view(0, 8).replicas.is_empty());
    }

    fn record(replica: &str, rank: usize, state: ShardState) -> (String, ShardRecord) {
        (
            format!("{replica}/{rank}"),
            ShardRecord {
                replica: replica.into(),
                rank,
                world_size: 2,
                addr: format!("127.0.0.1:{}", rank + 1),
                fingerprint: "fp".into(),
                kv_capacity_tokens: 100,
                state,
                run_id: "run".into(),
            },
        )
    }

    #[test]
    fn membership_adds_unserved_replicas_and_drops_failed_ones_it_no_longer_lists() {
        let board = ClusterBoard::new();
        let (view_tx, view) = watch::channel(MemberView::new());
        let (reach_tx, reach) = watch::channel(EtcdReach::default());
        board.follow_membership(vec!["http://127.0.0.1:2379".into()], view, reach);
        view_tx.send_replace(
            [
                record("a", 0, ShardState::Ready),
                record("a", 1, ShardState::Draining),
                record("b", 0, ShardState::Starting),
            ]
            .into_iter()
            .collect(),
        );
        joined(&board, 4, Some("a"));
        let v = board.view(0, 8);
        assert_eq!(v.discovery, "etcd");
        assert!(!v.etcd.as_ref().unwrap().reachable);
        assert_eq!(v.replicas.len(), 2);
        // Rank states come from the shards' own records.
        assert_eq!(v.replicas[0].id, Some(4));
        assert_eq!(v.replicas[0].ranks[1].state, State::Draining);
        let b = &v.replicas[1];
        assert_eq!((b.id, b.name.as_deref(), b.state), (None, Some("b"), State::Starting));
        assert!(b.error.is_some(), "rank 1 of b is missing");

        // A drained member stays listed while its keys are there.
        joined(&board, 5, Some("b"));
        board.set_state(5, State::Draining);
        board.left(5);
        let v = board.view(0, 8);
        assert_eq!((v.replicas[1].id, v.replicas[1].state), (Some(5), State::Draining));

        reach_tx.send_replace(EtcdReach {
            reachable: true,
            error: None,
        });
        board.failed(4, "rank 1 died".into());
        assert_eq!(board.view(0, 8).replicas[0].state, State::Failed);
        assert!(board.view(0, 8).etcd.unwrap().reachable);
        // Its keys expire: it is gone.
        view_tx.send_replace([record("b", 0, ShardState::Starting)].into_iter().collect());
        let v = board.view(0, 8);
        assert_eq!(v.replicas.len(), 1);
        assert_eq!(v.replicas[0].name.as_deref(), Some("b"));
        view_tx.send_replace(MemberView::new());
        assert!(board.view(0, 8).replicas.is_empty());
    }
}
