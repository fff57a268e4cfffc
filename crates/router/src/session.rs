//! The multiplexed `Session` RPC: many requests on one bidirectional stream. The
//! client starts requests under ids of its own and cancels them by id; their events
//! come back interleaved, tagged with those ids, in batches of whatever is ready. The
//! batchers send every request's events into the session's one channel, so a token
//! costs one channel hop and a share of one message (a stream per request costs a
//! channel, a task wake-up and an HTTP/2 frame per token).
//!
//! Memory stays bounded whatever the client does: at most [`MAX_RUNNING`] samples
//! (a request is one, or its `num_samples`) run in one session, and at most
//! [`BACKLOG`] events wait for a slow reader before the session stops taking more
//! from its channel (which then holds at most its samples' remaining tokens). The batchers never wait for a session, so a slow
//! reader slows only itself; its cancellations are still read while it lags.

use crate::request::{Event, EventReceiver, EventSender};
use crate::server::SiroccoService;
use sirocco_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Code, Status, Streaming};

/// Samples (a request's, or requests of one) one session may have running at once;
/// a request is refused while this many run.
pub(crate) const MAX_RUNNING: usize = 4096;
/// Events held for a session's reader before it stops taking more.
pub(crate) const BACKLOG: usize = 4096;
/// Events in one `SessionEvents` message at most.
const MAX_BATCH: usize = 512;

/// A running request of the session, by its client's id.
struct Running {
    /// The token of its first sample; sample i's events carry `token + i`.
    token: u64,
    samples: usize,
    /// Samples that have not ended yet.
    open: usize,
    /// Cleared to cancel it.
    live: Arc<AtomicBool>,
}

/// A running request's sample, by the token its events carry.
struct Tagged {
    id: String,
    sample: u32,
    /// Tokens sent, for the count a cancellation reports.
    sent: u32,
}

/// The session's requests: by the client's id, and by the token their events carry
/// (a token is never reused: events of a cancelled request that were already on
/// their way are dropped, even if its id is started again).
#[derive(Default)]
struct Requests {
    by_id: HashMap<String, Running>,
    by_token: HashMap<u64, Tagged>,
    next_token: u64,
}

