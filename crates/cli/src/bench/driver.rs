//! The load driver: releases requests at a fixed concurrency (a closed loop) or with
//! Poisson arrivals, collects their records as they complete, and shows progress.

use super::record::Record;
use super::target::{Ask, Target};
use super::workload::Prompt;
use super::BenchArgs;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

/// How requests are released.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// A fixed number in flight.
    Closed(usize),
    /// Poisson arrivals (infinite: all at once), optionally capped in flight.
    Poisson { rate: f64, cap: Option<usize> },
}

impl Load {
    /// --concurrency alone is a closed loop; anything else Poisson arrivals, at
    /// --request-rate (all at once without one), capped by --concurrency.
    pub fn of(a: &BenchArgs) -> Load {
        match (a.concurrency, a.request_rate) {
            (Some(c), None) => Load::Closed(c),
            (cap, rate) => Load::Poisson {
                rate: rate.unwrap_or(f64::INFINITY),
                cap,
            },
        }
    }

    /// The most requests in flight at once when `n` are sent.
    pub fn in_flight(self, n: usize) -> usize {
        match self {
            Load::Closed(c) => c,
            Load::Poisson { cap, .. } => cap.unwrap_or(n),
        }
    }
}

/// What a run of requests saw: the records in completion order and the time from the
/// first send to the last completion.
pub struct Run {
    pub records: Vec<Record>,
    pub elapsed: Duration,
}

/// How a batch of prompts is sent: request ids `bench-{tag}-{i}`, progress shown as
/// `label`, and what each request asks beyond its prompt: request i the `asks[i mod
/// len]` (a mixed batch alternates kinds of request).
pub struct Batch {
    pub tag: String,
    pub label: String,
    pub asks: Vec<Ask>,
}

impl Batch {
    /// A batch of requests that ask for nothing but what the flags say.
    pub fn new(tag: &str, label: &str) -> Batch {
        Batch::asking(tag, label, vec![Ask::default()])
    }

    /// A batch whose requests ask, in turn, each of `asks`.
    pub fn asking(tag: &str, label: &str, asks: Vec<Ask>) -> Batch {
        Batch {
            tag: tag.into(),
            label: label.into(),
            asks,
        }
    }

    /// What request `i` asks.
    pub fn ask(&self, i: usize) -> Ask {
        match self.asks.len() {
            0 => Ask::default(),
            n => self.asks[i % n].clone(),
        }
    }

    async fn send(&self, target: &Target, i: usize, prompt: &Prompt) -> Record {
        let id = format!("bench-{}-{i}", self.tag);
        Record {
            index: i,
            ..target.send(i, id, prompt, &self.ask(i)).await
        }
    }
}

/// Sends every prompt under `load`, as `batch` says.
pub async fn drive(target: Arc<Target>, prompts: Vec<Prompt>, load: Load, seed: u64, batch: Batch) -> Run {
    let n = prompts.len();
    let bar = progress(n, &batch.label);
    let prompts = Arc::new(prompts);
    let batch = Arc::new(batch);
    let (tx, rx) = mpsc::unbounded_channel::<Record>();
    let start = Instant::now();
    match load {
        Load::Closed(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c.min(n) {
                let (target, prompts, next, tx, batch) =
                    (target.clone(), prompts.clone(), next.clone(), tx.clone(), batch.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = prompts.get(i) else { break };
                        let _ = tx.send(batch.send(&target, i, p).await);
                    }
                });
            }
        }
        Load::Poisson { rate, cap } => {
            let sem = cap.map(|c| Arc::new(Semaphore::new(c)));
            let (target, prompts, tx, batch) = (target.clone(), prompts.clone(), tx.clone(), batch.clone());
            tokio::spawn(async move {
                // Its own stream, so arrival times do not shift the prompts.
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
                let exp = rand_distr::Exp::new(rate).ok();
                let mut at = start;
                for i in 0..n {
                    if let (Some(exp), true) = (&exp, i > 0 && rate.is_finite()) {
                        at += Duration::from_secs_f64(rng.sample(exp));
                        tokio::time::sleep_until(at).await;
                    }
                    let (target, prompts, tx, sem, batch) =
                        (target.clone(), prompts.clone(), tx.clone(), sem.clone(), batch.clone());
                    tokio::spawn(async move {
                        // The request's clock starts once it may go, as a client's would.
                        let _permit = match &sem {
                            Some(s) => s.clone().acquire_owned().await.ok(),
                            None => None,
                        };
                        let _ = tx.send(batch.send(&target, i, &prompts[i]).await);
                    });
                }
            });
        }
    }
    drop(tx);
    let mut records = collect(rx, n, &bar, |r| r).await;
    let elapsed = start.elapsed();
    // A request task that died sent nothing; it still counts, as a failure.
    records.extend((records.len()..n).map(|_| died()));
    bar.finish_and_clear();
    Run { records, elapsed }
}

/// The record of a request whose task ended without sending one.
pub(super) fn died() -> Record {
    Record {
        error: Some("the request's task ended without a result".into()),
        ..Default::default()
    }
}

/// Receives up to `n` results as they complete, counting them (and the failed ones) on
/// `bar`; `record` is a result's request record. Fewer come back when tasks die.
pub(super) async fn collect<T>(
    mut rx: mpsc::UnboundedReceiver<T>,
    n: usize,
    bar: &ProgressBar,
    record: impl Fn(&T) -> &Record,
) -> Vec<T> {
    let mut results = Vec::with_capacity(n);
    let mut failed = 0;
    while let Some(r) = rx.recv().await {
        failed += record(&r).error.is_some() as usize;
        bar.inc(1);
        if failed > 0 {
            bar.set_message(format!("{failed} failed"));
        }
        results.push(r);
        if results.len() == n {
            break;
        }
    }
    results
}

/// A progress bar of `n` steps on stderr, named `label`.
pub(super) fn progress(n: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_string());
    bar
}
