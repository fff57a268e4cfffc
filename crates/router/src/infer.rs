//! The entry point for generation: validated requests are queued with a channel for
//! their events, and the replicas' batchers take them from there.

use crate::queue::Queue;
use crate::validation::ValidRequest;
use crate::ModelInfo;
use sirocco_metrics::RouterMetrics;
use sirocco_tokenizer::StreamDecoder;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;

pub use sirocco_scheduler::FinishReason as Finish;

/// What a request's client receives, in order: tokens, then one `Finished`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token {
        id: u32,
        text: String,
        logprob: Option<f32>,
        top_logprobs: Vec<(u32, f32)>,
    },
    Finished {
        reason: Finish,
        prompt_tokens: usize,
        generated_tokens: usize,
        stop: String,
    },
}

pub type EventSender = mpsc::UnboundedSender<Result<Event, Status>>;
pub type EventReceiver = mpsc::UnboundedReceiver<Result<Event, Status>>;

/// How far a request got: what its client has been sent. It travels with the
/// request when a failed replica's requests are re-admitted elsewhere.
#[derive(Default)]
pub struct Progress {
    pub generated: Vec<u32>,
    pub decoder: Option<StreamDecoder>,
    /// Text decoded but held back because it could begin a stop sequence.
    pub pending: String,
    /// Replicas that failed under this request.
    pub failovers: u32,
    pub admitted: bool,
    pub last_token_at: Option<Instant>,
}

/// A queued request.
pub struct Entry {
    pub req: ValidRequest,
    pub tx: EventSender,
    pub enqueued: Instant,
    pub progress: Progress,
}

/// Each serving (not draining) replica's load (KV slots reserved by its running requests), so that
/// requests go to the least loaded replica.
#[derive(Default)]
pub struct LoadBoard {
    loads: std::sync::Mutex<std::collections::HashMap<usize, usize>>,
}

impl LoadBoard {
    pub fn set(&self, replica: usize, load: usize) {
        self.loads.lock().unwrap().insert(replica, load);
    }

    pub fn remove(&self, replica: usize) {
        self.loads.lock().unwrap().remove(&replica);
    }

    /// The replicas on the board: those serving and not draining.
    pub fn replicas(&self) -> Vec<usize> {
        self.loads.lock().unwrap().keys().copied().collect()
    }

    /// Whether `replica` carries no more load than any other serving replica.
    pub fn is_least_loaded(&self, replica: usize) -> bool {
        let loads = self.loads.lock().unwrap();
        let mine = loads.get(&replica).copied().unwrap_or(0);
        loads.iter().all(|(&r, &l)| r == replica || mine <= l)
    }
}

/// When each replica last completed a step (a real one or an idle canary): a replica
/// is ready while that is recent.
pub struct Readiness {
    last_ok: std::sync::Mutex<std::collections::HashMap<usize, Instant>>,
    pub window: std::time::Duration,
}

impl Readiness {
    pub fn new(window: std::time::Duration) -> Self {
        Readiness {
            last_ok: Default::default(),
            window,
        }
    }

    pub fn ok(&self, replica: usize) {
        self.last_ok.lock().unwrap().insert(replica, Instant::now());
    }

    pub fn remove(&self, replica: usize) {
        self.last_ok.lock().unwrap().remove(&replica);
    }

    /// Replicas that completed a step within the window.
    pub fn ready_count(&self) -> usize {
        self.last_ok
            .lock()
            .unwrap()
            .values()
            .filter(|t| t.elapsed() <= self.window)
            .count()
    }
}

pub struct Infer {
    pub queue: Arc<Queue>,
    pub model: ModelInfo,
    /// Replicas currently serving.
    pub live_replicas: Arc<AtomicUsize>,
    pub metrics: Arc<RouterMetrics>,
}

impl Infer {
    /// Queues `req`; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub fn generate(&self, req: ValidRequest) -> Result<EventReceiver, Status> {
        if self.live_replicas.load(Ordering::SeqCst) == 0 {
            return Err(Status::unavailable("no replica is serving"));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let entry = Entry {
            req,
            tx,
            enqueued: Instant::now(),
            progress: Progress::default(),
        };
        let pushed = self.queue.push(entry);
        self.metrics.queue_depth.set(self.queue.len() as i64);
        pushed.map_err(|e| {
            tracing::warn!(request_id = %e.req.id, "queue full; request refused");
            Status::resource_exhausted(format!(
                "the request queue is full ({} waiting); retry later",
                self.queue.len()
            ))
        })?;
        Ok(rx)
    }
}

/// Ends, with RESOURCE_EXHAUSTED, each request that waits in `queue` longer than
/// `max_wait` before a replica first takes it; runs until the task is dropped.
pub async fn expire_waiting(queue: Arc<Queue>, metrics: Arc<RouterMetrics>, max_wait: Duration) {
    // Checked a tenth as often as the bound, so a request waits at most ~10% longer.
    let tick = (max_wait / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let expired = queue.expire(max_wait);
        if expired.is_empty() {
            continue;
        }
        metrics.queue_depth.set(queue.len() as i64);
        for e in expired {
            tracing::warn!(request_id = %e.req.id, waited_ms = e.enqueued.elapsed().as_millis() as u64, "request waited too long in the queue; refused");
            metrics.request_ended("resource_exhausted", "none");
            let _ = e.tx.send(Err(Status::resource_exhausted(format!(
                "the request waited {:.1} s in the queue, over the limit of {:.1} s (--max-queue-wait); retry later",
                e.enqueued.elapsed().as_secs_f64(),
                max_wait.as_secs_f64()
            ))));
        }
    }
}
