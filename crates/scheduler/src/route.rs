//! Which replica takes a request: the one that has most of its prefix cached, unless
//! it is much busier than the least busy one (then, as without a cache, the least
//! loaded). The router keeps a [`PrefixIndex`] per replica of the inputs it sent
//! there: an approximation of what that replica's prefix cache holds, bounded in
//! memory, forgotten when the replica goes.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// The input blocks sent to one replica recently: chain hashes of full blocks (each
/// covers its tokens and all before them), least recently sent forgotten first.
#[derive(Debug)]
pub struct PrefixIndex {
    block_size: usize,
    capacity_blocks: usize,
    last_sent: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
    tick: u64,
}

impl PrefixIndex {
    /// Remembers at most `capacity_blocks` blocks of `block_size` tokens.
    pub fn new(block_size: usize, capacity_blocks: usize) -> Self {
        PrefixIndex {
            block_size: block_size.max(1),
            capacity_blocks: capacity_blocks.max(1),
            last_sent: HashMap::new(),
            by_age: BTreeMap::new(),
            tick: 0,
        }
    }

    fn hashes(&self, tokens: &[u32]) -> Vec<u64> {
        let mut parent = 0u64;
        tokens
            .chunks_exact(self.block_size)
            .map(|block| {
                // Fixed keys: the same input always maps to the same blocks.
                let mut h = std::collections::hash_map::DefaultHasher::new();
                parent.hash(&mut h);
                block.hash(&mut h);
                parent = h.finish();
                parent
            })
            .collect()
    }

    /// Records that `tokens` went to this replica.
    pub fn insert(&mut self, tokens: &[u32]) {
        for h in self.hashes(tokens) {
            self.tick += 1;
            if let Some(old) = self.last_sent.insert(h, self.tick) {
                self.by_age.remove(&old);
            }
            self.by_age.insert(self.tick, h);
        }
        while self.last_sent.len() > self.capacity_blocks {
            let Some((_, h)) = self.by_age.pop_first() else { break };
            self.last_sent.remove(&h);
        }
    }

    /// Leading tokens of `tokens` in blocks this replica was sent.
    pub fn matched(&self, tokens: &[u32]) -> usize {
        let blocks = self
            .hashes(tokens)
            .iter()
            .take_while(|h| self.last_sent.contains_key(h))
            .count();
        blocks * self.block_size
    }

    /// Blocks remembered.
    pub fn len(&self) -> usize {
        self.last_sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_sent.is_empty()
    }
}

/// One candidate replica, as the router sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub replica: usize,
    /// Sequences it runs.
    pub sequences: usize,
    /// KV slots its running sequences reserve.
    pub kv_load: usize,
    /// Leading input tokens its prefix index holds.
    pub matched: usize,
    /// Whether its batch has a free slot.
    pub has_room: bool,
}

/// The replica a request should go to: among those with a free batch slot (if any
/// has one: a request does not wait for a full replica while another has room), the
/// longest match among the replicas that run at most `imbalance` more sequences than
/// the least busy one; with no match anywhere (or a tie), the least KV-loaded; then
/// the lowest id. `None` only when there is no candidate.
pub fn pick_replica(candidates: &[Candidate], imbalance: usize) -> Option<usize> {
    let any_room = candidates.iter().any(|c| c.has_room);
    let open = || candidates.iter().filter(move |c| c.has_room || !any_room);
    let least_busy = open().map(|c| c.sequences).min()?;
    open()
        .filter(|c| c.sequences <= least_busy.saturating_add(imbalance))
        .min_by_key(|c| (std::cmp::Reverse(c.matched), c.kv_load, c.replica))
        .map(|c| c.replica)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_matches_leading_whole_blocks_and_forgets_the_oldest() {
        let mut idx = PrefixIndex::new(4, 3);
        idx.insert(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.matched(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]), 8);
        assert_eq!(idx.matched(&[1, 2, 3, 4, 5, 6, 7, 0]), 4);
        assert_eq!(
            idx.matched(&[0, 2, 3, 4, 5, 6, 7, 8]),
            0,
            "a block counts only after its parents"
        );
        idx.insert(&[9, 9, 9, 9, 8, 8, 8, 8]);
        // Bounded: the oldest block went first, and with it what followed it.
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.matched(&[1, 2, 3, 4, 5, 6, 7, 8]), 0);
        assert_eq!(idx.matched(&[9, 9, 9, 9, 8, 8, 8, 8]), 8);
    }

    fn c(replica: usize, sequences: usize, kv_load: usize, matched: usize) -> Candidate {
        Candidate {
            replica,
            sequences,
            kv_load,
            matched,
            has_room: true,
        }
    }

    #[test]
    fn the_warm_replica_wins_unless_it_is_much_busier() {
        let warm = c(0, 6, 600, 1024);
        let cold = c(1, 2, 200, 0);
        assert_eq!(pick_replica(&[warm, cold], 4), Some(0));
        assert_eq!(pick_replica(&[warm, cold], 3), Some(1), "over the imbalance threshold");
        // No match anywhere: the least loaded, as without a cache.
        assert_eq!(pick_replica(&[c(0, 2, 300, 0), c(1, 2, 100, 0)], 4), Some(1));
        // Equal matches: the least loaded; equal loads: the lowest id.
        assert_eq!(pick_replica(&[c(0, 1, 100, 64), c(1, 1, 50, 64)], 4), Some(1));
        assert_eq!(pick_replica(&[c(1, 1, 50, 64), c(0, 1, 50, 64)], 4), Some(0));
        assert_eq!(pick_replica(&[], 4), None);
        // A full replica is passed over while another has room, however warm.
        let full = Candidate {
            has_room: false,
            ..warm
        };
        assert_eq!(pick_replica(&[full, cold], 4), Some(1));
        assert_eq!(pick_replica(&[full], 4), Some(0), "all full: wait for the best");
    }
}
