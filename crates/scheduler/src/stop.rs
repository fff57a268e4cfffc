//! When a sequence ends, and what text of it a client may see yet.
//!
//! Stop sequences are matched over the detokenized text, so a stop sequence split
//! across tokens is found, and text that could be the start of one is held back
//! until the next tokens show whether it is.

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Reached its `max_new_tokens`.
    Length,
    /// Sampled an end-of-sequence token (and did not ignore it).
    Eos,
    /// Sampled one of its stop token ids, or its text reached a stop sequence.
    Stop,
    /// Its client went away.
    Cancelled,
}

/// What ended a sequence with [`FinishReason::Stop`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopMatch {
    /// Nothing: the sequence ended for another reason.
    None,
    /// One of the request's stop token ids.
    Token(u32),
    /// One of the request's stop sequences (neither it nor what follows is returned).
    Sequence(String),
}

/// A request's stop conditions, borrowed from wherever the request keeps them.
#[derive(Clone, Copy, Debug, Default)]
pub struct StopCriteria<'a> {
    pub max_new_tokens: usize,
    /// The model's end-of-sequence tokens.
    pub eos_ids: &'a [u32],
    pub ignore_eos: bool,
    pub stop_token_ids: &'a [u32],
    pub stop_sequences: &'a [String],
    /// Structured output: the token completed the sentence its constraint allows,
    /// so the sequence ends (as at the end of sequence).
    pub complete: bool,
}

/// The verdict on one sampled token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judged {
    /// Text the client may be sent now.
    pub text: String,
    /// Set when this token ends the sequence.
    pub finish: Option<(FinishReason, StopMatch)>,
}

