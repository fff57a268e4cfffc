//! The entry point for generation: validated requests are queued with a channel for
//! their events, and the replicas' batchers take them from there.

use crate::queue::Queue;
use crate::request::{Entry, EventReceiver, EventSender, Progress};
use crate::validation::{SampleOf, ValidRequest};
use crate::ModelInfo;
use sirocco_metrics::RouterMetrics;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Status;

pub(crate) struct Infer {
    pub(crate) queue: Arc<Queue>,
    pub(crate) model: ModelInfo,
    /// Replicas currently serving.
    pub(crate) live_replicas: Arc<AtomicUsize>,
    pub(crate) metrics: Arc<RouterMetrics>,
}

impl Infer {
    /// Queues `req`; its events arrive on the returned receiver, each under the
    /// index of its sample (0 unless `num_samples` > 1). Dropping the receiver
    /// cancels the request.
    pub(crate) fn generate(&self, req: ValidRequest) -> Result<EventReceiver, Status> {
        let (senders, rx) = EventSender::samples();
        self.generate_into(req, senders)?;
        Ok(rx)
    }

    /// Queues `req`, its events going to `tx(0)`; a request of n > 1 samples is
    /// queued as n sibling entries, sample i's events going to `tx(i)`, all or none.
    /// Siblings share the prompt (the batcher prefills it once and forks it) and,
    /// with a seed, draw with seed + i.
    pub(crate) fn generate_into(
        &self,
        req: ValidRequest,
        mut tx: impl FnMut(usize) -> EventSender,
    ) -> Result<(), Status> {
        if self.live_replicas.load(Ordering::SeqCst) == 0 {
            return Err(Status::unavailable("no replica is serving"));
        }
        let enqueued = Instant::now();
        let entry = |req: ValidRequest, tx: EventSender| Entry {
            req,
            tx,
            enqueued,
            progress: Progress::default(),
        };
        let n = req.num_samples;
        let entries = if n <= 1 {
            vec![entry(req, tx(0))]
        } else {
            let group = NEXT_GROUP.fetch_add(1, Ordering::Relaxed);
            (0..n)
                .map(|index| {
                    let mut r = req.clone();
                    r.sample = Some(SampleOf { group, index });
                    r.params.seed = req.params.seed.map(|s| s.wrapping_add(index as u64));
                    entry(r, tx(index))
                })
                .collect()
        };
        let id = entries[0].req.id.clone();
        let pushed = self.queue.push_all(entries);
        self.metrics.queue_depth.set(self.queue.len() as i64);
        pushed.map_err(|()| {
            tracing::warn!(request_id = %id, samples = n, "queue full; request refused");
            Status::resource_exhausted(format!(
                "the request queue is full ({} waiting); retry later",
                self.queue.len()
            ))
        })
    }
}

/// Groups of samples get ids of their own, unique in this router.
static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

/// The status of a request whose deadline passed `after` its arrival.
pub(crate) fn deadline_exceeded(after: Duration, waiting: bool) -> Status {
    let where_ = if waiting { "waiting in the queue" } else { "running" };
    Status::deadline_exceeded(format!(
        "the request's deadline (timeout) passed {:.2} s after it arrived, while it was {where_}",
        after.as_secs_f64()
    ))
}

/// Ends the queued requests that may wait no longer: with DEADLINE_EXCEEDED those
/// whose deadline passed (the batchers end running ones), and with `max_wait`, with
/// RESOURCE_EXHAUSTED those that waited longer than that before a replica first
/// took them. Runs until the task is dropped.
pub(crate) async fn expire_queued(queue: Arc<Queue>, metrics: Arc<RouterMetrics>, max_wait: Option<Duration>) {
    // Deadlines are checked every 20 ms; `max_wait` a tenth as often as the bound,
    // so a request waits at most ~10% longer.
    let tick = max_wait.map_or(DEADLINE_TICK, |w| {
        (w / 10)
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
            .min(DEADLINE_TICK)
    });
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let due = queue.expire_deadlines(Instant::now());
        let expired = max_wait.map_or_else(Vec::new, |w| queue.expire(w));
        if due.is_empty() && expired.is_empty() {
            continue;
        }
        metrics.queue_depth.set(queue.len() as i64);
        for e in due {
            tracing::warn!(request_id = %e.req.id, waited_ms = e.enqueued.elapsed().as_millis() as u64, "request's deadline passed in the queue");
            metrics.request_ended("deadline_exceeded", "none");
            e.tx.send(Err(deadline_exceeded(e.enqueued.elapsed(), true)));
        }
        for e in expired {
            tracing::warn!(request_id = %e.req.id, waited_ms = e.enqueued.elapsed().as_millis() as u64, "request waited too long in the queue; refused");
            metrics.request_ended("resource_exhausted", "none");
            e.tx.send(Err(Status::resource_exhausted(format!(
                "the request waited {:.1} s in the queue, over the limit of {:.1} s (--max-queue-wait); retry later",
                e.enqueued.elapsed().as_secs_f64(),
                max_wait.unwrap_or_default().as_secs_f64()
            ))));
        }
    }
}

/// How often queued requests' deadlines are checked.
const DEADLINE_TICK: Duration = Duration::from_millis(20);
