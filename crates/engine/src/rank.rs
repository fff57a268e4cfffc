//! One tensor-parallel rank: its slice of the model, its own KV cache and, on rank 0,
//! the samplers of the sequences it serves.

use crate::step::{SeqOutput, SeqStep};
use crate::EngineOptions;
use anyhow::{Context, Result};
use candle_core::Device;
use sirocco_collective::Collective;
use sirocco_model::{Chunk, KvCache, KvStats, LoadedSource, Mistral, Partition, SeqId};
use sirocco_sampling::{top_logprobs, Sampler, SamplingParams};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Default)]
struct SeqSampling {
    /// Input seen before the first sample (the prompt, plus any replayed tokens).
    input: Vec<u32>,
    /// Parameters as given by the sequence's first step that carried them.
    params: Option<SamplingParams>,
    sampler: Option<Sampler>,
}

pub struct Rank {
    pub model: Mistral,
    pub cache: KvCache,
    samplers: HashMap<SeqId, SeqSampling>,
}

impl Rank {
    /// Loads rank `rank` of `world` of `source` onto `device`, joined to its peers by
    /// `collective`, with the KV cache `opts` budgets. In-process groups and shard
    /// processes both build their ranks here, so they slice and size them alike.
    pub fn load(
        source: &LoadedSource,
        rank: usize,
        world: usize,
        opts: &EngineOptions,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let part = Partition::new(&source.config, rank, world)?;
        let model = Mistral::load_quantized(
            &source.config,
            source.weights.as_ref(),
            part,
            opts.dtype,
            opts.quantize,
            device,
            collective,
        )?;
        // The budget is in bytes; a token slot's size depends on this rank's KV heads.
        let per_token = model.cache_config(1, 1).bytes_per_token();
        let capacity = (opts.kv_cache_bytes / per_token).max(1);
        let cache = model.new_cache(capacity, opts.kv_block_size)?;
        Ok(Rank {
            model,
            cache,
            samplers: HashMap::new(),
        })
    }

    /// Token slots this rank's KV cache holds, all sequences together.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.cache.config().capacity_tokens
    }

    pub fn is_root(&self) -> bool {
        self.model.partition().rank == 0
    }

    /// Runs one step. Rank 0 returns an output per sequence; other ranks return none.
    pub fn step(&mut self, steps: &[SeqStep]) -> Result<Vec<SeqOutput>> {
        let chunks: Vec<Chunk> = steps.iter().map(SeqStep::chunk).collect();
        let logits = self.model.forward(&chunks, &mut self.cache)?;
        if !self.is_root() {
            return Ok(Vec::new());
        }
        let (rows, vocab) = logits.dims2()?;
        if rows != steps.len() {
            anyhow::bail!("the model returned logits for {rows} of {} sequences", steps.len());
        }
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        // Sequences sample independently (each reads the whole vocabulary), so they do
        // it in parallel: taken out of the map, sampled, put back.
        type Work<'a> = (SeqSampling, &'a SeqStep, &'a [f32], Result<SeqOutput>);
        let mut work: Vec<Work> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    self.samplers.remove(&s.seq).unwrap_or_default(),
                    s,
                    &logits[i * vocab..(i + 1) * vocab],
                    Ok(SeqOutput::default()),
                )
            })
            .collect();
        // The kernels' pool split, not rayon's: this thread is outside the pool and
        // would sleep until rayon woke it again.
        sirocco_kernels::parallel::for_each_chunk_mut(&mut work, 1, |_, w| {
            let (state, s, logits, out) = &mut w[0];
            *out = sample_one(state, s, logits);
        });
        work.into_iter()
            .map(|(state, s, _, out)| {
                self.samplers.insert(s.seq, state);
                out
            })
            .collect()
    }

    /// Starts `seq` from the longest cached prefix of `tokens` (see
    /// [`KvCache::attach`]); returns its length. Rank 0's sampler counts those tokens
    /// as prompt, as if they had come in chunks.
    pub fn attach(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize> {
        let cached = self.cache.attach(seq, tokens)?;
        if self.is_root() {
            let state = self.samplers.entry(seq).or_default();
            state.input.extend_from_slice(&tokens[..cached]);
        }
        Ok(cached)
    }

    /// Starts `child` as a copy of `parent` (see [`KvCache::fork`]); rank 0's
    /// sampler gives it the input `parent` has read. The child's own first sampling
    /// step carries its parameters.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        self.cache.fork(parent, child)?;
        if self.is_root() {
            let input = self.samplers.get(&parent).map(|s| s.input.clone()).unwrap_or_default();
            self.samplers.insert(
                child,
                SeqSampling {
                    input,
                    ..SeqSampling::default()
                },
            );
        }
        Ok(())
    }

    pub fn release(&mut self, seqs: &[SeqId]) {
        for s in seqs {
            self.cache.release(*s);
            self.samplers.remove(s);
        }
    }

    /// Frees every sequence (those of a router session that ended); returns how many.
    pub fn release_all(&mut self) -> usize {
        let mut seqs: Vec<SeqId> = self.cache.sequences().collect();
        seqs.extend(self.samplers.keys().filter(|s| !self.cache.contains(**s)));
        let n = seqs.len();
        self.release(&seqs);
        n
    }

    pub fn kv_stats(&self) -> KvStats {
        self.cache.stats()
    }
}

