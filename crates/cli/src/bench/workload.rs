//! The workload: what each request sends. Prompts come from one source (the same
//! text, a dataset, the built-in corpus or random token ids), all drawn from one
//! seeded stream, optionally behind a prefix every prompt shares; the warmup's
//! prompts are drawn first, then the measured ones.

use super::prompts;
use super::BenchArgs;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sirocco_tokenizer::Tokenizer;
use std::path::PathBuf;

/// Token ids below this are the special tokens (unk, BOS, EOS) of Mistral vocabularies.
pub const FIRST_ORDINARY_TOKEN: u32 = 3;

/// What one request sends.
#[derive(Clone, Debug)]
pub enum Prompt {
    Ids(Vec<u32>),
    Text(String),
}

/// Where prompts come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// --prompt: this text, every time.
    Text(String),
    /// --dataset: first human turns of a ShareGPT-style file.
    Dataset(PathBuf),
    /// --corpus, the default with --api openai-chat: sentences of the built-in corpus.
    Corpus,
    /// Random token ids from the model's vocabulary.
    RandomIds,
}

impl Source {
    /// The source the flags ask for (clap keeps --prompt, --dataset and --corpus apart).
    pub fn of(a: &BenchArgs) -> Source {
        match (&a.prompt, &a.dataset) {
            (Some(t), _) => Source::Text(t.clone()),
            (None, Some(path)) => Source::Dataset(path.clone()),
            (None, None) if a.corpus || a.api == super::Api::OpenaiChat => Source::Corpus,
            (None, None) => Source::RandomIds,
        }
    }

    /// Its name in the report.
    pub fn name(&self) -> &'static str {
        match self {
            Source::Text(_) => "text",
            Source::Dataset(_) => "dataset",
            Source::Corpus => "corpus",
            Source::RandomIds => "random_ids",
        }
    }

    /// Whether its prompts are sized by --input-len.
    pub fn sized(&self) -> bool {
        matches!(self, Source::Corpus | Source::RandomIds)
    }
}

/// The prompts of a run.
pub struct Workload {
    pub warmup: Vec<Prompt>,
    pub measured: Vec<Prompt>,
}

/// Draws --warmup plus --num-requests prompts from `source` with `seed`, each behind
/// the --shared-prefix when one is asked for. `vocab` sizes random ids; `tokenizer`
/// sizes corpus text.
pub fn build(
    a: &BenchArgs,
    source: &Source,
    seed: u64,
    vocab: Option<u32>,
    tokenizer: Option<&Tokenizer>,
) -> Result<Workload> {
    let total = a.warmup() + a.num_requests();
    let mut prompts = draw(a, source, &mut ChaCha8Rng::seed_from_u64(seed), total, vocab, tokenizer)?;
    let measured = prompts.split_off(a.warmup());
    Ok(Workload {
        warmup: prompts,
        measured,
    })
}

/// Draws `n` prompts from `source` with `rng`, each behind the --shared-prefix when
/// one is asked for.
pub fn draw(
    a: &BenchArgs,
    source: &Source,
    rng: &mut ChaCha8Rng,
    n: usize,
    vocab: Option<u32>,
    tokenizer: Option<&Tokenizer>,
) -> Result<Vec<Prompt>> {
    let prompts = match source {
        Source::Text(t) => vec![Prompt::Text(t.clone()); n],
        Source::Dataset(path) => prompts::from_dataset(rng, &prompts::dataset_turns(path)?, n),
        Source::Corpus => prompts::corpus(rng, n, a.input_len(), a.input_len_range, tokenizer)?,
        Source::RandomIds => match vocab {
            Some(vocab) if vocab > FIRST_ORDINARY_TOKEN => {
                random_prompts(rng, n, a.input_len(), a.input_len_range, vocab)
            }
            v => bail!("cannot draw random prompts from a vocabulary of {v:?} tokens"),
        },
    };
    let Some(len) = a.shared_prefix.filter(|&n| n > 0) else {
        return Ok(prompts);
    };
    // Drawn after the prompts, from the same stream.
    let prefix = match source {
        Source::Corpus => prompts::corpus(rng, 1, len, 0.0, tokenizer)?,
        _ => random_prompts(rng, 1, len, 0.0, vocab.unwrap_or(0)),
    };
    Ok(with_shared_prefix(prompts, &prefix[0]))
}

/// The shortest and longest prompt, in tokens, for `len` within ±`range` of it.
pub fn length_range(len: usize, range: f64) -> (usize, usize) {
    let lo = ((len as f64 * (1.0 - range)).floor() as usize).max(1);
    let hi = ((len as f64 * (1.0 + range)).ceil() as usize).max(lo);
    (lo, hi)
}

/// `prompts`, each after `prefix` (ids before ids; text before text, a blank line
/// between).
fn with_shared_prefix(prompts: Vec<Prompt>, prefix: &Prompt) -> Vec<Prompt> {
    prompts
        .into_iter()
        .map(|p| match (prefix, p) {
            (Prompt::Ids(pre), Prompt::Ids(own)) => Prompt::Ids(pre.iter().chain(&own).copied().collect()),
            (Prompt::Text(pre), Prompt::Text(own)) => Prompt::Text(format!("{pre}\n\n{own}")),
            (_, own) => own,
        })
        .collect()
}

/// Random token-id prompts: lengths within the jitter range, ids in [3, vocab).
pub(super) fn random_prompts(rng: &mut ChaCha8Rng, n: usize, len: usize, range: f64, vocab: u32) -> Vec<Prompt> {
    let (lo, hi) = length_range(len, range);
    (0..n)
        .map(|_| {
            let l = rng.random_range(lo..=hi);
            Prompt::Ids((0..l).map(|_| rng.random_range(FIRST_ORDINARY_TOKEN..vocab)).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_prompts_are_reproducible_and_in_range() {
        let p1 = random_prompts(&mut ChaCha8Rng::seed_from_u64(7), 20, 10, 0.5, 50);
        let p2 = random_prompts(&mut ChaCha8Rng::seed_from_u64(7), 20, 10, 0.5, 50);
        for (a, b) in p1.iter().zip(&p2) {
            let (Prompt::Ids(a), Prompt::Ids(b)) = (a, b) else {
                panic!("ids expected")
            };
            assert_eq!(a, b);
            assert!((5..=15).contains(&a.len()));
            assert!(a.iter().all(|&t| (3..50).contains(&t)));
        }
    }
}
