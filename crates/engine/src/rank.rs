//! One tensor-parallel rank: its slice of the model and its own KV cache.

use anyhow::Result;
use candle_core::Tensor;
use sirocco_model::{Chunk, KvCache, KvStats, Mistral, SeqId};

pub struct Rank {
    pub model: Mistral,
    pub cache: KvCache,
}

impl Rank {
    pub fn new(model: Mistral, kv_capacity_tokens: usize, block_size: usize) -> Self {
        let cache = model.new_cache(kv_capacity_tokens, block_size);
        Rank { model, cache }
    }

    /// Runs one step; the logits `[chunks, vocab]` are the same on every rank.
    pub fn step(&mut self, chunks: &[Chunk]) -> Result<Tensor> {
        self.model.forward(chunks, &mut self.cache)
    }

    pub fn release(&mut self, seqs: &[SeqId]) {
        for &s in seqs {
            self.cache.release(s);
        }
    }

    pub fn kv_stats(&self) -> KvStats {
        self.cache.stats()
    }
}
