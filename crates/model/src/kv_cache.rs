//! One rank's KV cache: for each sequence, the keys and values of that rank's KV
//! heads, in a rolling buffer of at most `window` positions (position p lives in slot
//! p mod window), allocated in fixed-size blocks as the sequence grows.
//!
//! The blocks live in one pool per layer (`[pool rows, kv_heads, head_dim]`), so that
//! one kernel can reach every sequence's keys through its block table: a sequence's
//! slot `s` is pool row `table[s / block] * block + s % block`. On a GPU the pool is
//! allocated whole at start (as serving systems do); on the CPU it grows on demand.
//!
//! With no sliding window the buffer is as long as the model's context, so nothing
//! ever wraps. Capacity is counted in token slots, so the numbers reported here are
//! exact: a sequence holds `min(len, window)` positions, and its blocks cover no more
//! than that.
//!
//! Prefix caching ([`KvCache::attach`]): a sequence's full blocks are cached under
//! their content's address and shared, read-only, by later sequences whose input
//! begins with the same tokens. Position `p` of every sequence lives in slot
//! `p mod window`, so a cached block of positions `[kB, (k+1)B)` fits the same slot
//! block of any sequence when the window is a multiple of the block size (otherwise
//! only blocks within the first window are shared). Continuing after `P` cached
//! positions needs only those in `[P - window, P)`, so a prefix longer than the
//! window is found even when its earliest blocks are gone. A sequence about to write
//! into a shared or cached block writes into a copy, so cached blocks never change.
//! The cache lives in the pool's free space: cached blocks nobody holds are evicted,
//! least recently used first, when blocks are needed, and the pool never grows past
//! its budget for them.

mod prefix;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use prefix::{BlockIndex, Chain};
use std::collections::HashMap;

pub use prefix::{chain_hashes, BlockHash};

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

    /// Pool blocks that always suffice: every sequence's slots are block-aligned except
    /// a full window's last block, and at most capacity / window sequences hold one.
    fn max_blocks(&self) -> usize {
        self.capacity_tokens.div_ceil(self.block_size) + self.capacity_tokens / self.positions_per_seq + 1
    }
}

#[derive(Default)]
struct SeqKv {
    /// Positions already written: the next token is at position `len`.
    len: usize,
    /// Pool block ids, in slot order.
    blocks: Vec<u32>,
    /// Slots allocated to this sequence.
    slots: usize,
    /// Set for sequences whose full blocks go into the prefix cache.
    chain: Option<Chain>,
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
    /// Full blocks in the prefix cache (shared by sequences, or free to evict).
    pub cached_blocks: usize,
    /// Cached blocks evicted to make room so far.
    pub evicted_blocks: u64,
}

/// Every layer's keys and values, `[blocks * block_size, kv_heads, head_dim]` each.
struct Pool {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    blocks: usize,
}

/// Where one step's decode tokens attend: per sequence its pool block table and the
/// number of slots it holds (the new token's included).
#[derive(Clone, Debug, Default)]
pub struct DecodeTables {
    /// Per sequence `(offset into tables, held slots)`.
    pub seqs: Vec<(u32, u32)>,
    pub tables: Vec<u32>,
    pub block_size: usize,
    /// `seqs` flattened, then `tables`, on the GPU (made once per step, used by every
    /// layer's kernel).
    pub device_meta: Option<Tensor>,
}

impl DecodeTables {
    /// The tables as one `u32` list: `(offset, held)` per sequence, then the tables.
    pub fn meta(&self) -> Vec<u32> {
        let mut meta: Vec<u32> = self.seqs.iter().flat_map(|&(o, h)| [o, h]).collect();
        meta.extend_from_slice(&self.tables);
        meta
    }
}

pub struct KvCache {
    cfg: KvCacheConfig,
    pool: Pool,
    /// Unused pool blocks (a stack: recently freed blocks are reused first). Cached
    /// blocks nobody holds are not here but in `index`, evicted when this runs out.
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqKv>,
    allocated: usize,
    index: BlockIndex,
}

