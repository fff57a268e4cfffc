//! What each replica carries and whether it is alive: the board requests are placed
//! by, and the readiness `/ready` reports. Shared by the queue, the pool and the
//! batchers; it imports none of them.

use std::time::Instant;

/// Each serving (not draining) replica's load (KV slots reserved by its running requests), so that
/// requests go to the least loaded replica.
#[derive(Default)]
pub(crate) struct LoadBoard {
    loads: std::sync::Mutex<std::collections::HashMap<usize, usize>>,
}

impl LoadBoard {
    pub(crate) fn set(&self, replica: usize, load: usize) {
        self.loads.lock().unwrap().insert(replica, load);
    }

    pub(crate) fn remove(&self, replica: usize) {
        self.loads.lock().unwrap().remove(&replica);
    }

    /// The replicas on the board: those serving and not draining.
    pub(crate) fn replicas(&self) -> Vec<usize> {
        self.loads.lock().unwrap().keys().copied().collect()
    }

    /// Whether `replica` carries no more load than any other serving replica.
    pub(crate) fn is_least_loaded(&self, replica: usize) -> bool {
        let loads = self.loads.lock().unwrap();
        let mine = loads.get(&replica).copied().unwrap_or(0);
        loads.iter().all(|(&r, &l)| r == replica || mine <= l)
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
