//! One rank's KV cache: for each sequence, the keys and values of that rank's KV
//! heads, in a rolling buffer of at most `window` positions (position p lives in slot
//! p mod window), allocated in fixed-size blocks as the sequence grows.
//!
//! With no sliding window the buffer is as long as the model's context, so nothing
//! ever wraps. Capacity is counted in token slots, so the numbers reported here are
//! exact: a sequence holds `min(len, window)` positions, and its blocks cover no more
//! than that.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Identifies a sequence across the ranks of a replica.
pub type SeqId = u64;

/// Shape and budget of a rank's cache.
#[derive(Clone, Debug)]
pub struct KvCacheConfig {
    pub layers: usize,
    /// KV heads held by this rank.
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub device: Device,
    /// Slots per block (the last block of a window may be shorter).
    pub block_size: usize,
    /// Slots one sequence may hold: the sliding window, or the whole context.
    pub positions_per_seq: usize,
    /// Longest sequence accepted (positions are numbered below this).
    pub max_context: usize,
    /// Slots all sequences together may hold.
    pub capacity_tokens: usize,
}

impl KvCacheConfig {
    /// Bytes one token slot takes: keys and values of every layer.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
}

struct Block {
    slots: usize,
    /// Per layer: `[slots, kv_heads, head_dim]`.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

#[derive(Default)]
struct SeqKv {
    /// Positions already written: the next token is at position `len`.
    len: usize,
    blocks: Vec<Block>,
    /// Slots allocated to this sequence.
    slots: usize,
}

/// What the cache holds, for admission control and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvStats {
    pub sequences: usize,
    /// Positions held (sum over sequences of min(len, window)).
    pub used_tokens: usize,
    /// Slots allocated in blocks (>= used_tokens; the rest is the tails of blocks).
    pub allocated_tokens: usize,
    pub capacity_tokens: usize,
    pub allocated_bytes: usize,
    pub capacity_bytes: usize,
    pub blocks: usize,
    /// Sequences longer than their window (their oldest positions were overwritten).
    pub wrapped_sequences: usize,
}

pub struct KvCache {
    cfg: KvCacheConfig,
    seqs: HashMap<SeqId, SeqKv>,
    allocated: usize,
}

impl KvCache {
    pub fn new(cfg: KvCacheConfig) -> Self {
        assert!(cfg.block_size > 0 && cfg.positions_per_seq > 0);
        KvCache {
            cfg,
            seqs: HashMap::new(),
            allocated: 0,
        }
    }

    pub fn config(&self) -> &KvCacheConfig {
        &self.cfg
    }