/// Serves one session until the client has half-closed and every request has ended,
/// or the client goes away (which cancels its running requests).
pub(crate) async fn serve(
    svc: SiroccoService,
    mut inbound: Streaming<pb::SessionRequest>,
    out: mpsc::Sender<Result<pb::SessionEvents, Status>>,
) {
    let (events_tx, mut events): (_, EventReceiver) = mpsc::unbounded_channel();
    let mut requests = Requests::default();
    let mut pending: Vec<pb::SessionEvent> = Vec::new();
    let mut reading = true;
    let cancel_all = |requests: &Requests| {
        for r in requests.by_id.values() {
            r.live.store(false, Ordering::Relaxed);
        }
    };
    loop {
        if !reading && requests.by_id.is_empty() && pending.is_empty() {
            return;
        }
        tokio::select! {
            biased;
            permit = out.reserve(), if !pending.is_empty() => {
                let Ok(permit) = permit else {
                    cancel_all(&requests);
                    return;
                };
                let n = pending.len().min(MAX_BATCH);
                permit.send(Ok(pb::SessionEvents { events: pending.drain(..n).collect() }));
            }
            msg = inbound.next(), if reading => match msg {
                Some(Ok(req)) => on_request(&svc, req, &mut requests, &events_tx, &mut pending),
                Some(Err(status)) => {
                    tracing::info!(error = %status, "session stream broke; its requests are cancelled");
                    cancel_all(&requests);
                    return;
                }
                None => reading = false,
            },
            Some((token, ev)) = events.recv(), if pending.len() < BACKLOG => {
                on_event(&svc, token, ev, &mut requests, &mut pending);
                // A batcher sends a step's events one after another: let it finish
                // (one yield) so that they leave in one batch, not one wake-up each.
                tokio::task::yield_now().await;
                while pending.len() < BACKLOG {
                    match events.try_recv() {
                        Ok((token, ev)) => on_event(&svc, token, ev, &mut requests, &mut pending),
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

fn error(id: String, code: Code, message: String) -> pb::SessionEvent {
    pb::SessionEvent {
        id,
        sample: 0,
        event: Some(pb::session_event::Event::Error(pb::SessionError {
            code: code as i32,
            message,
        })),
    }
}

/// One of a request's events, as the session sends it (nothing for a request that
/// is no longer running).
fn on_event(
    svc: &SiroccoService,
    token: u64,
    ev: Result<Event, Status>,
    requests: &mut Requests,
    pending: &mut Vec<pb::SessionEvent>,
) {
    use pb::generate_stream_response::Event as E;
    let Some(tagged) = requests.by_token.get_mut(&token) else {
        return;
    };
    let sample = tagged.sample;
    let (id, event) = match ev.map(|e| svc.event_to_pb(e).event) {
        Ok(Some(E::Token(t))) => {
            tagged.sent += 1;
            (tagged.id.clone(), pb::session_event::Event::Token(t))
        }
        Ok(Some(E::Finished(f))) => (end(requests, token), pb::session_event::Event::Finished(f)),
        Ok(None) => return,
        Err(status) => (
            end(requests, token),
            pb::session_event::Event::Error(pb::SessionError {
                code: status.code() as i32,
                message: status.message().to_string(),
            }),
        ),
    };
    pending.push(pb::SessionEvent {
        id,
        event: Some(event),
        sample,
    });
}

/// Forgets the sample of `token`, which ended, and its request once every sample
/// has: its request's id.
fn end(requests: &mut Requests, token: u64) -> String {
    let id = requests.by_token.remove(&token).map(|t| t.id).unwrap_or_default();
    if let Some(r) = requests.by_id.get_mut(&id) {
        r.open -= 1;
        if r.open == 0 {
            requests.by_id.remove(&id);
        }
    }
    id
}

fn on_request(
    svc: &SiroccoService,
    req: pb::SessionRequest,
    requests: &mut Requests,
    events: &mpsc::UnboundedSender<(u64, Result<Event, Status>)>,
    pending: &mut Vec<pb::SessionEvent>,
) {
    use pb::session_request::Kind;
    match req.kind {
        Some(Kind::Start(start)) => {
            let id = start.id;
            if id.is_empty() {
                pending.push(error(id, Code::InvalidArgument, "start.id is empty".into()));
            } else if requests.by_id.contains_key(&id) {
                pending.push(error(
                    id.clone(),
                    Code::AlreadyExists,
                    format!("start.id {id:?} names a running request of this session (it goes on)"),
                ));
            } else if requests.by_token.len() >= MAX_RUNNING {
                pending.push(error(
                    id,
                    Code::ResourceExhausted,
                    format!("this session has {MAX_RUNNING} samples running, the most it may"),
                ));
            } else {
                let Some(request) = start.request else {
                    pending.push(error(id, Code::InvalidArgument, "start.request is missing".into()));
                    return;
                };
                let request_id = if request.request_id.is_empty() {
                    uuid::Uuid::new_v4().to_string()
                } else {
                    request.request_id.clone()
                };
                let token = requests.next_token;
                let live = Arc::new(AtomicBool::new(true));
                let started = svc.start_into(request, request_id, |i| {
                    EventSender::new(token + i as u64, events.clone(), live.clone())
                });
                match started {
                    Ok((_, samples)) => {
                        requests.next_token += samples as u64;
                        for sample in 0..samples {
                            let tagged = Tagged {
                                id: id.clone(),
                                sample: sample as u32,
                                sent: 0,
                            };
                            requests.by_token.insert(token + sample as u64, tagged);
                        }
                        let running = Running {
                            token,
                            samples,
                            open: samples,
                            live,
                        };
                        requests.by_id.insert(id, running);
                    }
                    Err(status) => pending.push(error(id, status.code(), status.message().to_string())),
                }
            }
        }
        Some(Kind::Cancel(cancel)) => {
            let id = cancel.id;
            match requests.by_id.remove(&id) {
                Some(r) => {
                    // The batchers see it gone and free its KV.
                    r.live.store(false, Ordering::Relaxed);
                    for sample in 0..r.samples as u64 {
                        // A sample that ended already was reported.
                        let Some(t) = requests.by_token.remove(&(r.token + sample)) else {
                            continue;
                        };
                        pending.push(pb::SessionEvent {
                            id: id.clone(),
                            event: Some(pb::session_event::Event::Finished(pb::Finished {
                                reason: pb::FinishReason::Cancelled as i32,
                                generated_tokens: t.sent,
                                ..Default::default()
                            })),
                            sample: t.sample,
                        });
                    }
                }
                None => pending.push(error(
                    id.clone(),
                    Code::NotFound,
                    format!("cancel.id {id:?} names no running request of this session"),
                )),
            }
        }
        None => pending.push(error(
            String::new(),
            Code::InvalidArgument,
            "a SessionRequest needs `start` or `cancel`".into(),
        )),
    }
}
