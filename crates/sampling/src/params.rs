//! The sampling parameters of one request, and their validation.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How the next token of a sequence is chosen. Every knob has a neutral value that disables it;
/// [`Default`] is greedy decoding with no penalties.
///
/// Missing fields deserialize to their [`Default`] values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability mass
    /// reaches `top_p`; in (0, 1], 1 disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely token's; in [0, 1],
    /// 0 disables.
    pub min_p: f32,
    /// Hugging Face repetition penalty, > 0, 1 disables: for every token id seen in the prompt or
    /// generated so far, positive logits are divided by it and negative ones multiplied.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty, in [-2, 2], 0 disables: each logit is lowered by this times the
    /// number of times its token was generated.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty, in [-2, 2], 0 disables: each logit is lowered by this if its token
    /// was generated at least once.
    pub presence_penalty: f32,
    /// Seed of the sequence's RNG; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Plain argmax decoding with no penalties (same as [`Default`]).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether tokens are chosen by argmax, so that no randomness is involved.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether any repetition, frequency or presence penalty changes the logits.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// Checks every field against its allowed range; the error names the field, the range and
    /// the offending value.
    pub fn validate(&self) -> Result<()> {
        // Written as negated "inside the range" tests so that NaN is always rejected.
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("temperature must be a finite number >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            bail!("min_p must be in [0, 1], got {}", self.min_p);
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            bail!("frequency_penalty must be in [-2, 2], got {}", self.frequency_penalty);
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            bail!("presence_penalty must be in [-2, 2], got {}", self.presence_penalty);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(p: SamplingParams) -> String {
        p.validate().unwrap_err().to_string()
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert_eq!(p, SamplingParams::greedy());
        assert!(p.is_greedy());
        p.validate().unwrap();
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.repetition_penalty, 1.0);
        assert_eq!(p.seed, None);
        let hot = SamplingParams {
            temperature: 0.7,
            ..SamplingParams::default()
        };
        assert!(!hot.is_greedy());
    }

    #[test]
    fn validate_names_field_range_and_value() {
        let base = SamplingParams::default;
        assert_eq!(
            err(SamplingParams { top_p: 1.5, ..base() }),
            "top_p must be in (0, 1], got 1.5"
        );
        assert_eq!(
            err(SamplingParams { top_p: 0.0, ..base() }),
            "top_p must be in (0, 1], got 0"
        );
        assert_eq!(
            err(SamplingParams {
                temperature: -0.5,
                ..base()
            }),
            "temperature must be a finite number >= 0, got -0.5"
        );
        assert_eq!(
            err(SamplingParams {
                temperature: f32::NAN,
                ..base()
            }),
            "temperature must be a finite number >= 0, got NaN"
        );
        assert_eq!(
            err(SamplingParams {
                temperature: f32::INFINITY,
                ..base()
            }),
            "temperature must be a finite number >= 0, got inf"
        );
        assert_eq!(
            err(SamplingParams { min_p: 1.01, ..base() }),
            "min_p must be in [0, 1], got 1.01"
        );
        assert_eq!(
            err(SamplingParams {
                repetition_penalty: 0.0,
                ..base()
            }),
            "repetition_penalty must be a finite number > 0, got 0"
        );
        assert_eq!(
            err(SamplingParams {
                frequency_penalty: 2.5,
                ..base()
            }),
            "frequency_penalty must be in [-2, 2], got 2.5"
        );
        assert_eq!(
            err(SamplingParams {
                presence_penalty: f32::NAN,
                ..base()
            }),
            "presence_penalty must be in [-2, 2], got NaN"
        );
        // Range edges are allowed.
        SamplingParams {
            temperature: 2.0,
            top_k: 1_000_000,
            top_p: 1e-6,
            min_p: 1.0,
            repetition_penalty: 0.5,
            frequency_penalty: -2.0,
            presence_penalty: 2.0,
            seed: Some(7),
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn serde_round_trip_and_defaults_for_missing_fields() {
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            seed: Some(42),
            ..SamplingParams::default()
        };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<SamplingParams>(&json).unwrap(), p);
        let partial: SamplingParams = serde_json::from_str(r#"{"temperature": 0.5, "seed": 3}"#).unwrap();
        assert_eq!(
            partial,
            SamplingParams {
                temperature: 0.5,
                seed: Some(3),
                ..SamplingParams::default()
            }
        );
    }
}
