//! The multi-turn driver: conversations run turn after turn, each turn's prompt the
//! whole conversation so far (system prompt, every earlier user turn and the ids the
//! model answered with) plus the next user turn; at most a given number of
//! conversations in flight. Each record keeps its turn number.

use super::script::Script;
use crate::bench::driver::{collect, died, progress, Batch, Run};
use crate::bench::record::Record;
use crate::bench::target::Target;
use crate::bench::workload::Prompt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// One conversation as it runs: the prompt tokens so far.
struct Chat<'a> {
    script: &'a Script,
    history: Vec<u32>,
}

impl<'a> Chat<'a> {
    fn new(script: &'a Script) -> Chat<'a> {
        Chat {
            script,
            history: script.system.clone(),
        }
    }

    /// The prompt of turn `t` (from 0): the conversation so far and user turn `t`.
    fn prompt(&mut self, t: usize) -> Prompt {
        self.history.extend(&self.script.user_turns[t]);
        Prompt::Ids(self.history.clone())
    }

    /// The model's answer, which the next turn resends.
    fn answer(&mut self, ids: &[u32]) {
        self.history.extend(ids);
    }
}

/// A turn's record as the driver hears of it: sent, or not sent as an earlier turn
/// failed.
struct Heard {
    turn: usize,
    record: Record,
    sent: bool,
}

/// The records of a multi-turn run and, beside each, its turn number (from 1).
pub struct Turns {
    pub run: Run,
    pub turn: Vec<usize>,
}

/// Runs every conversation, `in_flight` at once, as `batch` says; request ids are
/// `bench-{tag}-c{conversation}-t{turn}`. A failed turn ends its conversation; its
/// later turns count as failed, unsent.
pub async fn converse(target: Arc<Target>, scripts: Vec<Script>, in_flight: usize, batch: Batch) -> Turns {
    let turns = scripts.first().map_or(0, |s| s.user_turns.len());
    let n = scripts.len() * turns;
    let bar = progress(n, &batch.label);
    let scripts = Arc::new(scripts);
    let batch = Arc::new(batch);
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::unbounded_channel::<Heard>();
    let start = Instant::now();
    for _ in 0..in_flight.min(scripts.len()) {
        let (target, scripts, next, tx, batch) =
            (target.clone(), scripts.clone(), next.clone(), tx.clone(), batch.clone());
        tokio::spawn(async move {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                let Some(script) = scripts.get(c) else { break };
                let mut chat = Chat::new(script);
                for t in 1..=turns {
                    let id = format!("bench-{}-c{c}-t{t}", batch.tag);
                    let record = target.send(c, id, &chat.prompt(t - 1), &batch.ask(c)).await;
                    chat.answer(&record.output_ids);
                    let failed = record.error.is_some();
                    let _ = tx.send(Heard {
                        turn: t,
                        record,
                        sent: true,
                    });
                    if failed {
                        for turn in t + 1..=turns {
                            let error = format!("not sent: turn {t} of its conversation failed");
                            let record = Record {
                                error: Some(error),
                                ..Default::default()
                            };
                            let _ = tx.send(Heard {
                                turn,
                                record,
                                sent: false,
                            });
                        }
                        break;
                    }
                }
            }
        });
    }
    drop(tx);
    let mut heard = collect(rx, n, &bar, |h| &h.record).await;
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    // The unsent last, so that the report's first errors are the real ones.
    heard.sort_by_key(|h| !h.sent);
    let (mut turn, mut records): (Vec<usize>, Vec<Record>) = heard.into_iter().map(|h| (h.turn, h.record)).unzip();
    // A task that died sent nothing for its turns; they count as failures, of no turn.
    let missing = n - records.len();
    records.extend((0..missing).map(|_| died()));
    turn.extend(std::iter::repeat_n(0, missing));
    Turns {
        run: Run { records, elapsed },
        turn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(p: Prompt) -> Vec<u32> {
        match p {
            Prompt::Ids(ids) => ids,
            Prompt::Text(_) => panic!("ids expected"),
        }
    }

    #[test]
    fn each_turn_resends_the_conversation_and_its_answers() {
        let script = Script {
            system: vec![10, 11, 12],
            user_turns: vec![vec![20, 21], vec![30], vec![40, 41]],
        };
        let mut chat = Chat::new(&script);
        assert_eq!(ids(chat.prompt(0)), [10, 11, 12, 20, 21]);
        chat.answer(&[7, 8]);
        let second = ids(chat.prompt(1));
        assert_eq!(second, [10, 11, 12, 20, 21, 7, 8, 30]);
        chat.answer(&[9]);
        let third = ids(chat.prompt(2));
        assert_eq!(third, [10, 11, 12, 20, 21, 7, 8, 30, 9, 40, 41]);
        // Each prompt starts with the whole previous one: what a prefix cache can serve.
        assert!(third.starts_with(&second));
    }
}
