//! The unit of work every rank of a replica executes: one forward pass over a batch
//! of sequences, each contributing a prefill chunk or a decode token, followed on
//! rank 0 by sampling. Rank 0 keeps each sequence's sampler (penalty counts, seeded
//! RNG), so the tokens it returns are the answer.

use sirocco_model::{Chunk, SeqId};
use sirocco_sampling::SamplingParams;

/// What one sequence does in a step.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqStep {
    pub seq: SeqId,
    /// Tokens continuing the sequence where its cache ends.
    pub tokens: Vec<u32>,
    /// Sample a token after this chunk: it ends the prompt, or it is a decode token.
    pub sample: bool,
    /// Sampling parameters; needed by the first step that samples for the sequence.
    pub params: Option<SamplingParams>,
    /// How many tokens at the end of the input before the first sample were generated
    /// earlier (a request re-admitted after failover): they count as generated for
    /// the penalties and advance the seeded RNG as if sampled here.
    pub replayed: usize,
    /// Return the full-vocabulary logits at the chunk's last token.
    pub return_logits: bool,
    /// Return this many most likely tokens with their log-probabilities.
    pub top_logprobs: usize,
    /// Structured output: the sampled token must be one of these ids, a bitset (id
    /// `i` is bit `i % 32` of word `i / 32`).
    pub allowed: Option<Vec<u32>>,
}

impl SeqStep {
    /// A chunk that only asks for its last-token logits.
    pub fn logits(seq: SeqId, tokens: Vec<u32>) -> Self {
        SeqStep {
            seq,
            tokens,
            sample: false,
            params: None,
            replayed: 0,
            return_logits: true,
            top_logprobs: 0,
            allowed: None,
        }
    }

    pub fn chunk(&self) -> Chunk {
        Chunk {
            seq: self.seq,
            tokens: self.tokens.clone(),
        }
    }
}

/// Rank 0's answer for one sequence of a step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqOutput {
    pub seq: SeqId,
    /// The sampled token, when the step asked for one.
    pub token: Option<u32>,
    /// Its log-probability under the sampling distribution.
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    pub logits: Option<Vec<f32>>,
}
