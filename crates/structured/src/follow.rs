//! One sequence's progress through its grammar.

use llguidance::Matcher;

/// Follows one sequence's output through its grammar.
pub struct Follower {
    matcher: Matcher,
}

impl Follower {
    pub(crate) fn new(matcher: Matcher) -> Self {
        Follower { matcher }
    }

    /// The ids the next token may be, as a bitset (id `i` is bit `i % 32` of word
    /// `i / 32`). Once the sentence is complete only the end-of-sequence id is
    /// allowed. Fails if the grammar can go no further (never for a token it
    /// allowed; a grammar whose language is empty, for one).
    pub fn allowed(&mut self) -> Result<Vec<u32>, String> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        if mask.is_zero() {
            return Err("the constraint allows no token here".into());
        }
        Ok(mask.as_slice().to_vec())
    }

    /// Advances past the token the sampler chose.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// Whether the output is a complete sentence that cannot go on (or the end of
    /// sequence was taken): the sequence is done.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// Whether `token` is in the bitset `allowed` (see [`Follower::allowed`]).
pub fn allows(allowed: &[u32], token: u32) -> bool {
    allowed
        .get(token as usize / 32)
        .is_some_and(|w| w & (1 << (token % 32)) != 0)
}
