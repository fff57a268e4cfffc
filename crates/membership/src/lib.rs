//! Cluster membership on etcd.
//!
//! Keys, under `sirocco/<cluster>/`:
//! - `shards/<replica>/<rank>`: a [`ShardRecord`] (address, model fingerprint, KV
//!   capacity, state) under the shard's lease, so it vanishes when the shard dies.
//! - `rendezvous/<replica>`: a [`Rendezvous`] from rank 0 of a replica telling its
//!   peers how to join the collective: the address it listens on (CPU), or the NCCL
//!   unique id (GPU). Under rank 0's lease, so a restarted rank 0 publishes afresh.
//!
//! Every rendezvous and record carries the replica's run id: one per start of a
//! replica's processes (`serve` gives each start its own). A key that a dead run left
//! behind (its lease not yet expired) has another run id, so a new run's ranks never
//! try to join it, and the router never takes ranks of two runs for one replica.
//!
//! [`etcd`] is a small client for etcd's v3 gRPC API; [`Registration`] keeps a
//! shard's keys alive through etcd outages; [`watch_members`] gives the router the
//! current set of shards, following every change.

pub mod etcd;
mod registration;
mod watch;

pub use etcd::Etcd;
pub use registration::Registration;
pub use watch::{replicas_from, watch_members, EtcdReach, MemberView, Membership, ReplicaView};

use serde::{Deserialize, Serialize};

/// A shard's lifecycle as the router sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    Starting,
    Ready,
    Draining,
}

/// What a shard publishes about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub replica: String,
    pub rank: usize,
    pub world_size: usize,
    /// The shard's internal gRPC address.
    pub addr: String,
    pub fingerprint: String,
    pub kv_capacity_tokens: usize,
    pub state: ShardState,
    /// The run of the replica this shard joined (rank 0's run id).
    #[serde(default)]
    pub run_id: String,
}

/// Key prefix of every shard record of `cluster`.
pub fn shards_prefix(cluster: &str) -> String {
    format!("sirocco/{cluster}/shards/")
}

pub fn shard_key(cluster: &str, replica: &str, rank: usize) -> String {
    format!("{}{replica}/{rank}", shards_prefix(cluster))
}

/// How the ranks of a replica meet, as rank 0 publishes it under [`rendezvous_key`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "collective", rename_all = "snake_case")]
pub enum Rendezvous {
    /// Connect to rank 0's TCP collective at `addr`.
    Tcp {
        addr: String,
        #[serde(default)]
        run_id: String,
    },
    /// Join NCCL with this unique id (hex of its 128 bytes).
    Nccl {
        id: String,
        #[serde(default)]
        run_id: String,
    },
}

impl Rendezvous {
    /// The run of the rank 0 that published it.
    pub fn run_id(&self) -> &str {
        match self {
            Rendezvous::Tcp { run_id, .. } | Rendezvous::Nccl { run_id, .. } => run_id,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("rendezvous serializes")
    }

    /// Parses a published value; a bare address (what older shards wrote) means TCP.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        serde_json::from_slice(b).ok().or_else(|| {
            let s = std::str::from_utf8(b).ok()?.trim();
            (!s.is_empty() && !s.starts_with('{')).then(|| Rendezvous::Tcp {
                addr: s.to_string(),
                run_id: String::new(),
            })
        })
    }
}

pub fn rendezvous_key(cluster: &str, replica: &str) -> String {
    format!("sirocco/{cluster}/rendezvous/{replica}")
}

/// Splits a comma-separated `--etcd` value into endpoint URLs.
pub fn parse_endpoints(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.contains("://") {
                e.to_string()
            } else {
                format!("http://{e}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_round_trips_and_reads_bare_addresses() {
        for r in [
            Rendezvous::Tcp {
                addr: "10.0.0.7:4100".into(),
                run_id: "run-a".into(),
            },
            Rendezvous::Nccl {
                id: "00ff".repeat(64),
                run_id: String::new(),
            },
        ] {
            assert_eq!(Rendezvous::from_bytes(&r.to_bytes()), Some(r));
        }
        assert_eq!(
            Rendezvous::from_bytes(b"127.0.0.1:9"),
            Some(Rendezvous::Tcp {
                addr: "127.0.0.1:9".into(),
                run_id: String::new(),
            })
        );
        assert_eq!(Rendezvous::from_bytes(b"{\"collective\":\"carrier-pigeon\"}"), None);
        assert_eq!(Rendezvous::from_bytes(b""), None);
    }
}
