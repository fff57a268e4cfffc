//! Cluster membership on etcd.
//!
//! Keys, under `sirocco/<cluster>/`:
//! - `shards/<replica>/<rank>`: a [`ShardRecord`] (address, model fingerprint, KV
//!   capacity, state) under the shard's lease, so it vanishes when the shard dies.
//! - `rendezvous/<replica>`: where rank 0 of a replica listens for its peers'
//!   collective connections (also under rank 0's lease).
//!
//! [`etcd`] is a small client for etcd's v3 gRPC API; [`Registration`] keeps a
//! shard's keys alive through etcd outages; [`watch_members`] gives the router the
//! current set of shards, following every change.

pub mod etcd;
mod registration;
mod watch;

pub use etcd::Etcd;
pub use registration::Registration;
pub use watch::{replicas_from, watch_members, MemberView, ReplicaView};

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
}

/// Key prefix of every shard record of `cluster`.
pub fn shards_prefix(cluster: &str) -> String {
    format!("sirocco/{cluster}/shards/")
}

pub fn shard_key(cluster: &str, replica: &str, rank: usize) -> String {
    format!("{}{replica}/{rank}", shards_prefix(cluster))
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
