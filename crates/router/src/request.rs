//! A queued request and what its client hears: the items the queue, the batchers
//! and the frontends share. It imports none of them.

use crate::validation::ValidRequest;
use sirocco_structured::Follower;
use sirocco_tokenizer::StreamDecoder;
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

pub(crate) type EventSender = mpsc::UnboundedSender<Result<Event, Status>>;
pub(crate) type EventReceiver = mpsc::UnboundedReceiver<Result<Event, Status>>;

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