impl KvCache {
    pub fn new(cfg: KvCacheConfig) -> Result<Self> {
        if cfg.block_size == 0 || cfg.positions_per_seq == 0 {
            bail!("KV cache blocks and windows must hold at least one slot");
        }
        // A GPU's pool is allocated whole: growing it would copy it and fragment memory.
        let initial = if cfg.device.is_cpu() {
            cfg.max_blocks().min(16)
        } else {
            cfg.max_blocks()
        };
        let mut cache = KvCache {
            pool: Pool {
                k: Vec::new(),
                v: Vec::new(),
                blocks: 0,
            },
            cfg,
            free: Vec::new(),
            seqs: HashMap::new(),
            allocated: 0,
            index: BlockIndex::default(),
        };
        cache.grow_pool(initial)?;
        Ok(cache)
    }

    pub fn config(&self) -> &KvCacheConfig {
        &self.cfg
    }

    /// Adds `more` blocks to the pool (copying what it holds: rare, CPU only).
    fn grow_pool(&mut self, more: usize) -> Result<()> {
        let rows = more * self.cfg.block_size;
        let shape = (rows, self.cfg.kv_heads, self.cfg.head_dim);
        let grown = |old: Option<&Tensor>| -> Result<Tensor> {
            let new = Tensor::zeros(shape, self.cfg.dtype, &self.cfg.device)?;
            Ok(match old {
                Some(old) => Tensor::cat(&[old, &new], 0)?,
                None => new,
            })
        };
        for l in 0..self.cfg.layers {
            let k = grown(self.pool.k.get(l))?;
            let v = grown(self.pool.v.get(l))?;
            if l < self.pool.k.len() {
                self.pool.k[l] = k;
                self.pool.v[l] = v;
            } else {
                self.pool.k.push(k);
                self.pool.v.push(v);
            }
        }
        let first = self.pool.blocks as u32;
        self.pool.blocks += more;
        self.index.grow(more);
        // Lowest ids on top of the stack, so a fresh cache fills the pool in order.
        self.free.extend((first..self.pool.blocks as u32).rev());
        Ok(())
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
        let have = self.seqs.get(&seq).map_or(0, |s| s.slots);
        let bs = self.cfg.block_size;
        let new_blocks = want.div_ceil(bs).saturating_sub(have.div_ceil(bs));
        if new_blocks > self.blocks_available() {
            bail!("KV pool exhausted ({} blocks)", self.pool.blocks);
        }
        let mut taken = Vec::with_capacity(new_blocks);
        for _ in 0..new_blocks {
            let b = self.take_block()?;
            self.index.acquire(b);
            taken.push(b);
        }
        let s = self.seqs.entry(seq).or_default();
        s.blocks.extend(taken);
        if want > s.slots {
            self.allocated += want - s.slots;
            s.slots = want;
        }
        self.make_writable(seq, len, new_tokens)
    }

    /// Blocks that [`KvCache::take_block`] can still hand out.
    fn blocks_available(&self) -> usize {
        self.free.len() + (self.cfg.max_blocks() - self.pool.blocks) + self.index.evictable()
    }

    /// A block for a sequence to hold: a free one, else a new one while the pool is
    /// under its budget (growing it by half its size or more, so copies stay rare),
    /// else the least recently used cached block nobody holds.
    fn take_block(&mut self) -> Result<u32> {
        if self.free.is_empty() {
            let room = self.cfg.max_blocks() - self.pool.blocks;
            if room > 0 {
                self.grow_pool(self.pool.blocks.max(1).min(room))?;
            } else if let Some(b) = self.index.evict() {
                return Ok(b);
            }
        }
        self.free
            .pop()
            .ok_or_else(|| anyhow::anyhow!("KV pool exhausted ({} blocks)", self.pool.blocks))
    }

