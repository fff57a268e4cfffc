//! What a prefix-cache workload sends, drawn from one phase's seeded stream: the
//! shape the flags ask for (`Shape`), the system prompts of the prefix groups, and a
//! script per conversation (its group's system prompt and its user turns). A
//! shared-prefix request is a conversation of one turn.

use crate::bench::workload::{length_range, random_prompts, Prompt, FIRST_ORDINARY_TOKEN};
use crate::bench::{BenchArgs, GroupOrder, WorkloadKind};
use anyhow::{bail, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A prefix-cache workload's sizes, its flags resolved to their defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub kind: WorkloadKind,
    /// Tokens of each system prompt.
    pub prefix_len: usize,
    pub groups: usize,
    pub order: GroupOrder,
    /// Tokens of a question or user turn, and the ± fraction its length varies by.
    pub turn_len: usize,
    pub turn_len_range: f64,
    /// Tokens asked of each answer.
    pub output_len: u32,
    /// Shared-prefix requests, or multi-turn conversations.
    pub conversations: usize,
    /// Turns per conversation (1 for shared-prefix).
    pub turns: usize,
    /// Warmup requests before each phase.
    pub warmup: usize,
}

impl Shape {
    /// The shape of `a`'s workload (shared-prefix or multi-turn).
    pub fn of(a: &BenchArgs) -> Shape {
        let multi = a.workload == WorkloadKind::MultiTurn;
        Shape {
            kind: a.workload,
            prefix_len: a.shared_prefix.unwrap_or(if multi { 256 } else { 1024 }),
            groups: a.prefix_groups.unwrap_or(1),
            order: a.group_order.unwrap_or(GroupOrder::RoundRobin),
            turn_len: a.input_len(),
            turn_len_range: a.input_len_range,
            output_len: a.output_len(),
            conversations: if multi {
                a.conversations.unwrap_or(16)
            } else {
                a.num_requests()
            },
            turns: if multi { a.turns.unwrap_or(6) } else { 1 },
            warmup: a.warmup(),
        }
    }

    /// The longest prompt, in tokens: the last turn's, after every earlier turn and a
    /// full answer to each.
    pub fn longest_prompt(&self) -> usize {
        let (_, hi) = length_range(self.turn_len, self.turn_len_range);
        self.prefix_len + self.turns * hi + self.turns.saturating_sub(1) * self.output_len as usize
    }
}

/// One conversation's script: its system prompt and its user turns, in order. The
/// answers come from the server as the conversation runs.
#[derive(Clone, Debug)]
pub struct Script {
    pub system: Vec<u32>,
    pub user_turns: Vec<Vec<u32>>,
}

impl Script {
    /// The first turn's prompt: the system prompt and the first user turn (all of a
    /// shared-prefix request).
    pub fn first_prompt(&self) -> Prompt {
        let first = self.user_turns.first().map_or(&[][..], Vec::as_slice);
        Prompt::Ids([&self.system[..], first].concat())
    }
}

/// The groups of `n` requests or conversations over `k` groups, in `order`.
fn assign(rng: &mut ChaCha8Rng, n: usize, k: usize, order: GroupOrder) -> Vec<usize> {
    match order {
        GroupOrder::RoundRobin => (0..n).map(|i| i % k).collect(),
        GroupOrder::Random => (0..n).map(|_| rng.random_range(0..k)).collect(),
    }
}

/// Random ids from `rng`, `len` of them, as random_prompts draws them.
fn ids(rng: &mut ChaCha8Rng, len: usize, range: f64, vocab: u32) -> Vec<u32> {
    match random_prompts(rng, 1, len, range, vocab).pop() {
        Some(Prompt::Ids(ids)) => ids,
        _ => Vec::new(),
    }
}

