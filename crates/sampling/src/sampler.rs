//! The per-sequence sampler: penalty state, the seeded RNG, and the logits-to-token pipeline.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::logprobs::{argmax_with_log_prob, best_first, max_of, sanitize};
use crate::SamplingParams;

/// One sampled token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` under the distribution it was drawn from (after penalties,
    /// temperature and filtering); for greedy decoding, under the softmax of the penalised logits.
    pub logprob: f32,
}

/// Chooses the tokens of one sequence.
///
/// Non-greedy sampling draws exactly one uniform number from the sequence's own ChaCha8 RNG per
/// token and greedy sampling draws none, which is what lets [`Sampler::record`] keep a replayed
/// sequence on the same random stream without needing its logits.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    prompt_tokens: HashSet<u32>,
    generated_counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt_ids` (used by the repetition penalty).
    /// Fails if `params` is out of range.
    pub fn new(params: SamplingParams, prompt_ids: &[u32]) -> Result<Self> {
        params.validate().context("invalid sampling parameters")?;
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        let prompt_tokens = if params.repetition_penalty == 1.0 {
            HashSet::new()
        } else {
            prompt_ids.iter().copied().collect()
        };
        Ok(Self {
            params,
            rng,
            prompt_tokens,
            generated_counts: HashMap::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The logits after the repetition, frequency and presence penalties (NaN replaced by -inf),
    /// before temperature and filtering. Token ids beyond `logits.len()` are ignored.
    pub fn penalized_logits(&self, logits: &[f32]) -> Vec<f32> {
        let mut out: Vec<f32> = logits.iter().map(|&x| sanitize(x)).collect();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let generated_only = self.generated_counts.keys().filter(|t| !self.prompt_tokens.contains(t));
            for &t in self.prompt_tokens.iter().chain(generated_only) {
                if let Some(x) = out.get_mut(t as usize) {
                    // Hugging Face: `where(x < 0, x * penalty, x / penalty)`.
                    *x = if *x < 0.0 {
                        *x * p.repetition_penalty
                    } else {
                        *x / p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &count) in &self.generated_counts {
                if let Some(x) = out.get_mut(t as usize) {
                    *x -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
        out
    }

    /// Picks the next token from full-vocabulary `logits`, applying penalties, temperature,
    /// top-k, top-p and min-p in that order, and records it for the penalties.
    ///
    /// Greedy decoding is argmax with ties going to the lowest id. NaN logits count as -inf. With
    /// no possible token at all (empty or all -inf logits) it returns the lowest-id argmax (0)
    /// with logprob -inf rather than failing.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        // Without penalties the logits are read in place (every step below reads NaN
        // as -inf): a copy of the vocabulary per token saved.
        let penalized = if self.params.has_penalties() {
            std::borrow::Cow::Owned(self.penalized_logits(logits))
        } else {
            std::borrow::Cow::Borrowed(logits)
        };
        let sampled = if self.params.is_greedy() {
            greedy(&penalized)
        } else {
            let u: f64 = self.rng.random();
            self.pick(&penalized, u)
        };
        self.remember(sampled.token);
        sampled
    }

    /// [`Sampler::sample`] restricted to the ids in `allowed` (structured output), a
    /// bitset: id `i` is bit `i % 32` of word `i / 32`, and ids past its end are
    /// excluded. The others count as -inf logits, before penalties and filtering, so
    /// the token and its logprob come from the distribution over allowed ids.
    pub fn sample_allowed(&mut self, logits: &[f32], allowed: Option<&[u32]>) -> Sampled {
        let Some(bits) = allowed else {
            return self.sample(logits);
        };
        let masked: Vec<f32> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let on = bits.get(i / 32).is_some_and(|w| w & (1 << (i % 32)) != 0);
                if on {
                    x
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        self.sample(&masked)
    }

    /// Records a token chosen elsewhere (for instance one already streamed before a failover) as
    /// if [`Sampler::sample`] had returned it: updates the penalties and advances the RNG exactly
    /// as `sample` would have, so a seeded sequence continues identically afterwards.
    pub fn record(&mut self, token: u32) {
        if !self.params.is_greedy() {
            let _: f64 = self.rng.random();
        }
        self.remember(token);
    }

    fn remember(&mut self, token: u32) {
        *self.generated_counts.entry(token).or_insert(0) += 1;
    }

    /// Temperature, top-k, top-p and min-p over `penalized`, then inverse-CDF sampling with `u`
    /// in [0, 1).
    fn pick(&self, penalized: &[f32], u: f64) -> Sampled {
        let p = &self.params;
        let t = f64::from(p.temperature);
        let max = max_of(penalized);
        if max == f32::NEG_INFINITY {
            return greedy(penalized);
        }
        // Candidates as (id, scaled logit). An +inf logit takes all the mass, shared equally.
        let mut cands: Vec<(u32, f32)> = penalized
            .iter()
            .enumerate()
            .filter(|&(_, &x)| x > f32::NEG_INFINITY && (max < f32::INFINITY || x == max))
            .map(|(i, &x)| {
                let scaled = if x == f32::INFINITY {
                    0.0
                } else {
                    (f64::from(x) / t) as f32
                };
                (i as u32, scaled)
            })
            .collect();
        // Scaling by a tiny temperature can overflow to +inf; those tokens are the argmax ones.
        if cands.iter().any(|c| c.1 == f32::INFINITY) {
            cands.retain(|c| c.1 == f32::INFINITY);
            cands.iter_mut().for_each(|c| c.1 = 0.0);
        }

        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, best_first);
            cands.truncate(p.top_k);
        }

        let top = cands.iter().map(|c| f64::from(c.1)).fold(f64::NEG_INFINITY, f64::max);
        // Unnormalised probabilities; the most likely candidate has weight 1.
        let mut weighted: Vec<(u32, f32, f64)> = cands
            .into_iter()
            .map(|(id, x)| (id, x, (f64::from(x) - top).exp()))
            .collect();

        if p.top_p < 1.0 {
            weighted.sort_unstable_by(|a, b| best_first(&(a.0, a.1), &(b.0, b.1)));
            let total: f64 = weighted.iter().map(|w| w.2).sum();
            let target = f64::from(p.top_p) * total;
            let mut cum = 0.0;
            let mut keep = weighted.len();
            for (i, w) in weighted.iter().enumerate() {
                cum += w.2;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            weighted.truncate(keep);
        }

        // min-p is relative to the best remaining candidate, whose weight is 1. Weights that
        // underflowed to 0 go too, so that rounding can never pick an impossible token.
        let threshold = f64::from(p.min_p);
        weighted.retain(|w| w.2 > 0.0 && w.2 >= threshold);

        // A fixed order (by id) makes a seed map to the same token regardless of how the
        // filters above happened to permute the candidates.
        weighted.sort_unstable_by_key(|w| w.0);
        let total: f64 = weighted.iter().map(|w| w.2).sum();
        let target = u * total;
        let mut cum = 0.0;
        let mut chosen = weighted[weighted.len() - 1];
        for w in &weighted {
            cum += w.2;
            if cum > target {
                chosen = *w;
                break;
            }
        }
        Sampled {
            token: chosen.0,
            logprob: (chosen.2 / total).ln() as f32,
        }
    }
}

fn greedy(penalized: &[f32]) -> Sampled {
    match argmax_with_log_prob(penalized) {
        Some((i, logprob)) => Sampled {
            token: i as u32,
            logprob,
        },
        None => Sampled {
            token: 0,
            logprob: f32::NEG_INFINITY,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logprobs::{argmax, log_softmax};

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(1234),
            ..SamplingParams::default()
        }
    }

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p, &[]).unwrap()
    }

    /// Deterministic pseudo-random logits for multi-step tests.
    fn random_logits(rng: &mut ChaCha8Rng, vocab: usize) -> Vec<f32> {
        (0..vocab).map(|_| rng.random_range(-4.0..4.0)).collect()
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn an_allowed_set_is_never_left_whatever_the_logits() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Ids 3, 40 and 70 (ids past the bitset's end are excluded).
        let bits = [1u32 << 3, 1 << (40 - 32), 1 << (70 - 64)];
        for temperature in [0.0, 1.0, 5.0] {
            let mut s = sampler(SamplingParams {
                top_k: 50,
                ..params(temperature)
            });
            for _ in 0..200 {
                let logits = random_logits(&mut rng, 128);
                let t = s.sample_allowed(&logits, Some(&bits)).token;
                assert!([3, 40, 70].contains(&t), "{t} at temperature {temperature}");
            }
        }
        let mut greedy = sampler(params(0.0));
        let mut logits = vec![0.0f32; 80];
        logits[3] = 1.0;
        logits[40] = 2.0;
        logits[5] = 9.0;
        assert_eq!(greedy.sample_allowed(&logits, Some(&bits)).token, 40);
        assert_eq!(greedy.sample_allowed(&logits, None).token, 5);
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties_and_uses_no_randomness() {
        let mut s = sampler(params(0.0));
        let before = s.rng.get_word_pos();
        let logits = [1.0f32, 3.0, 3.0, 2.0];
        let out = s.sample(&logits);
        assert_eq!(out.token, 1);
        assert!(close(out.logprob, log_softmax(&logits)[1]));
        assert_eq!(s.sample(&[0.5, -1.0, 7.0]).token, 2);
        s.record(0);
        assert_eq!(s.rng.get_word_pos(), before, "greedy must not draw");
    }

    #[test]
    fn tiny_temperature_behaves_like_greedy() {
        let logits = [1.0f32, 1.5, 0.2, 1.49];
        for t in [1e-4f32, 1e-20, f32::MIN_POSITIVE] {
            let mut s = sampler(params(t));
            for _ in 0..200 {
                let out = s.sample(&logits);
                assert_eq!(out.token, 1, "temperature {t}");
                assert!(close(out.logprob, 0.0), "temperature {t}: {}", out.logprob);
            }
        }
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let mut data = ChaCha8Rng::seed_from_u64(5);
        let mut s = sampler(SamplingParams {
            top_k: 1,
            ..params(1.3)
        });
        for _ in 0..200 {
            let logits = random_logits(&mut data, 64);
            let out = s.sample(&logits);
            assert_eq!(out.token as usize, argmax(&logits).unwrap());
            assert_eq!(out.logprob, 0.0);
        }
    }

    #[test]
    fn tiny_top_p_keeps_only_the_most_likely_token() {
        let mut data = ChaCha8Rng::seed_from_u64(6);
        let mut s = sampler(SamplingParams {
            top_p: 1e-6,
            ..params(1.0)
        });
        for _ in 0..200 {
            let logits = random_logits(&mut data, 64);
            assert_eq!(s.sample(&logits).token as usize, argmax(&logits).unwrap());
        }
    }

    /// Logits whose softmax is exactly [0.5, 0.3, 0.15, 0.05].
    fn known_logits() -> Vec<f32> {
        [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect()
    }

    /// Draws `n` tokens and returns how often each id came up.
    fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits).token as usize] += 1;
        }
        counts
    }

    /// Checks that `filter` keeps exactly tokens 0 and 1 of `known_logits`, renormalised.
    fn assert_keeps_top_two(p: SamplingParams) {
        let logits = known_logits();
        let mut s = sampler(p.clone());
        let counts = histogram(&mut s, &logits, 2000);
        assert_eq!(&counts[2..], &[0, 0], "{p:?}: {counts:?}");
        assert!(counts[0] > 1000 && counts[1] > 500, "{p:?}: {counts:?}");
        let mut s = sampler(p);
        for _ in 0..50 {
            let out = s.sample(&logits);
            let want = [0.5f32 / 0.8, 0.3 / 0.8][out.token as usize].ln();
            assert!(close(out.logprob, want), "{} vs {}", out.logprob, want);
        }
    }

    #[test]
    fn min_p_drops_tokens_below_its_fraction_of_the_best() {
        // Threshold 0.35 * 0.5 = 0.175 keeps 0.5 and 0.3 and drops 0.15 and 0.05.
        assert_keeps_top_two(SamplingParams {
            min_p: 0.35,
            ..params(1.0)
        });
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        // 0.5 < 0.75 <= 0.5 + 0.3.
        assert_keeps_top_two(SamplingParams {
            top_p: 0.75,
            ..params(1.0)
        });
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        assert_keeps_top_two(SamplingParams {
            top_k: 2,
            ..params(1.0)
        });
        // Larger than the vocabulary: nothing is dropped.
        let mut s = sampler(SamplingParams {
            top_k: 1000,
            ..params(1.0)
        });
        let counts = histogram(&mut s, &known_logits(), 4000);
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        };
        // 999 is outside the vocabulary and must be ignored.
        let mut s = Sampler::new(p, &[0, 1, 999]).unwrap();
        let logits = [2.0f32, -2.0, 3.0, 4.0, 1.0];
        assert_eq!(s.penalized_logits(&logits), vec![1.0, -4.0, 3.0, 4.0, 1.0]);
        s.record(3);
        s.record(3);
        // Generated tokens are penalised once however often they occur.
        assert_eq!(s.penalized_logits(&logits), vec![1.0, -4.0, 3.0, 2.0, 1.0]);
        // And that changes what greedy decoding picks.
        assert_eq!(s.sample(&logits).token, 2);
    }

    #[test]
    fn frequency_penalty_scales_with_generated_count_only() {
        let p = SamplingParams {
            frequency_penalty: 0.5,
            ..params(0.0)
        };
        let mut s = Sampler::new(p, &[0]).unwrap();
        let logits = [2.0f32, -2.0, 3.0, 4.0];
        assert_eq!(s.penalized_logits(&logits), logits.to_vec());
        s.record(2);
        s.record(2);
        s.record(1);
        assert_eq!(s.penalized_logits(&logits), vec![2.0, -2.5, 2.0, 4.0]);
    }

    #[test]
    fn presence_penalty_applies_once_per_generated_token() {
        let p = SamplingParams {
            presence_penalty: 1.5,
            ..params(0.0)
        };
        let mut s = Sampler::new(p, &[3]).unwrap();
        let logits = [2.0f32, -2.0, 3.0, 4.0];
        s.record(2);
        s.record(2);
        s.record(1);
        assert_eq!(s.penalized_logits(&logits), vec![2.0, -3.5, 1.5, 4.0]);
    }

    #[test]
    fn penalties_combine_repetition_first() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params(0.0)
        };
        let mut s = Sampler::new(p, &[0]).unwrap();
        s.record(2);
        s.record(2);
        s.record(1);
        let logits = [2.0f32, -2.0, 3.0, 4.0];
        // id 1: -2*2 - 0.5 - 0.25; id 2: 3/2 - 1.0 - 0.25.
        assert_eq!(s.penalized_logits(&logits), vec![1.0, -4.75, 0.25, 4.0]);
    }

    #[test]
    fn same_seed_reproduces_and_record_keeps_the_stream() {
        let p = SamplingParams {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.9,
            min_p: 0.02,
            frequency_penalty: 0.3,
            repetition_penalty: 1.1,
            seed: Some(42),
            ..SamplingParams::default()
        };
        let mut data = ChaCha8Rng::seed_from_u64(9);
        let steps: Vec<Vec<f32>> = (0..100).map(|_| random_logits(&mut data, 50)).collect();
        let run = |s: &mut Sampler| -> Vec<Sampled> { steps.iter().map(|l| s.sample(l)).collect() };
        let a = run(&mut Sampler::new(p.clone(), &[1, 2, 3]).unwrap());
        let b = run(&mut Sampler::new(p.clone(), &[1, 2, 3]).unwrap());
        assert_eq!(a, b);
        let distinct: HashSet<u32> = a.iter().map(|s| s.token).collect();
        assert!(distinct.len() > 10, "sampling should vary: {distinct:?}");

        // Replaying the first 30 tokens with record() continues exactly like the original run.
        let mut c = Sampler::new(p, &[1, 2, 3]).unwrap();
        for s in &a[..30] {
            c.record(s.token);
        }
        let rest: Vec<Sampled> = steps[30..].iter().map(|l| c.sample(l)).collect();
        assert_eq!(rest, a[30..]);
    }

    #[test]
    fn different_seeds_give_different_streams() {
        let logits = vec![0.0f32; 1000];
        let draw = |seed: Option<u64>| -> Vec<u32> {
            let mut s = sampler(SamplingParams { seed, ..params(1.0) });
            (0..200).map(|_| s.sample(&logits).token).collect()
        };
        let (a, b) = (draw(Some(1)), draw(Some(2)));
        // Uniform over 1000 tokens: about 0.2 coincidences expected.
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 10, "{same} of 200 equal");
        let distinct: HashSet<&u32> = a.iter().collect();
        assert!(distinct.len() > 150, "{}", distinct.len());
        // Unseeded samplers draw their own seeds.
        assert_ne!(draw(None), draw(None));
    }

    /// Pearson chi-square statistic of `counts` against `probs`.
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    #[test]
    fn draws_follow_the_softmax_of_logits_over_temperature() {
        let logits = [0.0f32, 1.0, 2.0, -1.0, 0.5];
        for t in [1.0f32, 2.0] {
            let scaled: Vec<f32> = logits.iter().map(|x| x / t).collect();
            let probs: Vec<f64> = log_softmax(&scaled).iter().map(|&l| f64::from(l).exp()).collect();
            let mut s = sampler(params(t));
            let counts = histogram(&mut s, &logits, 20_000);
            // 4 degrees of freedom: 30 is far beyond the 0.1% critical value (18.5).
            let chi2 = chi_square(&counts, &probs);
            assert!(chi2 < 30.0, "t={t}: chi2 {chi2}, counts {counts:?}");
            // The reported logprob is the one the token was drawn with.
            let out = s.sample(&logits);
            assert!(close(out.logprob, probs[out.token as usize].ln() as f32));
        }
    }

    #[test]
    fn nan_inf_and_empty_logits_do_not_panic() {
        for t in [0.0f32, 1.0] {
            let mut s = sampler(SamplingParams {
                top_p: 0.9,
                min_p: 0.1,
                top_k: 3,
                ..params(t)
            });
            for _ in 0..200 {
                let out = s.sample(&[f32::NAN, 0.0, f32::NAN, 0.1]);
                assert!(out.token == 1 || out.token == 3, "t={t}: {out:?}");
                assert!(out.logprob.is_finite());
            }
            let out = s.sample(&[f32::NAN, f32::NAN]);
            assert_eq!((out.token, out.logprob), (0, f32::NEG_INFINITY));
            let out = s.sample(&[f32::NEG_INFINITY; 3]);
            assert_eq!((out.token, out.logprob), (0, f32::NEG_INFINITY));
            let out = s.sample(&[]);
            assert_eq!((out.token, out.logprob), (0, f32::NEG_INFINITY));
            let out = s.sample(&[1.0, f32::INFINITY, f32::NAN]);
            assert_eq!(out.token, 1);
            assert!(close(out.logprob, 0.0));
        }
    }

    #[test]
    fn new_rejects_invalid_params() {
        let err = Sampler::new(
            SamplingParams {
                top_p: 1.5,
                ..params(1.0)
            },
            &[],
        )
        .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "invalid sampling parameters: top_p must be in (0, 1], got 1.5"
        );
    }
}
