//! Turning prompts into tokens offline: chunked prefill, batched decode, sampling,
//! stops — scheduled by the same [`Planner`] and judged by the same [`StopCriteria`]
//! as the router's batcher.
//!
//! [`generate_batch`] runs its requests as a continuous batcher does: at most
//! `max_batch_size` at a time and as many as the KV cache holds for their whole
//! length (a finished one is replaced at once, in order), each step
//! carrying a decode token of every sequence past its prompt and prompt chunks within
//! the prefill budget, so a sequence's result does not depend on what it is batched
//! with.

use crate::step::SeqStep;
use crate::StepExecutor;
use anyhow::{anyhow, bail, Context, Result};
use sirocco_model::SeqId;
use sirocco_sampling::SamplingParams;
use sirocco_scheduler::{FinishReason, Planner, Scheduled, SchedulerConfig, StopCriteria, Work};
use std::collections::VecDeque;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids, used as given (the caller adds BOS if it wants one).
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end the sequence unless `ignore_eos`.
    pub eos_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Start from the prefix cache's longest match of the prompt, and leave the
    /// prompt's blocks there for later requests.
    pub prefix_cache: bool,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub generated_ids: Vec<u32>,
    /// Logits at the last prompt position (full vocabulary).
    pub prompt_last_logits: Vec<f32>,
    /// Log-probability of each generated token under the sampling distribution.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
}

/// A request being generated.
struct Active {
    /// Its index in the caller's requests.
    index: usize,
    seq: SeqId,
    prompt_len: usize,
    fed: usize,
    /// KV slots reserved for it on each rank.
    kv_slots: usize,
    out: Generation,
}

impl Active {
    fn new(index: usize, seq: SeqId, prompt_len: usize, kv_slots: usize) -> Self {
        Active {
            index,
            seq,
            prompt_len,
            fed: 0,
            kv_slots,
            out: Generation {
                generated_ids: Vec::new(),
                prompt_last_logits: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: FinishReason::Length,
                cached_prompt_tokens: 0,
            },
        }
    }
}

impl Scheduled for Active {
    fn input_len(&self) -> usize {
        self.prompt_len
    }
    fn fed(&self) -> usize {
        self.fed
    }
}

/// Generates for every request, scheduled as `config` says. Sequence ids start at
/// `first_seq` (request `i` runs as `first_seq + i`). `on_token(request index,
/// token)` sees each token as it is sampled.
pub fn generate_batch(
    exec: &mut dyn StepExecutor,
    requests: &[GenerateRequest],
    config: &SchedulerConfig,
    first_seq: SeqId,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    config.validate().map_err(|e| anyhow!(e))?;
    for (i, req) in requests.iter().enumerate() {
        if req.prompt_ids.is_empty() {
            bail!("request {i} has an empty prompt");
        }
        req.sampling.validate()?;
    }
    let planner = Planner::new(*config, exec.kv_geometry()?);
    let mut batch = Batch {
        requests,
        first_seq,
        waiting: (0..requests.len()).collect(),
        running: Vec::new(),
        done: vec![None; requests.len()],
    };
    let result = batch.run(exec, &planner, on_token);
    // Free whatever is still held, also after an error.
    let live: Vec<SeqId> = batch.running.iter().map(|a| a.seq).collect();
    if !live.is_empty() {
        exec.release(&live)?;
    }
    result?;
    Ok(batch.done.into_iter().map(|g| g.expect("every request ran")).collect())
}

/// The requests of one [`generate_batch`] call, by where they are.
struct Batch<'r> {
    requests: &'r [GenerateRequest],
    first_seq: SeqId,
    waiting: VecDeque<usize>,
    /// In admission order (the planner's fairness rests on it).
    running: Vec<Active>,
    done: Vec<Option<Generation>>,
}