/// The warmup prompts and the conversations of one phase, drawn in that order from
/// `rng`. Warmup prompts are as long as a first turn but share nothing with it, so
/// they warm the server, not its cache.
pub fn draw(rng: &mut ChaCha8Rng, shape: &Shape, vocab: u32) -> Result<(Vec<Prompt>, Vec<Script>)> {
    if vocab <= FIRST_ORDINARY_TOKEN {
        bail!("cannot draw random prompts from a vocabulary of {vocab} tokens");
    }
    let warmup = random_prompts(rng, shape.warmup, shape.prefix_len + shape.turn_len, 0.0, vocab);
    let systems: Vec<Vec<u32>> = (0..shape.groups)
        .map(|_| ids(rng, shape.prefix_len, 0.0, vocab))
        .collect();
    let groups = assign(rng, shape.conversations, shape.groups, shape.order);
    let scripts = groups
        .into_iter()
        .map(|group| Script {
            system: systems[group].clone(),
            user_turns: (0..shape.turns)
                .map(|_| ids(rng, shape.turn_len, shape.turn_len_range, vocab))
                .collect(),
        })
        .collect();
    Ok((warmup, scripts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn shape(kind: WorkloadKind, groups: usize, order: GroupOrder) -> Shape {
        Shape {
            kind,
            prefix_len: 40,
            groups,
            order,
            turn_len: 8,
            turn_len_range: 0.0,
            output_len: 5,
            conversations: 12,
            turns: if kind == WorkloadKind::MultiTurn { 3 } else { 1 },
            warmup: 2,
        }
    }

    fn ids_of(p: &Prompt) -> &[u32] {
        match p {
            Prompt::Ids(ids) => ids,
            Prompt::Text(_) => panic!("ids expected"),
        }
    }

    #[test]
    fn requests_of_a_group_share_exactly_its_system_prompt() {
        for order in [GroupOrder::RoundRobin, GroupOrder::Random] {
            let s = shape(WorkloadKind::SharedPrefix, 3, order);
            let (warmup, scripts) = draw(&mut ChaCha8Rng::seed_from_u64(1), &s, 32000).unwrap();
            assert_eq!(scripts.len(), 12);
            let prompts: Vec<Prompt> = scripts.iter().map(Script::first_prompt).collect();
            let mut systems: Vec<&[u32]> = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                assert_eq!(ids_of(p).len(), 48);
                assert_eq!(ids_of(p)[..40], scripts[i].system[..]);
                if !systems.contains(&&ids_of(p)[..40]) {
                    systems.push(&ids_of(p)[..40]);
                }
                // Two prompts start alike for exactly a system prompt (the same group)
                // or not at all (the questions differ from their first token).
                for q in &prompts[i + 1..] {
                    let common = ids_of(p).iter().zip(ids_of(q)).take_while(|(x, y)| x == y).count();
                    assert!(
                        common == 40 || common == 0,
                        "order {order:?}: {common} tokens in common"
                    );
                }
            }
            assert_eq!(systems.len(), 3, "order {order:?}");
            if order == GroupOrder::RoundRobin {
                assert!((0..12).all(|i| scripts[i].system == scripts[i % 3].system));
            }
            assert_eq!(warmup.len(), 2);
            for w in &warmup {
                assert_eq!(ids_of(w).len(), 48);
                assert!(systems.iter().all(|s| ids_of(w)[..40] != **s));
            }
        }
    }

    #[test]
    fn groups_go_round_robin_or_seeded() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        assert_eq!(assign(&mut rng, 5, 2, GroupOrder::RoundRobin), [0, 1, 0, 1, 0]);
        let a = assign(&mut ChaCha8Rng::seed_from_u64(3), 50, 4, GroupOrder::Random);
        let b = assign(&mut ChaCha8Rng::seed_from_u64(3), 50, 4, GroupOrder::Random);
        assert_eq!(a, b);
        assert!(a.iter().all(|&g| g < 4));
        assert!((0..4).all(|g| a.contains(&g)), "{a:?}");
    }

    #[test]
    fn phases_drawn_from_different_streams_share_nothing() {
        let s = shape(WorkloadKind::MultiTurn, 1, GroupOrder::RoundRobin);
        let stream = |n| {
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            rng.set_stream(n);
            draw(&mut rng, &s, 32000).unwrap().1
        };
        let (off, on, on_again) = (stream(1), stream(2), stream(2));
        assert_ne!(off[0].system, on[0].system);
        assert_eq!(on[0].system, on_again[0].system);
        assert!(on
            .iter()
            .all(|c| c.user_turns.len() == 3 && c.user_turns.iter().all(|t| t.len() == 8)));
    }

    #[test]
    fn the_longest_prompt_is_the_last_turn_after_full_answers() {
        let s = shape(WorkloadKind::MultiTurn, 1, GroupOrder::RoundRobin);
        assert_eq!(s.longest_prompt(), 40 + 3 * 8 + 2 * 5);
        assert_eq!(
            shape(WorkloadKind::SharedPrefix, 1, GroupOrder::RoundRobin).longest_prompt(),
            48
        );
        assert!(draw(&mut ChaCha8Rng::seed_from_u64(1), &s, 3).is_err());
    }
}
