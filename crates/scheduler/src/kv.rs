//! KV cache geometry as the shards allocate it, for admission.

/// One rank's KV pool as a scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    /// Slots (positions) the pool holds.
    pub capacity_tokens: usize,
    /// Slots are allocated in blocks of this many.
    pub block_size: usize,
    /// Positions one sequence holds at most: the sliding window, or the context.
    pub positions_per_seq: usize,
}

impl KvGeometry {
    /// Slots a sequence of `len` positions takes: at most one window (the cache is a
    /// rolling buffer), in whole blocks, exactly as the shards' caches allocate them.
    pub fn slots_needed(&self, len: usize) -> usize {
        let held = len.min(self.positions_per_seq);
        (held.div_ceil(self.block_size) * self.block_size).min(self.positions_per_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_holds_whole_blocks_up_to_one_window() {
        let kv = KvGeometry {
            capacity_tokens: 1000,
            block_size: 16,
            positions_per_seq: 40,
        };
        assert_eq!(kv.slots_needed(1), 16);
        assert_eq!(kv.slots_needed(16), 16);
        assert_eq!(kv.slots_needed(17), 32);
        // The window is the most a sequence holds, even past a block boundary.
        assert_eq!(kv.slots_needed(33), 40);
        assert_eq!(kv.slots_needed(10_000), 40);
    }
}
