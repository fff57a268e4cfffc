//! A queued request and what its client hears: the items the queue, the batchers
//! and the frontends share. It imports none of them.

use crate::validation::ValidRequest;
use sirocco_structured::Follower;
use sirocco_tokenizer::StreamDecoder;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::Status;

use sirocco_scheduler::FinishReason;

/// What a request's client receives, in order: tokens, then one `Finished`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Event {
    Token {
        id: u32,
        text: String,
        logprob: Option<f32>,
        top_logprobs: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        generated_tokens: usize,
        stop: String,
        /// Prompt tokens whose KV came from the prefix cache.
        cached_prompt_tokens: usize,
    },
}

/// A request's events, each under the token its sender was made with: the index
/// of its sample, or in a session, the token the session gave that sample.
pub(crate) type EventReceiver = mpsc::UnboundedReceiver<(u64, Result<Event, Status>)>;

/// Where one sample's events go: a channel it may share (with its request's other
/// samples, or a session's requests), under its own token, while `live` holds.
pub(crate) struct EventSender {
    token: u64,
    tx: mpsc::UnboundedSender<(u64, Result<Event, Status>)>,
    /// Cleared to cancel the request (a session's cancel); shared by its samples.
    live: Arc<AtomicBool>,
}

impl EventSender {
    pub(crate) fn new(
        token: u64,
        tx: mpsc::UnboundedSender<(u64, Result<Event, Status>)>,
        live: Arc<AtomicBool>,
    ) -> Self {
        EventSender { token, tx, live }
    }

    /// A lone request's channel.
    #[cfg(test)]
    pub(crate) fn channel() -> (EventSender, EventReceiver) {
        let (senders, rx) = EventSender::samples();
        (senders(0), rx)
    }

    /// One request's channel: the sender of each of its samples (events under the
    /// sample's index), and the receiver of them all. Dropping it cancels them.
    pub(crate) fn samples() -> (impl Fn(usize) -> EventSender, EventReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let live = Arc::new(AtomicBool::new(true));
        (move |i| EventSender::new(i as u64, tx.clone(), live.clone()), rx)
    }

    /// Sends `ev`; false when the client no longer listens.
    pub(crate) fn send(&self, ev: Result<Event, Status>) -> bool {
        self.live.load(Ordering::Relaxed) && self.tx.send((self.token, ev)).is_ok()
    }

    /// Whether the client went away (or cancelled the request).
    pub(crate) fn is_closed(&self) -> bool {
        !self.live.load(Ordering::Relaxed) || self.tx.is_closed()
    }
}

/// How far a request got: what its client has been sent. It travels with the
/// request when a failed replica's requests are re-admitted elsewhere.
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) generated: Vec<u32>,
    pub(crate) decoder: Option<StreamDecoder>,
    /// Text decoded but held back because it could begin a stop sequence.
    pub(crate) pending: String,
    /// Replicas that failed under this request.
    pub(crate) failovers: u32,
    pub(crate) admitted: bool,
    pub(crate) last_token_at: Option<Instant>,
    /// Structured output: where the output stands in its constraint's grammar (it
    /// has seen every token in `generated`).
    pub(crate) follower: Option<Follower>,
}

/// A queued request.
pub(crate) struct Entry {
    pub(crate) req: ValidRequest,
    pub(crate) tx: EventSender,
    pub(crate) enqueued: Instant,
    pub(crate) progress: Progress,
}