impl Batch<'_> {
    fn run(
        &mut self,
        exec: &mut dyn StepExecutor,
        planner: &Planner,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<()> {
        loop {
            let before = self.running.len();
            if !self.admit(planner)? {
                return Ok(());
            }
            self.attach(exec, before)?;
            self.step(exec, planner, on_token)?;
        }
    }

    /// Starts the sequences admitted from `running[from..]` that use the prefix
    /// cache at their cached prefix.
    fn attach(&mut self, exec: &mut dyn StepExecutor, from: usize) -> Result<()> {
        let requests = self.requests;
        let new: Vec<usize> = (from..self.running.len())
            .filter(|&r| requests[self.running[r].index].prefix_cache)
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let seqs: Vec<(SeqId, Vec<u32>)> = new
            .iter()
            .map(|&r| (self.running[r].seq, requests[self.running[r].index].prompt_ids.clone()))
            .collect();
        for (r, cached) in new.into_iter().zip(exec.attach(&seqs)?) {
            let a = &mut self.running[r];
            a.fed = cached;
            a.out.cached_prompt_tokens = cached;
        }
        Ok(())
    }

    /// Fills the batch from the waiting requests, in order, while the batch and the
    /// KV pool have room; false when nothing is left to run.
    fn admit(&mut self, planner: &Planner) -> Result<bool> {
        while planner.has_batch_room(self.running.len()) {
            let Some(&i) = self.waiting.front() else { break };
            let req = &self.requests[i];
            let len = req.prompt_ids.len() + req.max_new_tokens;
            let in_use = self.running.iter().map(|a| a.kv_slots).sum();
            if !planner.kv_fits(in_use, len) {
                if self.running.is_empty() {
                    bail!(
                        "request {i} needs {} KV cache slots per rank ({len} positions), more than the cache has free; \
                         give the engine a larger KV cache or ask for fewer tokens",
                        planner.kv_slots(len)
                    );
                }
                break;
            }
            self.waiting.pop_front();
            let seq = self.first_seq + i as SeqId;
            self.running
                .push(Active::new(i, seq, req.prompt_ids.len(), planner.kv_slots(len)));
        }
        Ok(!self.running.is_empty())
    }

    /// Plans and runs one step, then frees the sequences it ended.
    fn step(
        &mut self,
        exec: &mut dyn StepExecutor,
        planner: &Planner,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<()> {
        let requests = self.requests;
        let plan = planner.plan(&self.running);
        let steps: Vec<SeqStep> = plan
            .iter()
            .map(|p| {
                let a = &self.running[p.index];
                let req = &requests[a.index];
                match p.work {
                    Work::Prefill { start, len, last } => SeqStep {
                        seq: a.seq,
                        tokens: req.prompt_ids[start..start + len].to_vec(),
                        sample: last && req.max_new_tokens > 0,
                        params: Some(req.sampling.clone()),
                        replayed: 0,
                        return_logits: last,
                        top_logprobs: 0,
                        allowed: None,
                    },
                    Work::Decode => SeqStep {
                        seq: a.seq,
                        tokens: vec![*a.out.generated_ids.last().expect("decoding follows a sampled token")],
                        sample: true,
                        params: None,
                        replayed: 0,
                        return_logits: false,
                        top_logprobs: 0,
                        allowed: None,
                    },
                }
            })
            .collect();
        let outputs = exec.step(&steps)?;
        let mut finished = Vec::new();
        for ((step, p), out) in steps.iter().zip(&plan).zip(outputs) {
            let a = &mut self.running[p.index];
            let req = &requests[a.index];
            if let Work::Prefill { len, .. } = p.work {
                a.fed += len;
            }
            if let Some(l) = out.logits {
                a.out.prompt_last_logits = l;
            }
            let Some(token) = out.token else {
                if step.return_logits && req.max_new_tokens == 0 {
                    finished.push(a.seq);
                }
                continue;
            };
            a.out.generated_ids.push(token);
            a.out.logprobs.push(out.logprob);
            on_token(a.index, token);
            let stop = StopCriteria {
                max_new_tokens: req.max_new_tokens,
                eos_ids: &req.eos_ids,
                ignore_eos: req.ignore_eos,
                ..Default::default()
            };
            let judged = stop.judge(token, a.out.generated_ids.len(), "", &mut String::new(), String::new);
            if let Some((reason, _)) = judged.finish {
                a.out.finish_reason = reason;
                finished.push(a.seq);
            }
        }
        if !finished.is_empty() {
            exec.release(&finished)?;
            let (ended, still): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.running)
                .into_iter()
                .partition(|a| finished.contains(&a.seq));
            self.running = still;
            for a in ended {
                self.done[a.index] = Some(a.out);
            }
        }
        Ok(())
    }
}

