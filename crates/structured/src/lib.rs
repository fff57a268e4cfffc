//! Structured output: what a constrained sequence may say next.
//!
//! A request's [`Constraint`] (a JSON Schema, a regular expression, a list of
//! choices or a Lark grammar) is compiled by [`Grammars`] (llguidance over the served
//! tokenizer's vocabulary) when the request is validated, so that a bad or oversized
//! constraint is refused before it is queued. Each sequence then follows its
//! [`Compiled`] grammar with a [`Follower`]: before every sampled token the set of
//! ids that keep the output a prefix of the language ([`Follower::allowed`]), after it
//! the token chosen ([`Follower::commit`]), until the sentence is complete.
//!
//! Crate map: `vocab` (the tokenizer as llguidance sees it), `compile` (constraints,
//! their limits and errors), `follow` (one sequence's progress through its grammar).

mod compile;
mod follow;
mod vocab;

pub use compile::{CompileError, Compiled, Constraint, Grammars, Kind, MAX_CHOICES, MAX_CONSTRAINT_BYTES};
pub use follow::{allows, Follower};

#[cfg(test)]
mod tests;
