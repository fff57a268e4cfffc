//! What each replica carries and whether it is alive: the board requests are placed
//! by, and the readiness `/ready` reports. Shared by the queue, the pool and the
//! batchers; it imports none of them.

use sirocco_scheduler::{pick_replica, Candidate, PrefixIndex};
use std::collections::HashMap;
use std::time::Instant;

/// Each serving (not draining) replica's load, and what its prefix cache likely
/// holds: the board that decides which replica takes a request.
#[derive(Default)]
pub(crate) struct LoadBoard {
    replicas: std::sync::Mutex<HashMap<usize, ReplicaLoad>>,
}

#[derive(Default)]
struct ReplicaLoad {
    /// KV slots reserved by its running requests.
    kv: usize,
    sequences: usize,
    has_room: bool,
    /// Inputs sent there (created with the replica's first admission).
    prefixes: Option<PrefixIndex>,
}

/// How cache-aware routing sizes a replica's [`PrefixIndex`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexSize {
    pub(crate) block_size: usize,
    pub(crate) capacity_blocks: usize,
}

impl LoadBoard {
    /// What `replica` carries now, and whether its batch has a free slot.
    pub(crate) fn set(&self, replica: usize, kv: usize, sequences: usize, has_room: bool) {
        let mut r = self.replicas.lock().unwrap();
        let load = r.entry(replica).or_default();
        load.kv = kv;
        load.sequences = sequences;
        load.has_room = has_room;
    }

    /// Takes `replica` off the board; its prefix index goes with it (a replica that
    /// comes back starts cold).
    pub(crate) fn remove(&self, replica: usize) {
        self.replicas.lock().unwrap().remove(&replica);
    }

    /// The replicas on the board: those serving and not draining.
    pub(crate) fn replicas(&self) -> Vec<usize> {
        self.replicas.lock().unwrap().keys().copied().collect()
    }

    /// Whether `replica` should take a request with `input`: with `cache_aware`,
    /// the replica with the longest cached match within `imbalance` sequences of the
    /// least busy ([`pick_replica`]); otherwise the least KV-loaded one.
    pub(crate) fn takes(&self, replica: usize, input: &[u32], cache_aware: bool, imbalance: usize) -> bool {
        let r = self.replicas.lock().unwrap();
        let candidates: Vec<Candidate> = r
            .iter()
            .map(|(&id, l)| Candidate {
                replica: id,
                sequences: l.sequences,
                kv_load: l.kv,
                has_room: l.has_room,
                matched: match (&l.prefixes, cache_aware) {
                    (Some(p), true) => p.matched(input),
                    _ => 0,
                },
            })
            .collect();
        match pick_replica(&candidates, if cache_aware { imbalance } else { usize::MAX }) {
            Some(best) => best == replica || !r.contains_key(&replica),
            None => true,
        }
    }

    /// Remembers that `input` went to `replica`.
    pub(crate) fn remember(&self, replica: usize, input: &[u32], size: IndexSize) {
        if let Some(l) = self.replicas.lock().unwrap().get_mut(&replica) {
            l.prefixes
                .get_or_insert_with(|| PrefixIndex::new(size.block_size, size.capacity_blocks))
                .insert(input);
        }
    }
}

/// When each replica last completed a step (a real one or an idle canary): a replica
/// is ready while that is recent.
pub(crate) struct Readiness {
    last_ok: std::sync::Mutex<std::collections::HashMap<usize, Instant>>,
    pub(crate) window: std::time::Duration,
}

impl Readiness {
    pub(crate) fn new(window: std::time::Duration) -> Self {
        Readiness {
            last_ok: Default::default(),
            window,
        }
    }

    pub(crate) fn ok(&self, replica: usize) {
        self.last_ok.lock().unwrap().insert(replica, Instant::now());
    }

    pub(crate) fn remove(&self, replica: usize) {
        self.last_ok.lock().unwrap().remove(&replica);
    }

    /// Replicas that completed a step within the window.
    pub(crate) fn ready_count(&self) -> usize {
        self.last_ok
            .lock()
            .unwrap()
            .values()
            .filter(|t| t.elapsed() <= self.window)
            .count()
    }
}
