//! The prefix cache's bookkeeping over the pool's blocks: which full blocks hold
//! which content (a chain hash of their tokens and of every token before them), how
//! many sequences share each, and which unshared cached blocks to evict first.
//!
//! A block is in one of three states: in use (referenced by at least one sequence's
//! table), cached and free (registered under its hash, no references: evictable,
//! least recently used first), or plain free (on the cache's free stack). Registered
//! blocks are immutable: a sequence that would write into one writes into a copy.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

/// Content address of a full block: the first 128 bits of SHA-256 over the parent
/// block's address and this block's tokens. Collision-resistant, so that a crafted
/// prompt cannot alias another's cached keys; the same on every rank and process.
pub type BlockHash = u128;

/// The chain's start: the parent of a sequence's first block.
const ROOT: BlockHash = 0;

/// Addresses of the full blocks of `tokens`, continuing a chain at `parent`.
pub fn chain_hashes(parent: Option<BlockHash>, tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = parent.unwrap_or(ROOT);
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            parent = block_hash(parent, block);
            parent
        })
        .collect()
}

fn block_hash(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(parent.to_le_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let d = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&d[..16]);
    u128::from_le_bytes(first)
}

/// Where a sequence's token chain stands: the address of its last full block and
/// the tokens of the block it is filling.
#[derive(Clone, Debug, Default)]
pub(super) struct Chain {
    pub(super) parent: Option<BlockHash>,
    pub(super) pending: Vec<u32>,
}

impl Chain {
    /// Appends `tokens`; returns `(index of the block in the sequence, address)` of
    /// every block they complete.
    pub(super) fn extend(
        &mut self,
        first_position: usize,
        tokens: &[u32],
        block_size: usize,
    ) -> Vec<(usize, BlockHash)> {
        let mut done = Vec::new();
        let mut position = first_position;
        for &t in tokens {
            self.pending.push(t);
            position += 1;
            if self.pending.len() == block_size {
                let h = block_hash(self.parent.unwrap_or(ROOT), &self.pending);
                self.parent = Some(h);
                self.pending.clear();
                done.push((position / block_size - 1, h));
            }
        }
        done
    }
}

#[derive(Clone, Debug, Default)]
struct BlockMeta {
    /// Sequences whose tables hold this block.
    refs: u32,
    /// Set while the block is registered in the cache (and immutable).
    hash: Option<BlockHash>,
    /// When it was last released, for LRU eviction.
    last_used: u64,
    /// Its index in the chain it was cached from: deeper blocks of a chain are
    /// evicted before shallower ones released at the same time (they are useful only
    /// with them).
    depth: u32,
}

/// Per-block reference counts and the hash index of cached blocks.
#[derive(Default)]
pub(super) struct BlockIndex {
    meta: Vec<BlockMeta>,
    by_hash: HashMap<BlockHash, u32>,
    /// Cached blocks no sequence holds, oldest release first.
    evictable: BTreeSet<(u64, Reverse<u32>, u32)>,
    tick: u64,
    evicted: u64,
}

impl BlockIndex {
    /// Tracks `n` more pool blocks (all free).
    pub(super) fn grow(&mut self, n: usize) {
        self.meta.resize(self.meta.len() + n, BlockMeta::default());
    }

    /// The cached block holding `hash`, if any.
    pub(super) fn lookup(&self, hash: &BlockHash) -> Option<u32> {
        self.by_hash.get(hash).copied()
    }

    /// One more sequence holds `block` (a fresh one, or a cached one it shares).
    pub(super) fn acquire(&mut self, block: u32) {
        let m = &mut self.meta[block as usize];
        if m.refs == 0 && m.hash.is_some() {
            self.evictable.remove(&(m.last_used, Reverse(m.depth), block));
        }
        m.refs += 1;
    }

    /// A sequence let go of `block`; returns true when it is now plain free (for the
    /// free stack), false when still held or kept cached.
    pub(super) fn release(&mut self, block: u32) -> bool {
        self.tick += 1;
        let m = &mut self.meta[block as usize];
        m.refs = m.refs.saturating_sub(1);
        if m.refs > 0 {
            return false;
        }
        if m.hash.is_some() {
            m.last_used = self.tick;
            self.evictable.insert((m.last_used, Reverse(m.depth), block));
            false
        } else {
            true
        }
    }

    /// Whether a sequence may write into `block`: it alone holds it and it is not
    /// cached.
    pub(super) fn is_private(&self, block: u32) -> bool {
        let m = &self.meta[block as usize];
        m.refs <= 1 && m.hash.is_none()
    }

    pub(super) fn refs(&self, block: u32) -> u32 {
        self.meta[block as usize].refs
    }

    /// Caches `block` (full, written, held by one sequence) under `hash`, unless
    /// another block already holds that content; returns whether it did.
    pub(super) fn register(&mut self, block: u32, hash: BlockHash, depth: usize) -> bool {
        if self.by_hash.contains_key(&hash) || !self.is_private(block) {
            return false;
        }
        let m = &mut self.meta[block as usize];
        m.hash = Some(hash);
        m.depth = depth as u32;
        self.by_hash.insert(hash, block);
        true
    }

    /// Drops `block` (held by the one sequence about to overwrite it) from the cache.
    pub(super) fn unregister(&mut self, block: u32) {
        if let Some(h) = self.meta[block as usize].hash.take() {
            self.by_hash.remove(&h);
        }
    }

    /// Evicts the least recently used unheld cached block; returns it, now plain free.
    pub(super) fn evict(&mut self) -> Option<u32> {
        let (_, _, block) = self.evictable.pop_first()?;
        self.unregister(block);
        self.evicted += 1;
        Some(block)
    }

    /// Cached blocks nobody holds.
    pub(super) fn evictable(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks registered in the cache (held or not).
    pub(super) fn cached(&self) -> usize {
        self.by_hash.len()
    }

    pub(super) fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_s_address_depends_on_everything_before_it() {
        let a = chain_hashes(None, &[1, 2, 3, 4, 5, 6], 2);
        let b = chain_hashes(None, &[9, 2, 3, 4, 5, 6], 2);
        assert_eq!(a.len(), 3);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[2], b[2], "same tokens after a different start");
        // Continuing a chain gives what hashing the whole run gives.
        let tail = chain_hashes(Some(a[0]), &[3, 4, 5, 6, 7], 2);
        assert_eq!(tail, a[1..]);
        let mut chain = Chain::default();
        let mut done = chain.extend(0, &[1, 2, 3], 2);
        done.extend(chain.extend(3, &[4, 5, 6], 2));
        assert_eq!(done, vec![(0, a[0]), (1, a[1]), (2, a[2])]);
    }

    #[test]
    fn unheld_cached_blocks_are_evicted_least_recently_used_first() {
        let mut idx = BlockIndex::default();
        idx.grow(4);
        for b in 0..3 {
            idx.acquire(b);
            assert!(idx.register(b, 100 + b as u128, b as usize));
        }
        assert!(!idx.register(3, 100, 0), "content already cached elsewhere");
        assert!(!idx.release(1));
        assert!(!idx.release(0));
        assert_eq!(idx.evictable(), 2);
        assert_eq!(idx.evict(), Some(1));
        assert_eq!(idx.lookup(&101), None);
        // Shared again: no longer evictable.
        idx.acquire(0);
        assert_eq!(idx.evict(), None);
        assert_eq!((idx.cached(), idx.evicted()), (2, 1));
        // A private block is freed at once.
        idx.acquire(3);
        assert!(idx.release(3));
    }
}
