//! Admission and step composition.

use crate::{KvGeometry, SchedulerConfig};

/// What the planner reads of a running sequence.
pub trait Scheduled {
    /// Tokens the model must read before this sequence decodes: its prompt, plus any
    /// tokens generated before a failover that are replayed.
    fn input_len(&self) -> usize;
    /// How many of those the model has read.
    fn fed(&self) -> usize;

    fn prefilled(&self) -> bool {
        self.fed() >= self.input_len()
    }

    /// How much of its input may be read for now: all of it, unless it holds
    /// before its last token (for samples to fork from it first).
    fn readable(&self) -> usize {
        self.input_len()
    }

    /// Held out of steps for now (admitted, but waiting for the prefix cache to hold
    /// what another sequence is computing).
    fn waiting(&self) -> bool {
        false
    }
}

/// What one sequence does in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Feed the last sampled token and sample the next.
    Decode,
    /// Feed input tokens `start..start + len`; `last` when that ends the input, so
    /// the step samples the first generated token.
    Prefill { start: usize, len: usize, last: bool },
}

/// One sequence's part of a step: `index` into the slice given to [`Planner::plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    pub index: usize,
    pub work: Work,
}

/// A running sequence as preemption sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Lower is more urgent (a request's priority, aged).
    pub urgency: i64,
    /// KV slots it reserves.
    pub kv_slots: usize,
}

/// Decides who joins the batch, who gives up its place, and what each step carries.
#[derive(Clone, Debug)]
pub struct Planner {
    config: SchedulerConfig,
    kv: Option<KvGeometry>,
}

impl Planner {
    /// Without `kv`, admission is bounded by the batch size alone (the executor then
    /// fails a step that runs out of cache).
    pub fn new(config: SchedulerConfig, kv: Option<KvGeometry>) -> Self {
        Planner { config, kv }
    }

    /// Whether another sequence may join a batch of `running` sequences.
    pub fn has_batch_room(&self, running: usize) -> bool {
        running < self.config.max_batch_size
    }

    /// The running sequences (indices into `running`) to preempt so that a waiting
    /// request of `urgency` that may grow to `len` positions gets batch and KV room:
    /// only sequences strictly less urgent than it, the least urgent first and the
    /// latest admitted among equals, no more than needed. `None` when it fits
    /// already, or when preempting all of those would not make room.
    pub fn preemption(&self, running: &[Holder], urgency: i64, len: usize) -> Option<Vec<usize>> {
        let mut in_use: usize = running.iter().map(|h| h.kv_slots).sum();
        let mut count = running.len();
        let fits = |count: usize, in_use: usize| self.has_batch_room(count) && self.kv_fits(in_use, len);
        if fits(count, in_use) {
            return None;
        }
        let mut order: Vec<usize> = (0..running.len()).filter(|&i| running[i].urgency > urgency).collect();
        order.sort_by_key(|&i| std::cmp::Reverse((running[i].urgency, i)));
        let mut victims = Vec::new();
        for i in order {
            victims.push(i);
            count -= 1;
            in_use -= running[i].kv_slots;
            if fits(count, in_use) {
                return Some(victims);
            }
        }
        None
    }

    /// KV slots reserved for a sequence that may grow to `len` positions.
    pub fn kv_slots(&self, len: usize) -> usize {
        self.kv.map_or(0, |kv| kv.slots_needed(len))
    }

    /// Whether a sequence that may grow to `len` positions fits beside the
    /// `in_use` slots that running sequences reserve. Reserving the whole length at
    /// admission means a running sequence never waits for cache.
    pub fn kv_fits(&self, in_use: usize, len: usize) -> bool {
        self.kv
            .is_none_or(|kv| self.kv_slots(len) <= kv.capacity_tokens.saturating_sub(in_use))
    }