/// Samples `s`'s next token from its `logits` (rank 0), keeping its sampler in `state`.
fn sample_one(state: &mut SeqSampling, s: &SeqStep, logits: &[f32]) -> Result<SeqOutput> {
    let mut out = SeqOutput {
        seq: s.seq,
        ..SeqOutput::default()
    };
    if state.sampler.is_none() {
        state.input.extend_from_slice(&s.tokens);
    }
    if state.params.is_none() {
        state.params = s.params.clone();
    }
    if s.sample {
        if state.sampler.is_none() {
            let params = state
                .params
                .clone()
                .with_context(|| format!("sequence {} samples without sampling parameters", s.seq))?;
            let split = state.input.len().saturating_sub(s.replayed);
            let mut sampler = Sampler::new(params, &state.input[..split])?;
            for &t in &state.input[split..] {
                sampler.record(t);
            }
            state.sampler = Some(sampler);
        }
        let sampler = state.sampler.as_mut().expect("created above");
        let picked = sampler.sample_allowed(logits, s.allowed.as_deref());
        out.token = Some(picked.token);
        out.logprob = picked.logprob;
    }
    if s.top_logprobs > 0 {
        out.top_logprobs = top_logprobs(logits, s.top_logprobs);
    }
    if s.return_logits {
        out.logits = Some(logits.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sirocco_collective::{LocalGroup, Solo};
    use sirocco_model::ModelSource;

    #[test]
    fn a_rank_s_kv_pool_holds_what_its_byte_budget_buys_for_its_own_kv_heads() {
        let source = ModelSource::Builtin.open().unwrap();
        let opts = EngineOptions {
            kv_cache_bytes: 1 << 20,
            ..EngineOptions::default()
        };
        let whole = Rank::load(&source, 0, 1, &opts, &Device::Cpu, Arc::new(Solo)).unwrap();
        // f32 keys and values of every layer and KV head.
        let c = &source.config;
        let per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4;
        assert_eq!(whole.kv_capacity_tokens(), (1 << 20) / per_token);
        // Half the KV heads per rank: twice the slots for the same bytes.
        let coll = LocalGroup::members(2).pop().unwrap();
        let half = Rank::load(&source, 1, 2, &opts, &Device::Cpu, Arc::new(coll)).unwrap();
        assert!(!half.is_root());
        assert_eq!(half.kv_capacity_tokens(), 2 * whole.kv_capacity_tokens());
        // A budget below one slot still buys one.
        let tiny = EngineOptions {
            kv_cache_bytes: 1,
            ..opts
        };
        let one = Rank::load(&source, 0, 1, &tiny, &Device::Cpu, Arc::new(Solo)).unwrap();
        assert_eq!(one.kv_capacity_tokens(), 1);
    }

    #[test]
    fn a_collective_of_another_rank_is_refused() {
        let source = ModelSource::Builtin.open().unwrap();
        let coll = LocalGroup::members(2).pop().unwrap();
        let err = Rank::load(&source, 0, 2, &EngineOptions::default(), &Device::Cpu, Arc::new(coll));
        assert!(err.is_err());
    }
}