    /// Gives `seq` its own copy of every shared or cached block that positions
    /// `len..len+n` are written into (a sequence wrapping around its window, or one
    /// continuing from a cached prefix).
    fn make_writable(&mut self, seq: SeqId, len: usize, n: usize) -> Result<()> {
        let (w, bs) = (self.cfg.positions_per_seq, self.cfg.block_size);
        let skip = n.saturating_sub(w);
        let mut slot_blocks: Vec<usize> = (len + skip..len + n).map(|p| (p % w) / bs).collect();
        slot_blocks.dedup();
        for j in slot_blocks {
            let old = self.seqs[&seq].blocks[j];
            if self.index.is_private(old) {
                continue;
            }
            // The sole holder of a cached block may overwrite it when no block is to
            // be had: the cache loses an entry, nobody loses keys.
            if self.index.refs(old) <= 1 && self.blocks_available() == 0 {
                self.index.unregister(old);
                continue;
            }
            let new = self.take_block()?;
            self.index.acquire(new);
            let rows: Vec<u32> = (0..bs as u32).map(|i| new * bs as u32 + i).collect();
            for layer in 0..self.cfg.layers {
                let at = old as usize * bs;
                let k = self.pool.k[layer].narrow(0, at, bs)?.copy()?;
                let v = self.pool.v[layer].narrow(0, at, bs)?.copy()?;
                self.write_rows_of(layer, &rows, None, &k, &v)?;
            }
            self.seqs.get_mut(&seq).expect("checked above").blocks[j] = new;
            if self.index.release(old) {
                self.free.push(old);
            }
        }
        Ok(())
    }

    /// Whether logical block `k` (positions `[kB, (k+1)B)`) can be shared: it fills
    /// one slot block of every sequence's buffer.
    fn shareable(&self, k: usize) -> bool {
        let (w, bs) = (self.cfg.positions_per_seq, self.cfg.block_size);
        w.is_multiple_of(bs) || (k + 1) * bs <= w
    }

