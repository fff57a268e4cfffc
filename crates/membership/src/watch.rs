//! The router's view of the cluster: every shard record under the cluster's prefix,
//! kept current by an etcd watch. If etcd is unreachable the last view stands, and
//! the watch is re-established (with a full re-read) when etcd is back.

use crate::etcd::Etcd;
use crate::{shards_prefix, ShardRecord, ShardState};
use sirocco_proto::etcd::event::EventType;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;

/// Every shard record, by key.
pub type MemberView = BTreeMap<String, ShardRecord>;

/// A replica as membership shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaView {
    pub name: String,
    /// Records by rank (only complete replicas have every rank).
    pub ranks: Vec<ShardRecord>,
    /// Every rank is registered with the same world size and model.
    pub complete: bool,
    /// Complete, and every rank says ready.
    pub ready: bool,
    /// Some rank is draining.
    pub draining: bool,
}

/// Groups shard records into replicas.
pub fn replicas_from(view: &MemberView) -> BTreeMap<String, ReplicaView> {
    let mut by_replica: BTreeMap<String, Vec<ShardRecord>> = BTreeMap::new();
    for r in view.values() {
        by_replica.entry(r.replica.clone()).or_default().push(r.clone());
    }
    by_replica
        .into_iter()
        .map(|(name, mut ranks)| {
            ranks.sort_by_key(|r| r.rank);
            let world = ranks[0].world_size;
            // Ranks of two runs (a dead run's keys outliving it) are no replica.
            let complete = ranks.len() == world
                && ranks.iter().enumerate().all(|(i, r)| {
                    r.rank == i
                        && r.world_size == world
                        && r.fingerprint == ranks[0].fingerprint
                        && r.run_id == ranks[0].run_id
                });
            let draining = ranks.iter().any(|r| r.state == ShardState::Draining);
            let ready = complete && ranks.iter().all(|r| r.state == ShardState::Ready);
            (
                name.clone(),
                ReplicaView {
                    name,
                    ranks,
                    complete,
                    ready,
                    draining,
                },
            )
        })
        .collect()
}

/// Whether the router's last call to etcd got an answer, and if not, why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdReach {
    pub reachable: bool,
    /// The last failure, while etcd is unreachable.
    pub error: Option<String>,
}

/// The router's view of membership: the latest shard records, and whether etcd
/// answers (the records stand while it does not).
pub struct Membership {
    pub view: watch::Receiver<MemberView>,
    pub reach: watch::Receiver<EtcdReach>,
}

/// Starts following the shards of `cluster`; the receivers always hold the latest
/// view and etcd's reachability.
pub fn watch_members(etcd: Etcd, cluster: &str) -> Membership {
    let (tx, rx) = watch::channel(MemberView::new());
    let (reach_tx, reach) = watch::channel(EtcdReach::default());
    let prefix = shards_prefix(cluster);
    tokio::spawn(async move {
        let mut unreachable = false;
        loop {
            match follow(&etcd, &prefix, &tx, &reach_tx).await {
                Ok(()) => return, // nobody listens any more
                Err(e) => {
                    let error = format!("{e:#}");
                    if !unreachable {
                        tracing::warn!(%error, "etcd watch lost; keeping the last membership and retrying");
                        unreachable = true;
                    }
                    reach_tx.send_replace(EtcdReach {
                        reachable: false,
                        error: Some(error),
                    });
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Membership { view: rx, reach }
}

fn parse(key: &str, value: &[u8]) -> Option<ShardRecord> {
    match serde_json::from_slice(value) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(key, error = %e, "ignoring an unreadable shard record");
            None
        }
    }
}

/// Reads the prefix, then applies watch events until the watch breaks.
async fn follow(
    etcd: &Etcd,
    prefix: &str,
    tx: &watch::Sender<MemberView>,
    reach: &watch::Sender<EtcdReach>,
) -> anyhow::Result<()> {
    let answered = || {
        reach.send_if_modified(|r| {
            let was = r.reachable;
            *r = EtcdReach {
                reachable: true,
                error: None,
            };
            !was
        });
    };
    let (rev, kvs) = etcd.get_prefix(prefix).await?;
    answered();
    let mut view: MemberView = kvs
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), parse(k, v)?)))
        .collect();
    tracing::info!(shards = view.len(), revision = rev, "membership read from etcd");
    if tx.send(view.clone()).is_err() {
        return Ok(());
    }
    let mut w = etcd.watch_prefix(prefix, rev + 1).await?;
    loop {
        // A quiet watch is normal; a quiet etcd that does not answer either is gone
        // (a stopped process keeps its connections open).
        let msg = tokio::time::timeout(Duration::from_secs(5), w.events.message()).await;
        let resp = match msg {
            Ok(Ok(Some(r))) => {
                answered();
                r
            }
            Ok(Ok(None)) => anyhow::bail!("etcd closed the watch"),
            Ok(Err(s)) => anyhow::bail!("etcd watch: {}", s.message()),
            Err(_) => {
                etcd.get(prefix).await?;
                answered();
                continue;
            }
        };
        if resp.canceled {
            anyhow::bail!("etcd cancelled the watch: {}", resp.cancel_reason);
        }
        if resp.events.is_empty() {
            continue;
        }
        for ev in resp.events {
            let Some(kv) = ev.kv else { continue };
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            if ev.r#type == EventType::Delete as i32 {
                view.remove(&key);
            } else if let Some(r) = parse(&key, &kv.value) {
                view.insert(key, r);
            }
        }
        if tx.send(view.clone()).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(replica: &str, rank: usize, run_id: &str) -> ShardRecord {
        ShardRecord {
            replica: replica.into(),
            rank,
            world_size: 2,
            addr: format!("127.0.0.1:{}", 7000 + rank),
            fingerprint: "f".into(),
            kv_capacity_tokens: 64,
            state: ShardState::Ready,
            run_id: run_id.into(),
        }
    }

    fn view(records: &[ShardRecord]) -> MemberView {
        records
            .iter()
            .map(|r| (crate::shard_key("c", &r.replica, r.rank), r.clone()))
            .collect()
    }

    #[test]
    fn ranks_of_one_run_make_a_ready_replica() {
        let reps = replicas_from(&view(&[record("a", 0, "run-2"), record("a", 1, "run-2")]));
        assert!(reps["a"].complete && reps["a"].ready);
    }

    #[test]
    fn a_dead_runs_record_beside_a_new_one_is_no_replica() {
        let reps = replicas_from(&view(&[record("a", 0, "run-2"), record("a", 1, "run-1")]));
        assert!(!reps["a"].complete);
        assert!(!reps["a"].ready);
    }

    #[test]
    fn a_missing_rank_is_no_replica() {
        let reps = replicas_from(&view(&[record("a", 1, "run-2")]));
        assert!(!reps["a"].complete);
    }
}