/// The log-probability the model gives each token of `ids` after the ones before it
/// (`ids[0]`, which has none, is left out): the prompt is fed one position per step
/// and each step's logits scored. Sequence `seq` is freed afterwards.
pub fn score(exec: &mut dyn StepExecutor, ids: &[u32], seq: SeqId) -> Result<Vec<f32>> {
    let mut logprobs = Vec::with_capacity(ids.len().saturating_sub(1));
    let mut feed = || -> Result<()> {
        for pair in ids.windows(2) {
            let out = exec.step(&[SeqStep::logits(seq, vec![pair[0]])])?;
            let logits = out
                .into_iter()
                .next()
                .and_then(|o| o.logits)
                .context("a scoring step returned no logits")?;
            let next = pair[1] as usize;
            if next >= logits.len() {
                bail!("token id {next} is outside the vocabulary (size {})", logits.len());
            }
            logprobs.push(sirocco_sampling::log_softmax(&logits)[next]);
        }
        Ok(())
    };
    let result = feed();
    exec.release(&[seq])?;
    result?;
    Ok(logprobs)
}

impl GenerateRequest {
    /// A greedy request that ignores EOS (as the reference outputs are made).
    pub fn greedy(prompt_ids: Vec<u32>, max_new_tokens: usize) -> Self {
        GenerateRequest {
            prompt_ids,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            eos_ids: Vec::new(),
            ignore_eos: true,
            prefix_cache: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EngineOptions, TpGroup};
    use sirocco_model::ModelSource;

    #[test]
    fn requests_wait_for_kv_room_and_one_that_never_fits_is_refused() {
        // The built-in model keeps 2048 bytes per position: a pool of 192 positions.
        let opts = EngineOptions {
            kv_cache_bytes: 192 * 2048,
            ..EngineOptions::default()
        };
        let mut g = TpGroup::load(&ModelSource::Builtin, &opts).unwrap();
        let kv = g.kv_geometry().unwrap().unwrap();
        let need = kv.slots_needed(3 + 100);
        assert!(need <= kv.capacity_tokens && 2 * need > kv.capacity_tokens, "{kv:?}");
        let reqs: Vec<_> = (0..3)
            .map(|i| GenerateRequest::greedy(vec![1, 70 + i, 80 + i], 100))
            .collect();
        let config = SchedulerConfig::default();
        // Together they would overflow the pool: they run one after another.
        let batched = generate_batch(&mut g, &reqs, &config, 10, &mut |_, _| {}).unwrap();
        for (i, r) in reqs.iter().enumerate() {
            let alone = generate_batch(&mut g, std::slice::from_ref(r), &config, 50, &mut |_, _| {}).unwrap();
            assert_eq!(batched[i].generated_ids.len(), 100);
            assert_eq!(batched[i].generated_ids, alone[0].generated_ids, "request {i}");
        }
        let big = GenerateRequest::greedy(vec![1, 2, 3], kv.positions_per_seq);
        let e = generate_batch(&mut g, &[big], &config, 90, &mut |_, _| {}).unwrap_err();
        assert!(format!("{e:#}").contains("KV cache"), "{e:#}");
        assert!(g.kv_stats().unwrap().iter().all(|s| s.sequences == 0));
    }

    #[test]
    fn scores_are_the_log_softmax_of_each_prefix_s_last_logits() {
        let opts = EngineOptions {
            kv_cache_bytes: 16 << 20,
            ..EngineOptions::default()
        };
        let mut g = TpGroup::load(&ModelSource::Builtin, &opts).unwrap();
        let ids = [1u32, 72, 101, 108, 108, 111];
        let scores = score(&mut g, &ids, 7).unwrap();
        assert_eq!(scores.len(), ids.len() - 1);
        for k in 1..ids.len() {
            let req = GenerateRequest::greedy(ids[..k].to_vec(), 1);
            let config = SchedulerConfig {
                prefill_chunk: 2,
                ..Default::default()
            };
            let out = generate_batch(&mut g, &[req], &config, 100, &mut |_, _| {}).unwrap();
            let want = sirocco_sampling::log_softmax(&out[0].prompt_last_logits)[ids[k] as usize];
            assert!(
                (scores[k - 1] - want).abs() < 1e-4,
                "position {k}: {} vs {want}",
                scores[k - 1]
            );
        }
        // The scoring sequence was freed.
        assert!(g.kv_stats().unwrap().iter().all(|s| s.sequences == 0));
    }
}