    /// Starts `seq` from the longest cached prefix of `tokens` (its input, or the
    /// start of it) and returns that prefix's length: block-aligned, shorter than
    /// `tokens` (the last token is always computed, for its logits), and found only
    /// if every block of the window before it is cached. From here on `seq`'s own
    /// full blocks are cached for later sequences. Every rank given the same steps
    /// answers the same.
    pub fn attach(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize> {
        if self.seqs.contains_key(&seq) {
            bail!("sequence {seq} already holds KV; a prefix attaches before its first chunk");
        }
        let (w, bs) = (self.cfg.positions_per_seq, self.cfg.block_size);
        let usable = tokens.len().saturating_sub(1).min(self.cfg.max_context);
        let hashes = chain_hashes(None, &tokens[..usable / bs * bs], bs);
        let span = w / bs;
        let limit = (0..hashes.len()).take_while(|&k| self.shareable(k)).count();
        let found: Vec<Option<u32>> = hashes[..limit].iter().map(|h| self.index.lookup(h)).collect();
        // The longest prefix of m blocks whose last min(m, span) blocks are cached.
        let (mut run, mut best) = (0, 0);
        for (k, b) in found.iter().enumerate() {
            run = if b.is_some() { run + 1 } else { 0 };
            if run >= (k + 1).min(span) {
                best = k + 1;
            }
        }
        let held = best.min(span);
        if self.allocated + held * bs > self.cfg.capacity_tokens {
            best = 0;
        }
        let held = best.min(span);
        let mut blocks = vec![0u32; held];
        for (k, b) in found.iter().enumerate().take(best).skip(best - held) {
            let b = b.expect("the run is cached");
            blocks[(k * bs % w) / bs] = b;
            self.index.acquire(b);
        }
        self.allocated += held * bs;
        self.seqs.insert(
            seq,
            SeqKv {
                len: best * bs,
                blocks,
                slots: held * bs,
                chain: Some(Chain {
                    parent: best.checked_sub(1).map(|k| hashes[k]),
                    pending: Vec::new(),
                }),
            },
        );
        Ok(best * bs)
    }

    /// Starts `child` as a copy of `parent`: it shares every block `parent` holds
    /// (a block either of them writes into later is copied first), so continuing
    /// both costs no recomputation and no copy of what they have in common. For
    /// `n` samples of one prompt: the prompt is prefilled once, then forked.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        if self.seqs.contains_key(&child) {
            bail!("sequence {child} already holds KV; it cannot be forked into");
        }
        let Some(p) = self.seqs.get(&parent) else {
            bail!("sequence {parent} holds no KV to fork");
        };
        // Shared blocks count for each holder, as if copied, so that either may
        // write into them later without running out of room.
        if self.allocated + p.slots > self.cfg.capacity_tokens {
            bail!(
                "KV cache full: forking sequence {parent} needs {} token slots, {} of {} are free",
                p.slots,
                self.cfg.capacity_tokens - self.allocated,
                self.cfg.capacity_tokens
            );
        }
        let copy = SeqKv {
            len: p.len,
            blocks: p.blocks.clone(),
            slots: p.slots,
            chain: p.chain.clone(),
        };
        for &b in &copy.blocks {
            self.index.acquire(b);
        }
        self.allocated += copy.slots;
        self.seqs.insert(child, copy);
        Ok(())
    }

    /// Pool row of `seq`'s slot `slot`.
    fn row(&self, s: &SeqKv, slot: usize) -> u32 {
        let bs = self.cfg.block_size;
        s.blocks[slot / bs] * bs as u32 + (slot % bs) as u32
    }

    /// `(pool row, position)` of every slot `seq` holds, in slot order.
    pub fn slots(&self, seq: SeqId) -> Vec<(u32, u32)> {
        let Some(s) = self.seqs.get(&seq) else {
            return Vec::new();
        };
        let w = self.cfg.positions_per_seq;
        let held = s.len.min(w);
        let mut slots = vec![(0, 0); held];
        for p in s.len - held..s.len {
            slots[p % w] = (self.row(s, p % w), p as u32);
        }
        slots
    }

    /// Keys and values held for `seq` at `layer`, in slot order, with the position
    /// each slot holds; `None` for a sequence with nothing cached yet.
    pub fn read(&self, seq: SeqId, layer: usize) -> Result<Option<(Tensor, Tensor, Vec<usize>)>> {
        let slots = self.slots(seq);
        if slots.is_empty() {
            return Ok(None);
        }
        let rows: Vec<u32> = slots.iter().map(|&(row, _)| row).collect();
        let rows = Tensor::new(rows.as_slice(), &self.cfg.device)?;
        let k = self.pool.k[layer].index_select(&rows, 0)?;
        let v = self.pool.v[layer].index_select(&rows, 0)?;
        Ok(Some((k, v, slots.iter().map(|&(_, p)| p as usize).collect())))
    }

    /// Pool rows that positions `len..len+n` of `seq` go to, with how many leading
    /// positions are skipped: those older than the window would be overwritten within
    /// the same chunk.
    fn write_rows(&self, seq: SeqId, n: usize) -> Result<(usize, Vec<u32>)> {
        let s = self
            .seqs
            .get(&seq)
            .ok_or_else(|| anyhow::anyhow!("sequence {seq} has no KV cache reserved"))?;
        let w = self.cfg.positions_per_seq;
        let skip = n.saturating_sub(w);
        Ok((skip, (skip..n).map(|i| self.row(s, (s.len + i) % w)).collect()))
    }

    /// Writes keys and values `[n, kv_heads, head_dim]` for positions `len..len+n`
    /// of `seq` at `layer`. Call [`KvCache::advance`] once every layer has been
    /// written.
    pub fn write(&mut self, seq: SeqId, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dim(0)?;
        let (skip, rows) = self.write_rows(seq, n)?;
        self.write_rows_of(
            layer,
            &rows,
            None,
            &k.narrow(0, skip, n - skip)?,
            &v.narrow(0, skip, n - skip)?,
        )
    }

    /// Pool rows of each sequence's next position.
    pub fn decode_rows(&self, seqs: &[SeqId]) -> Result<Vec<u32>> {
        seqs.iter().map(|&seq| Ok(self.write_rows(seq, 1)?.1[0])).collect()
    }

    /// Block tables for attending from each sequence's next position, which must have
    /// been written: it holds min(len + 1, window) slots.
    pub fn decode_tables(&self, seqs: &[SeqId]) -> Result<DecodeTables> {
        let mut t = DecodeTables {
            block_size: self.cfg.block_size,
            ..DecodeTables::default()
        };
        for &seq in seqs {
            let s = self
                .seqs
                .get(&seq)
                .ok_or_else(|| anyhow::anyhow!("sequence {seq} has no KV cache reserved"))?;
            let held = (s.len + 1).min(self.cfg.positions_per_seq);
            t.seqs.push((t.tables.len() as u32, held as u32));
            t.tables
                .extend_from_slice(&s.blocks[..held.div_ceil(self.cfg.block_size)]);
        }
        Ok(t)
    }

    /// This layer's key and value pools.
    pub fn pool(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.pool.k[layer], &self.pool.v[layer])
    }

    /// Copies row `i` of `k`/`v` into pool row `rows[i]` at `layer` (for a decode step,
    /// one new position per sequence, rows from [`KvCache::decode_rows`]). `rows_dev`,
    /// if given, is `rows` already on the cache's device.
    pub fn write_rows_of(
        &mut self,
        layer: usize,
        rows: &[u32],
        rows_dev: Option<&Tensor>,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if self.cfg.device.is_cuda() {
            let rows_t = match rows_dev {
                Some(t) => t.clone(),
                None => Tensor::new(rows, &self.cfg.device)?,
            };
            crate::cuda::scatter_rows(&self.pool.k[layer], &rows_t, k)?;
            crate::cuda::scatter_rows(&self.pool.v[layer], &rows_t, v)?;
            return Ok(());
        }
        let _ = rows_dev;
        // The CPU computes in f32 over a cache in the weights' dtype.
        let dtype = self.cfg.dtype;
        let (k, v) = (&k.to_dtype(dtype)?, &v.to_dtype(dtype)?);
        // Runs of consecutive rows are one copy each.
        let mut i = 0;
        while i < rows.len() {
            let mut j = i + 1;
            while j < rows.len() && rows[j] == rows[j - 1] + 1 {
                j += 1;
            }
            let at = rows[i] as usize;
            self.pool.k[layer].slice_set(&k.narrow(0, i, j - i)?.contiguous()?, 0, at)?;
            self.pool.v[layer].slice_set(&v.narrow(0, i, j - i)?.contiguous()?, 0, at)?;
            i = j;
        }
        Ok(())
    }

    /// Marks the positions of `tokens`, the next of `seq`, as written; caches the
    /// blocks they complete if `seq` was attached and they are still whole in its
    /// buffer (not overwritten later in the same chunk).
    pub fn advance(&mut self, seq: SeqId, tokens: &[u32]) {
        let (w, bs) = (self.cfg.positions_per_seq, self.cfg.block_size);
        let shareable = |k: usize| w.is_multiple_of(bs) || (k + 1) * bs <= w;
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        let start = s.len;
        s.len += tokens.len();
        let Some(chain) = s.chain.as_mut() else {
            return;
        };
        for (k, hash) in chain.extend(start, tokens, bs) {
            if shareable(k) && k * bs + w >= s.len {
                self.index.register(s.blocks[(k * bs % w) / bs], hash, k);
            }
        }
    }

    /// Frees everything `seq` holds; its cached blocks stay cached. Unknown sequences
    /// are ignored.
    pub fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.allocated -= s.slots;
            for b in s.blocks.into_iter().rev() {
                if self.index.release(b) {
                    self.free.push(b);
                }
            }
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
            cached_blocks: self.index.cached(),
            evicted_blocks: self.index.evicted(),
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
        .unwrap()
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
        c.advance(seq, &vec![0; n]);
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
    #[test]
    fn the_pool_grows_on_demand_and_reuses_freed_blocks() {
        let mut c = cache(2, 5, 1000);
        let start = c.pool.blocks;
        for seq in 0..40 {
            append(&mut c, seq, 5);
        }
        // Five slots in blocks of two: three blocks per sequence, the last one half used.
        assert_eq!(c.stats().allocated_tokens, 200);
        assert_eq!(c.stats().blocks, 120);
        assert!(c.pool.blocks >= 120 && c.pool.blocks > start);
        assert!(c.pool.blocks <= c.cfg.max_blocks());
        let grown = c.pool.blocks;
        for seq in 0..40 {
            c.release(seq);
        }
        for seq in 100..140 {
            append(&mut c, seq, 5);
        }
        assert_eq!(c.pool.blocks, grown, "freed blocks are reused before the pool grows");
        // Each sequence still reads back exactly its own keys.
        for seq in 100..140 {
            let (k, _, pos) = c.read(seq, 0).unwrap().unwrap();
            let k = k.to_vec3::<f32>().unwrap();
            for (slot, p) in pos.iter().enumerate() {
                assert_eq!(k[slot][0][0], *p as f32);
            }
        }
    }

    /// Writes `tokens` after what `seq` holds; each slot's key is its position, and
    /// its value is the token, so reads show what was written where.
    fn feed(c: &mut KvCache, seq: SeqId, tokens: &[u32]) {
        let start = c.seq_len(seq);
        let n = tokens.len();
        c.reserve(seq, n).unwrap();
        let vals: Vec<f32> = tokens.iter().flat_map(|&t| [t as f32, 0.0]).collect();
        let v = Tensor::from_vec(vals, (n, 1, 2), &Device::Cpu).unwrap();
        for layer in 0..2 {
            c.write(seq, layer, &kv(start, n), &v).unwrap();
        }
        c.advance(seq, tokens);
    }

    /// `(position, token)` of every slot `seq` holds, by position.
    fn held(c: &KvCache, seq: SeqId) -> Vec<(usize, u32)> {
        let (k, v, _) = c.read(seq, 1).unwrap().unwrap();
        let (k, v) = (k.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
        let mut out: Vec<(usize, u32)> = k
            .iter()
            .zip(&v)
            .map(|(k, v)| (k[0][0] as usize, v[0][0] as u32))
            .collect();
        out.sort();
        out
    }

    /// What a sequence fed `tokens` from scratch holds: the last window of them.
    fn expected(tokens: &[u32], window: usize) -> Vec<(usize, u32)> {
        let start = tokens.len().saturating_sub(window);
        (start..tokens.len()).map(|p| (p, tokens[p])).collect()
    }

    fn prompt(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 7 + seed * 13) % 50 + 1).collect()
    }

    #[test]
    fn a_cached_prefix_is_shared_and_the_sequence_continues_as_if_computed() {
        for (block, window) in [(2, 8), (4, 8), (3, 7), (1, 5), (4, 1000)] {
            let mut c = cache(block, window, 1000);
            let a = prompt(1, 23);
            assert_eq!(c.attach(1, &a).unwrap(), 0, "nothing cached yet");
            for chunk in a.chunks(5) {
                feed(&mut c, 1, chunk);
            }
            // Same 17 first tokens, then different ones.
            let mut b = a[..17].to_vec();
            b.extend(prompt(2, 9));
            let hit = c.attach(2, &b).unwrap();
            let aligned = window % block == 0;
            let expect_hit = if aligned {
                17 / block * block
            } else {
                (window / block * block).min(17 / block * block)
            };
            assert_eq!(hit, expect_hit, "block {block} window {window}");
            assert_eq!(c.seq_len(2), hit);
            for chunk in b[hit..].chunks(3) {
                feed(&mut c, 2, chunk);
            }
            assert_eq!(held(&c, 2), expected(&b, window), "block {block} window {window}");
            assert_eq!(held(&c, 1), expected(&a, window), "the first sequence is untouched");
        }
    }

    #[test]
    fn a_fork_shares_its_parent_s_blocks_and_both_continue_as_if_computed_alone() {
        for (block, window) in [(2, 8), (4, 8), (3, 7), (4, 1000)] {
            let mut c = cache(block, window, 1000);
            let a = prompt(1, 13);
            feed(&mut c, 1, &a);
            let in_use = |c: &KvCache| c.pool.blocks - c.free.len();
            let before = in_use(&c);
            c.fork(1, 2).unwrap();
            assert_eq!(in_use(&c), before, "no block copied at the fork");
            assert_eq!(held(&c, 2), held(&c, 1));
            // Both go on differently (past the window too): each sees its own keys.
            let (tail1, tail2) = (prompt(3, 9), prompt(4, 9));
            feed(&mut c, 1, &tail1);
            feed(&mut c, 2, &tail2);
            assert_eq!(held(&c, 1), expected(&[&a[..], &tail1].concat(), window));
            assert_eq!(held(&c, 2), expected(&[&a[..], &tail2].concat(), window));
            c.release(1);
            c.release(2);
            assert_eq!(c.stats().allocated_tokens, 0);
        }
        let mut c = cache(2, 8, 1000);
        assert!(c.fork(7, 8).is_err(), "unknown parent");
        feed(&mut c, 1, &[1, 2, 3]);
        feed(&mut c, 2, &[4]);
        assert!(c.fork(1, 2).is_err(), "the child holds KV already");
    }

    #[test]
    fn a_prefix_longer_than_the_window_is_found_after_its_start_was_overwritten() {
        // Window 8 in blocks of 2: continuing after 20 positions needs only 12..20.
        let mut c = cache(2, 8, 1000);
        let a = prompt(3, 30);
        c.attach(1, &a).unwrap();
        for chunk in a.chunks(4) {
            feed(&mut c, 1, chunk);
        }
        c.release(1);
        let mut b = a[..21].to_vec();
        b.extend(prompt(4, 5));
        assert_eq!(c.attach(2, &b).unwrap(), 20);
        for chunk in b[20..].chunks(2) {
            feed(&mut c, 2, chunk);
        }
        assert_eq!(held(&c, 2), expected(&b, 8));
        // Its own writes went to copies: the cached prefix is intact for a third.
        assert_eq!(c.attach(3, &b[..21]).unwrap(), 20);
        feed(&mut c, 3, &b[20..21]);
        assert_eq!(held(&c, 3), expected(&b[..21], 8));
        // Only the blocks of the window before it need be cached: without the first
        // ones a long prefix still hits, a short one does not.
        let mut d = cache(2, 8, 1000);
        d.attach(1, &a).unwrap();
        feed(&mut d, 1, &a);
        d.release(1);
        // One chunk of 30 in a window of 8 only ever held positions 22..30.
        assert_eq!(d.attach(2, &a[..10]).unwrap(), 0);
        let mut e = a.clone();
        e.extend([1, 2]);
        assert_eq!(d.attach(3, &e).unwrap(), 30);
        feed(&mut d, 3, &e[30..]);
        assert_eq!(held(&d, 3), expected(&e, 8));
    }

    #[test]
    fn identical_prompts_together_compute_twice_and_cache_once() {
        let mut c = cache(2, 16, 1000);
        let a = prompt(5, 11);
        assert_eq!(c.attach(1, &a).unwrap(), 0);
        assert_eq!(c.attach(2, &a).unwrap(), 0, "nothing is read before it is written");
        feed(&mut c, 1, &a[..6]);
        feed(&mut c, 2, &a[..6]);
        feed(&mut c, 1, &a[6..]);
        feed(&mut c, 2, &a[6..]);
        assert_eq!(c.stats().cached_blocks, 5);
        assert_eq!(c.attach(3, &a).unwrap(), 10);
        feed(&mut c, 3, &a[10..]);
        assert_eq!(held(&c, 3), expected(&a, 16));
        // Unattached sequences neither use nor fill the cache.
        feed(&mut c, 4, &prompt(6, 9));
        assert_eq!(c.stats().cached_blocks, 5);
    }

    #[test]
    fn cached_blocks_are_evicted_for_room_and_never_grow_the_pool_past_its_budget() {
        // 24 slots: three sequences of 8, in blocks of 4.
        let mut c = cache(4, 100, 24);
        let max = c.cfg.max_blocks();
        for seq in 0..3 {
            let p = prompt(seq as u32 + 10, 8);
            c.attach(seq, &p).unwrap();
            feed(&mut c, seq, &p);
        }
        assert_eq!(c.stats().cached_blocks, 6);
        c.release(0);
        c.release(1);
        // Cached but free: a new sequence of 16 fits by evicting them, oldest first.
        let big = prompt(20, 16);
        c.attach(3, &big).unwrap();
        feed(&mut c, 3, &big);
        assert!(c.pool.blocks <= max);
        assert!(c.stats().evicted_blocks >= 2);
        assert_eq!(c.stats().allocated_tokens, 24);
        // Sequence 2 still holds its keys.
        assert_eq!(held(&c, 2), expected(&prompt(12, 8), 100));
        let e = c.reserve(5, 1).unwrap_err().to_string();
        assert!(e.contains("KV cache full"), "{e}");
        // Never more blocks than the budget, however much is cached.
        c.release(2);
        c.release(3);
        // 0's blocks went before 1's, and of 1's the deeper block first.
        assert_eq!(c.stats().evicted_blocks, 3);
        assert_eq!(c.attach(100, &prompt(10, 8)).unwrap(), 0);
        assert_eq!(c.attach(101, &prompt(11, 8)).unwrap(), 4);
        c.release(100);
        c.release(101);
        for seq in 10..40 {
            c.release(seq - 1);
            let p = prompt(seq as u32, 8);
            c.attach(seq, &p).unwrap();
            feed(&mut c, seq, &p);
            assert!(c.pool.blocks <= max);
        }
    }
}