    /// The next step: a decode for every sequence past its input (decoding streams
    /// never wait), then input chunks of at most `prefill_chunk` tokens, oldest
    /// sequence first, until `prefill_budget` tokens are planned. `running` is in
    /// admission order, so every sequence becomes the oldest still reading and none
    /// starves.
    pub fn plan<S: Scheduled>(&self, running: &[S]) -> Vec<Planned> {
        let mut plan: Vec<Planned> = running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.prefilled() && !s.waiting())
            .map(|(index, _)| Planned {
                index,
                work: Work::Decode,
            })
            .collect();
        let mut budget = self.config.prefill_budget;
        for (index, s) in running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if s.prefilled() || s.waiting() || s.fed() >= s.readable() {
                continue;
            }
            let start = s.fed();
            let len = (s.readable().min(s.input_len()) - start)
                .min(self.config.prefill_chunk)
                .min(budget);
            budget -= len;
            plan.push(Planned {
                index,
                work: Work::Prefill {
                    start,
                    len,
                    last: start + len == s.input_len(),
                },
            });
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, Default)]
    struct Seq {
        input: usize,
        fed: usize,
        waiting: bool,
        holds: bool,
    }

    impl Scheduled for Seq {
        fn input_len(&self) -> usize {
            self.input
        }
        fn fed(&self) -> usize {
            self.fed
        }
        fn waiting(&self) -> bool {
            self.waiting
        }
        fn readable(&self) -> usize {
            self.input - usize::from(self.holds)
        }
    }

    #[test]
    fn a_sequence_that_holds_reads_up_to_its_last_token_and_samples_nothing() {
        let p = planner(8, 4, 100);
        let mut seq = Seq {
            input: 6,
            holds: true,
            ..Default::default()
        };
        let plan = p.plan(std::slice::from_ref(&seq));
        assert_eq!(
            plan[0].work,
            Work::Prefill {
                start: 0,
                len: 4,
                last: false
            }
        );
        seq.fed = 4;
        assert_eq!(
            p.plan(std::slice::from_ref(&seq))[0].work,
            Work::Prefill {
                start: 4,
                len: 1,
                last: false
            }
        );
        seq.fed = 5;
        assert!(p.plan(std::slice::from_ref(&seq)).is_empty(), "held at its last token");
        seq.holds = false;
        assert_eq!(
            p.plan(&[seq])[0].work,
            Work::Prefill {
                start: 5,
                len: 1,
                last: true
            }
        );
    }

    #[test]
    fn waiting_sequences_get_no_work() {
        let p = planner(8, 4, 100);
        let seqs = vec![
            Seq {
                input: 6,
                fed: 0,
                ..Default::default()
            },
            Seq {
                input: 6,
                fed: 0,
                waiting: true,
                ..Default::default()
            },
            Seq {
                input: 3,
                fed: 3,
                waiting: true,
                ..Default::default()
            },
        ];
        let plan = p.plan(&seqs);
        assert_eq!(plan.iter().map(|p| p.index).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn preemption_takes_the_least_urgent_latest_and_only_what_makes_room() {
        // Batches of 3; 64 KV slots in blocks of 16, a sequence reserving up to 32.
        let p = planner(3, 4, 100);
        let h = |urgency, kv_slots| Holder { urgency, kv_slots };
        // Room already: nothing to do.
        assert_eq!(p.preemption(&[h(5, 16)], 0, 16), None);
        // Batch full: one place, from the least urgent (index 1), latest of equals.
        let full = [h(5, 16), h(9, 16), h(9, 16)];
        assert_eq!(p.preemption(&full, 0, 16), Some(vec![2]));
        // KV short: 64 - 48 leaves 16, a 32-slot request needs two to go.
        let kv = [h(1, 16), h(7, 16), h(3, 16)];
        assert_eq!(p.preemption(&kv[..2], 0, 32), None);
        let kv3 = [h(1, 16), h(7, 16), h(3, 16)];
        assert_eq!(p.preemption(&kv3, 0, 32), Some(vec![1]));
        let busy = [h(1, 32), h(7, 16), h(3, 16)];
        assert_eq!(p.preemption(&busy, 0, 32), Some(vec![1, 2]));
        // Only strictly less urgent sequences give way: equals and more urgent stay.
        assert_eq!(p.preemption(&busy, 3, 32), None);
        assert_eq!(p.preemption(&[h(0, 32), h(0, 32)], 0, 32), None);
    }

    fn planner(max_batch_size: usize, prefill_chunk: usize, prefill_budget: usize) -> Planner {
        let config = SchedulerConfig {
            max_batch_size,
            prefill_chunk,
            prefill_budget,
        };
        let kv = KvGeometry {
            capacity_tokens: 64,
            block_size: 16,
            positions_per_seq: 32,
        };
        Planner::new(config, Some(kv))
    }

    /// Applies a plan the way an executor would.
    fn advance(seqs: &mut [Seq], plan: &[Planned]) {
        for p in plan {
            if let Work::Prefill { start, len, .. } = p.work {
                assert_eq!(start, seqs[p.index].fed, "chunks follow each other");
                seqs[p.index].fed += len;
            }
        }
    }

    #[test]
    fn decodes_come_first_then_chunks_oldest_first_within_the_budget() {
        let p = planner(8, 4, 6);
        let seqs = vec![
            Seq {
                input: 10,
                fed: 2,
                ..Default::default()
            },
            Seq {
                input: 3,
                fed: 3,
                ..Default::default()
            },
            Seq {
                input: 9,
                fed: 0,
                ..Default::default()
            },
            Seq {
                input: 5,
                fed: 0,
                ..Default::default()
            },
        ];
        let plan = p.plan(&seqs);
        assert_eq!(
            plan,
            vec![
                Planned {
                    index: 1,
                    work: Work::Decode
                },
                Planned {
                    index: 0,
                    work: Work::Prefill {
                        start: 2,
                        len: 4,
                        last: false
                    }
                },
                // What the budget has left, even if less than a chunk.
                Planned {
                    index: 2,
                    work: Work::Prefill {
                        start: 0,
                        len: 2,
                        last: false
                    }
                },
            ]
        );
    }

    #[test]
    fn the_chunk_that_ends_the_input_samples() {
        let p = planner(8, 4, 100);
        let plan = p.plan(&[Seq {
            input: 6,
            fed: 4,
            ..Default::default()
        }]);
        assert_eq!(
            plan[0].work,
            Work::Prefill {
                start: 4,
                len: 2,
                last: true
            }
        );
    }

    #[test]
    fn no_sequence_starves_and_the_budget_holds_every_step() {
        let p = planner(8, 5, 7);
        let mut seqs: Vec<Seq> = [23, 1, 12, 40, 3]
            .iter()
            .map(|&n| Seq {
                input: n,
                fed: 0,
                ..Default::default()
            })
            .collect();
        let total: usize = seqs.iter().map(|s| s.input).sum();
        let mut steps = 0;
        while seqs.iter().any(|s| !s.prefilled()) {
            let plan = p.plan(&seqs);
            let prefill: usize = plan
                .iter()
                .map(|p| match p.work {
                    Work::Prefill { len, .. } => len,
                    Work::Decode => 0,
                })
                .sum();
            // Work-conserving: the budget is used up unless every reader's chunk fits.
            let wanted: usize = seqs.iter().map(|s| (s.input - s.fed).min(5)).sum();
            assert_eq!(prefill, wanted.min(7));
            // Each step gives the budget to the oldest sequences still reading.
            let first_reading = seqs.iter().position(|s| !s.prefilled()).unwrap();
            assert!(plan
                .iter()
                .any(|q| q.index == first_reading && matches!(q.work, Work::Prefill { .. })));
            advance(&mut seqs, &plan);
            steps += 1;
            assert!(steps <= total, "every step reads at least one token");
        }
    }

    #[test]
    fn decoding_sequences_decode_every_step_while_others_prefill() {
        let p = planner(8, 2, 2);
        let mut seqs = vec![
            Seq {
                input: 1,
                fed: 1,
                ..Default::default()
            },
            Seq {
                input: 9,
                fed: 0,
                ..Default::default()
            },
        ];
        for _ in 0..4 {
            let plan = p.plan(&seqs);
            assert_eq!(
                plan[0],
                Planned {
                    index: 0,
                    work: Work::Decode
                }
            );
            advance(&mut seqs, &plan);
        }
    }

    #[test]
    fn admission_respects_the_batch_and_kv_room() {
        let p = planner(2, 4, 4);
        assert!(p.has_batch_room(1));
        assert!(!p.has_batch_room(2));
        // Capacity 64, blocks of 16, a window of 32.
        assert_eq!(p.kv_slots(17), 32);
        assert_eq!(p.kv_slots(1000), 32, "a long sequence holds one window");
        assert!(p.kv_fits(32, 1000));
        assert!(!p.kv_fits(48, 17), "32 slots needed, 16 free");
        assert!(p.kv_fits(48, 16));
        assert!(!p.kv_fits(64, 1));
        // Under pressure nothing fits; when running sequences end, room returns.
        assert!(p.kv_fits(0, 1000));
    }

    #[test]
    fn without_kv_geometry_only_the_batch_bounds_admission() {
        let p = Planner::new(SchedulerConfig::default(), None);
        assert!(p.kv_fits(usize::MAX, usize::MAX));
        assert_eq!(p.kv_slots(1 << 20), 0);
    }
}
