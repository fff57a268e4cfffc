//! Turning prompts into tokens: chunked prefill, batched decode, sampling, stops.
//!
//! [`generate_batch`] runs several sequences together the way a continuous batcher
//! does — each step carries the next prefill chunk of every sequence still reading
//! its prompt and one decode token of every other — so a sequence's result does not
//! depend on what it is batched with.

use crate::step::SeqStep;
use crate::StepExecutor;
use anyhow::{bail, Context, Result};
use sirocco_model::SeqId;
use sirocco_sampling::SamplingParams;

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Reached `max_new_tokens`.
    Length,
    /// Sampled an end-of-sequence token.
    Eos,
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids, used as given (the caller adds BOS if it wants one).
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end the sequence unless `ignore_eos`.
    pub eos_ids: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub generated_ids: Vec<u32>,
    /// Logits at the last prompt position (full vocabulary).
    pub prompt_last_logits: Vec<f32>,
    /// Log-probability of each generated token under the sampling distribution.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

struct Active {
    seq: SeqId,
    req: GenerateRequest,
    fed: usize,
    out: Generation,
    done: bool,
}

/// Generates for every request, running them together; `prefill_chunk` bounds the
/// prompt tokens of one sequence per step. Sequence ids start at `first_seq`.
/// `on_token(request index, token)` sees each token as it is sampled.
pub fn generate_batch(
    exec: &mut dyn StepExecutor,
    requests: &[GenerateRequest],
    prefill_chunk: usize,
    first_seq: SeqId,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    if prefill_chunk == 0 {
        bail!("prefill chunk size must be at least 1");
    }
    let mut active = Vec::with_capacity(requests.len());
    for (i, req) in requests.iter().enumerate() {
        if req.prompt_ids.is_empty() {
            bail!("request {i} has an empty prompt");
        }
        req.sampling.validate()?;
        active.push(Active {
            seq: first_seq + i as SeqId,
            req: req.clone(),
            fed: 0,
            out: Generation {
                generated_ids: Vec::new(),
                prompt_last_logits: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: FinishReason::Length,
            },
            done: false,
        });
    }
    let result = run(exec, &mut active, prefill_chunk, on_token);
    // Free whatever is still held, also after an error.
    let live: Vec<SeqId> = active
        .iter()
        .filter(|a| !a.done || result.is_err())
        .map(|a| a.seq)
        .collect();
    if !live.is_empty() {
        exec.release(&live)?;
    }
    result?;
    Ok(active.into_iter().map(|a| a.out).collect())
}

fn run(
    exec: &mut dyn StepExecutor,
    active: &mut [Active],
    prefill_chunk: usize,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<()> {
    loop {
        let mut steps = Vec::new();
        let mut owners = Vec::new();
        for (i, a) in active.iter().enumerate() {
            if a.done {
                continue;
            }
            let prompt = &a.req.prompt_ids;
            let step = if a.fed < prompt.len() {
                let end = (a.fed + prefill_chunk).min(prompt.len());
                let last = end == prompt.len();
                SeqStep {
                    seq: a.seq,
                    tokens: prompt[a.fed..end].to_vec(),
                    sample: last && a.req.max_new_tokens > 0,
                    params: Some(a.req.sampling.clone()),
                    replayed: 0,
                    return_logits: last,
                    top_logprobs: 0,
                }
            } else {
                SeqStep {
                    seq: a.seq,
                    tokens: vec![*a.out.generated_ids.last().expect("decoding follows a sampled token")],
                    sample: true,
                    params: None,
                    replayed: 0,
                    return_logits: false,
                    top_logprobs: 0,
                }
            };
            steps.push(step);
            owners.push(i);
        }
        if steps.is_empty() {
            return Ok(());
        }
        let outputs = exec.step(&steps)?;
        let mut finished = Vec::new();
        for ((step, &i), out) in steps.iter().zip(&owners).zip(outputs) {
            let a = &mut active[i];
            if a.fed < a.req.prompt_ids.len() {
                a.fed += step.tokens.len();
            }
            if let Some(l) = out.logits {
                a.out.prompt_last_logits = l;
            }
            let Some(token) = out.token else {
                if step.return_logits && a.req.max_new_tokens == 0 {
                    a.done = true;
                    finished.push(a.seq);
                }
                continue;
            };
            a.out.generated_ids.push(token);
            a.out.logprobs.push(out.logprob);
            on_token(i, token);
            if !a.req.ignore_eos && a.req.eos_ids.contains(&token) {
                a.out.finish_reason = FinishReason::Eos;
                a.done = true;
            } else if a.out.generated_ids.len() >= a.req.max_new_tokens {
                a.out.finish_reason = FinishReason::Length;
                a.done = true;
            }
            if a.done {
                finished.push(a.seq);
            }
        }
        if !finished.is_empty() {
            exec.release(&finished)?;
        }
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EngineOptions, TpGroup};
    use sirocco_model::ModelSource;

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
            let out = generate_batch(&mut g, &[req], 2, 100, &mut |_, _| {}).unwrap();
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
