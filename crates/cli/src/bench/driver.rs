//! The load driver: releases requests at a fixed concurrency (a closed loop) or with
//! Poisson arrivals, collects their records as they complete, and shows progress.

use super::record::Record;
use super::target::Target;
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

/// Sends every prompt under `load`, its progress shown as `label`; request ids are
/// `bench-{tag}-{i}`.
pub async fn drive(
    target: Arc<Target>,
    prompts: Vec<Prompt>,
    load: Load,
    seed: u64,
    tag: &'static str,
    label: &str,
) -> Run {
    let n = prompts.len();
    let bar = progress(n, label);
    let prompts = Arc::new(prompts);
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    let start = Instant::now();
    match load {
        Load::Closed(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c.min(n) {
                let (target, prompts, next, tx) = (target.clone(), prompts.clone(), next.clone(), tx.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = prompts.get(i) else { break };
                        let _ = tx.send(target.send(i, tag, p).await);
                    }
                });
            }
        }
        Load::Poisson { rate, cap } => {
            let sem = cap.map(|c| Arc::new(Semaphore::new(c)));
            let (target, prompts, tx) = (target.clone(), prompts.clone(), tx.clone());
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
                    let (target, prompts, tx, sem) = (target.clone(), prompts.clone(), tx.clone(), sem.clone());
                    tokio::spawn(async move {
                        // The request's clock starts once it may go, as a client's would.
                        let _permit = match &sem {
                            Some(s) => s.clone().acquire_owned().await.ok(),
                            None => None,
                        };
                        let _ = tx.send(target.send(i, tag, &prompts[i]).await);
                    });
                }
            });
        }
    }
    drop(tx);
    let mut records = Vec::with_capacity(n);
    let mut failed = 0;
    while let Some(r) = rx.recv().await {
        failed += r.error.is_some() as usize;
        bar.inc(1);
        if failed > 0 {
            bar.set_message(format!("{failed} failed"));
        }
        records.push(r);
        if records.len() == n {
            break;
        }
    }
    let elapsed = start.elapsed();
    // A request task that died sent nothing; it still counts, as a failure.
    records.extend((records.len()..n).map(|_| Record {
        error: Some("the request's task ended without a result".into()),
        ..Default::default()
    }));
    bar.finish_and_clear();
    Run { records, elapsed }
}

fn progress(n: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_string());
    bar
}