    /// Positions processed so far for `seq` (0 for an unknown sequence).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    /// Positions `seq` holds now: min(len, window).
    pub fn seq_tokens(&self, seq: SeqId) -> usize {
        self.seq_len(seq).min(self.cfg.positions_per_seq)
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Slots `seq` would need allocated after `new_tokens` more positions.
    fn slots_needed(&self, len_after: usize) -> usize {
        len_after.min(self.cfg.positions_per_seq)
    }

    /// Additional slots needed to append these chunks (for admission checks).
    pub fn extra_slots(&self, seq: SeqId, new_tokens: usize) -> usize {
        let cur = self.seqs.get(&seq).map_or(0, |s| s.slots);
        let want = self.slots_needed(self.seq_len(seq) + new_tokens);
        self.block_aligned(want).saturating_sub(cur)
    }

    /// Slots covered by the blocks that hold `slots` positions.
    fn block_aligned(&self, slots: usize) -> usize {
        let b = self.cfg.block_size;
        (slots.div_ceil(b) * b).min(self.cfg.positions_per_seq)
    }

    /// Makes room for `new_tokens` more positions of `seq`, creating it if new.
    /// Fails, changing nothing, when the context or the cache's capacity is exceeded.
    pub fn reserve(&mut self, seq: SeqId, new_tokens: usize) -> Result<()> {
        let len = self.seq_len(seq);
        if len + new_tokens > self.cfg.max_context {
            bail!(
                "sequence {seq} would reach {} positions, over the model's context limit of {}",
                len + new_tokens,
                self.cfg.max_context
            );
        }
        let extra = self.extra_slots(seq, new_tokens);
        if self.allocated + extra > self.cfg.capacity_tokens {
            bail!(
                "KV cache full: sequence {seq} needs {extra} more token slots, {} of {} are free",
                self.cfg.capacity_tokens - self.allocated,
                self.cfg.capacity_tokens
            );
        }
        let want = self.block_aligned(self.slots_needed(len + new_tokens));
        let (bs, cap, layers) = (self.cfg.block_size, self.cfg.positions_per_seq, self.cfg.layers);
        let shape_of = |slots: usize| (slots, self.cfg.kv_heads, self.cfg.head_dim);
        let mut new_blocks = Vec::new();
        let mut have = self.seqs.get(&seq).map_or(0, |s| s.slots);
        while have < want {
            let slots = bs.min(cap - have);
            let zeros = || Tensor::zeros(shape_of(slots), self.cfg.dtype, &self.cfg.device);
            new_blocks.push(Block {
                slots,
                k: (0..layers).map(|_| zeros()).collect::<candle_core::Result<_>>()?,
                v: (0..layers).map(|_| zeros()).collect::<candle_core::Result<_>>()?,
            });
            have += slots;
        }
        let s = self.seqs.entry(seq).or_default();
        s.blocks.extend(new_blocks);
        self.allocated += have - s.slots;
        s.slots = have;
        Ok(())
    }

    /// Keys and values held for `seq` at `layer`, in slot order, with the position
    /// each slot holds; `None` for a sequence with nothing cached yet.
    pub fn read(&self, seq: SeqId, layer: usize) -> Result<Option<(Tensor, Tensor, Vec<usize>)>> {
        let Some(s) = self.seqs.get(&seq) else { return Ok(None) };
        let held = s.len.min(self.cfg.positions_per_seq);
        if held == 0 {
            return Ok(None);
        }
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut left = held;
        for b in &s.blocks {
            if left == 0 {
                break;
            }
            let n = b.slots.min(left);
            ks.push(b.k[layer].narrow(0, 0, n)?);
            vs.push(b.v[layer].narrow(0, 0, n)?);
            left -= n;
        }
        let k = Tensor::cat(&ks, 0)?;
        let v = Tensor::cat(&vs, 0)?;
        let w = self.cfg.positions_per_seq;
        let mut positions = vec![0; held];
        for p in s.len - held..s.len {
            positions[p % w] = p;
        }
        Ok(Some((k, v, positions)))
    }

    /// Writes keys and values `[n, kv_heads, head_dim]` for positions `len..len+n`
    /// of `seq` at `layer`. Positions older than the window are skipped: they would be
    /// overwritten within the same chunk. Call [`KvCache::advance`] once every layer
    /// has been written.
    pub fn write(&mut self, seq: SeqId, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (bs, w) = (self.cfg.block_size, self.cfg.positions_per_seq);
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or_else(|| anyhow::anyhow!("sequence {seq} has no KV cache reserved"))?;
        let n = k.dim(0)?;
        let skip = n.saturating_sub(w);
        let mut i = skip;
        while i < n {
            let p = s.len + i;
            let slot = p % w;
            let (bi, off) = (slot / bs, slot % bs);
            let block = &s.blocks[bi];
            // A run stays inside one block and does not wrap.
            let run = (n - i).min(block.slots - off);
            block.k[layer].slice_set(&k.narrow(0, i, run)?.contiguous()?, 0, off)?;
            block.v[layer].slice_set(&v.narrow(0, i, run)?.contiguous()?, 0, off)?;
            i += run;
        }
        Ok(())
    }

    /// Marks `n` more positions of `seq` as written.
    pub fn advance(&mut self, seq: SeqId, n: usize) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.len += n;
        }
    }

    /// Frees everything `seq` holds. Unknown sequences are ignored.
    pub fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.allocated -= s.slots;
        }
    }

    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    pub fn stats(&self) -> KvStats {
        let bpt = self.cfg.bytes_per_token();
        KvStats {
            sequences: self.seqs.len(),
            used_tokens: self.seqs.values().map(|s| s.len.min(self.cfg.positions_per_seq)).sum(),
            allocated_tokens: self.allocated,
            capacity_tokens: self.cfg.capacity_tokens,
            allocated_bytes: self.allocated * bpt,
            capacity_bytes: self.cfg.capacity_tokens * bpt,
            blocks: self.seqs.values().map(|s| s.blocks.len()).sum(),
            wrapped_sequences: self
                .seqs
                .values()
                .filter(|s| s.len > self.cfg.positions_per_seq)
                .count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(block: usize, window: usize, capacity: usize) -> KvCache {
        KvCache::new(KvCacheConfig {
            layers: 2,
            kv_heads: 1,
            head_dim: 2,
            dtype: DType::F32,
            device: Device::Cpu,
            block_size: block,
            positions_per_seq: window,
            max_context: 1000,
            capacity_tokens: capacity,
        })
    }

    fn kv(start: usize, n: usize) -> Tensor {
        let data: Vec<f32> = (start..start + n).flat_map(|p| [p as f32, -(p as f32)]).collect();
        Tensor::from_vec(data, (n, 1, 2), &Device::Cpu).unwrap()
    }

    fn append(c: &mut KvCache, seq: SeqId, n: usize) {
        let start = c.seq_len(seq);
        c.reserve(seq, n).unwrap();
        for layer in 0..2 {
            c.write(seq, layer, &kv(start, n), &kv(start, n)).unwrap();
        }
        c.advance(seq, n);
    }

    #[test]
    fn rolling_buffer_keeps_the_last_window_positions() {
        for chunk in [1, 3, 7, 10, 25] {
            let mut c = cache(3, 7, 100);
            while c.seq_len(1) < 60 {
                append(&mut c, 1, chunk);
                let (k, _, pos) = c.read(1, 1).unwrap().unwrap();
                let len = c.seq_len(1);
                let held = len.min(7);
                let mut sorted = pos.clone();
                sorted.sort();
                assert_eq!(sorted, (len - held..len).collect::<Vec<_>>(), "chunk {chunk}");
                // Each slot holds exactly the key written for its position.
                let k = k.to_vec3::<f32>().unwrap();
                for (slot, p) in pos.iter().enumerate() {
                    assert_eq!(k[slot][0][0], *p as f32);
                }
                let st = c.stats();
                assert_eq!(st.used_tokens, held);
                assert!(st.allocated_tokens <= 7 && st.allocated_tokens >= held);
            }
            assert_eq!(c.stats().allocated_tokens, 7);
            assert_eq!(c.stats().wrapped_sequences, 1);
        }
    }

    #[test]
    fn blocks_are_allocated_on_demand_and_freed() {
        let mut c = cache(4, 100, 20);
        append(&mut c, 1, 1);
        assert_eq!(c.stats().allocated_tokens, 4);
        assert_eq!(c.stats().allocated_bytes, 4 * 2 * 2 * 2 * 4);
        append(&mut c, 2, 9);
        assert_eq!(c.stats().allocated_tokens, 16);
        let e = c.reserve(3, 5).unwrap_err().to_string();
        assert!(e.contains("KV cache full"), "{e}");
        assert!(!c.contains(3), "a failed reserve changes nothing");
        c.release(2);
        assert_eq!(c.stats().allocated_tokens, 4);
        append(&mut c, 3, 5);
        assert_eq!(c.stats().sequences, 2);
        assert_eq!(c.stats().used_tokens, 6);
    }

    #[test]
    fn context_limit_is_enforced() {
        let mut c = cache(4, 8, 100);
        let e = c.reserve(1, 1001).unwrap_err().to_string();
        assert!(e.contains("context limit of 1000"), "{e}");
    }
}