impl StopCriteria<'_> {
    /// Judges a sampled `token`, the `generated`-th of its sequence, whose text is
    /// `delta`. `pending` carries the text held back between calls (it could begin a
    /// stop sequence). When the sequence ends other than by a stop sequence,
    /// everything held back goes out with the last token, with `flush()` (the
    /// detokenizer's incomplete last character, decoded lossily) appended.
    ///
    /// EOS wins over a stop token id (unless EOS is ignored), and a stop sequence
    /// found in the text wins over both and over the length limit: its text is cut.
    pub fn judge(
        &self,
        token: u32,
        generated: usize,
        delta: &str,
        pending: &mut String,
        flush: impl FnOnce() -> String,
    ) -> Judged {
        pending.push_str(delta);
        let mut finish = if !self.ignore_eos && self.eos_ids.contains(&token) {
            Some((FinishReason::Eos, StopMatch::None))
        } else if self.stop_token_ids.contains(&token) {
            Some((FinishReason::Stop, StopMatch::Token(token)))
        } else if self.complete {
            Some((FinishReason::Eos, StopMatch::None))
        } else if generated >= self.max_new_tokens {
            Some((FinishReason::Length, StopMatch::None))
        } else {
            None
        };
        let stop_hit = self
            .stop_sequences
            .iter()
            .filter_map(|s| pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        let text = if let Some((at, stop)) = stop_hit {
            let text = pending[..at].to_string();
            pending.clear();
            finish = Some((FinishReason::Stop, StopMatch::Sequence(stop.clone())));
            text
        } else if finish.is_some() {
            let mut text = std::mem::take(pending);
            text.push_str(&flush());
            text
        } else {
            let keep = held_back(pending, self.stop_sequences);
            pending.drain(..pending.len() - keep).collect()
        };
        Judged { text, finish }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop
/// sequence: text that must wait for the next token.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 2;

    /// Feeds `(token, text)` pairs; returns what the client saw and how it ended.
    fn run(c: &StopCriteria, tokens: &[(u32, &str)]) -> (String, Option<(FinishReason, StopMatch)>, usize) {
        let mut pending = String::new();
        let mut seen = String::new();
        for (n, (token, delta)) in tokens.iter().enumerate() {
            let j = c.judge(*token, n + 1, delta, &mut pending, || "~".to_string());
            seen.push_str(&j.text);
            if j.finish.is_some() {
                return (seen, j.finish, n + 1);
            }
        }
        (seen, None, tokens.len())
    }

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_stop_sequence_split_across_tokens_is_found_and_cut() {
        let seqs = stops(&["\nUser:"]);
        let c = StopCriteria {
            max_new_tokens: 100,
            stop_sequences: &seqs,
            ..Default::default()
        };
        let (seen, finish, n) = run(&c, &[(10, "Hi"), (11, " there\nU"), (12, "se"), (13, "r: more")]);
        assert_eq!(seen, "Hi there");
        assert_eq!(
            finish,
            Some((FinishReason::Stop, StopMatch::Sequence("\nUser:".into())))
        );
        assert_eq!(n, 4);
    }

    #[test]
    fn held_back_text_is_released_when_it_turns_out_not_to_be_a_stop() {
        let seqs = stops(&["STOP"]);
        let c = StopCriteria {
            max_new_tokens: 100,
            stop_sequences: &seqs,
            ..Default::default()
        };
        let mut pending = String::new();
        let j = c.judge(1, 1, "a ST", &mut pending, String::new);
        assert_eq!(j.text, "a ", "\"ST\" could begin the stop sequence");
        let j = c.judge(2, 2, "AR", &mut pending, String::new);
        assert_eq!(j.text, "STAR");
        assert!(j.finish.is_none());
    }

    #[test]
    fn eos_wins_over_a_stop_token_and_is_ignored_when_asked() {
        let ids = [EOS, 7];
        let eos = [EOS];
        let mut c = StopCriteria {
            max_new_tokens: 100,
            eos_ids: &eos,
            stop_token_ids: &ids,
            ..Default::default()
        };
        assert_eq!(
            run(&c, &[(5, "a"), (EOS, "")]).1,
            Some((FinishReason::Eos, StopMatch::None))
        );
        assert_eq!(run(&c, &[(7, "x")]).1, Some((FinishReason::Stop, StopMatch::Token(7))));
        c.ignore_eos = true;
        assert_eq!(
            run(&c, &[(EOS, "")]).1,
            Some((FinishReason::Stop, StopMatch::Token(EOS))),
            "an ignored EOS still stops as a stop token the request named"
        );
        c.stop_token_ids = &[];
        assert_eq!(run(&c, &[(EOS, ""), (EOS, "")]).1, None);
    }

    #[test]
    fn the_length_limit_ends_with_held_back_text_and_the_flush() {
        let seqs = stops(&["END"]);
        let c = StopCriteria {
            max_new_tokens: 2,
            stop_sequences: &seqs,
            ..Default::default()
        };
        let (seen, finish, n) = run(&c, &[(1, "x"), (2, "EN"), (3, "D")]);
        assert_eq!((seen.as_str(), n), ("xEN~", 2));
        assert_eq!(finish, Some((FinishReason::Length, StopMatch::None)));
    }

    #[test]
    fn the_earliest_stop_sequence_in_the_text_wins() {
        let seqs = stops(&["cd", "b"]);
        let c = StopCriteria {
            max_new_tokens: 100,
            stop_sequences: &seqs,
            ..Default::default()
        };
        let (seen, finish, _) = run(&c, &[(1, "abcd")]);
        assert_eq!(seen, "a");
        assert_eq!(finish, Some((FinishReason::Stop, StopMatch::Sequence("b".into()))));
    }

    #[test]
    fn a_stop_sequence_in_the_last_token_beats_the_length_limit() {
        let seqs = stops(&["!"]);
        let c = StopCriteria {
            max_new_tokens: 1,
            stop_sequences: &seqs,
            ..Default::default()
        };
        let (seen, finish, _) = run(&c, &[(1, "ok!")]);
        assert_eq!(seen, "ok");
        assert_eq!(finish, Some((FinishReason::Stop, StopMatch::Sequence("!".into()))));
    }
}
