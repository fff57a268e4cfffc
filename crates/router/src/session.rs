//! The multiplexed `Session` RPC: many requests on one bidirectional stream. The
//! client starts requests under ids of its own and cancels them by id; their events
//! come back interleaved, tagged with those ids, in batches of whatever is ready (one
//! message for many tokens: less framing and fewer wake-ups per token than a stream
//! per request).
//!
//! Memory stays bounded whatever the client does: at most [`MAX_RUNNING`] requests
//! run in one session, and at most [`BACKLOG`] events wait for a slow reader before
//! the session stops taking more from its requests (whose own channels hold at most
//! their remaining tokens). The batchers never wait for a session, so a slow reader
//! slows only itself; its requests' cancellations are still read while it lags.

use crate::request::{Event, EventReceiver};
use crate::server::SiroccoService;
use futures::FutureExt;
use sirocco_proto::v1 as pb;
use std::collections::HashMap;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};
use tonic::{Code, Status, Streaming};

/// Requests one session may have running at once.
pub(crate) const MAX_RUNNING: usize = 4096;
/// Events held for a session's reader before it stops taking more.
pub(crate) const BACKLOG: usize = 4096;
/// Events in one `SessionEvents` message at most.
const MAX_BATCH: usize = 512;

type Requests = StreamMap<String, UnboundedReceiverStream<Result<Event, Status>>>;

/// Serves one session until the client has half-closed and every request has ended,
/// or the client goes away (which cancels its running requests).
pub(crate) async fn serve(
    svc: SiroccoService,
    mut inbound: Streaming<pb::SessionRequest>,
    out: mpsc::Sender<Result<pb::SessionEvents, Status>>,
) {
    let mut running: Requests = StreamMap::new();
    // Tokens sent per running request, for the count a cancellation reports.
    let mut sent: HashMap<String, u32> = HashMap::new();
    let mut pending: Vec<pb::SessionEvent> = Vec::new();
    let mut reading = true;
    loop {
        if !reading && running.is_empty() && pending.is_empty() {
            return;
        }
        tokio::select! {
            biased;
            permit = out.reserve(), if !pending.is_empty() => {
                let Ok(permit) = permit else {
                    // The client went away: dropping `running` cancels its requests.
                    return;
                };
                let n = pending.len().min(MAX_BATCH);
                permit.send(Ok(pb::SessionEvents { events: pending.drain(..n).collect() }));
            }
            msg = inbound.next(), if reading => match msg {
                Some(Ok(req)) => on_request(&svc, req, &mut running, &mut sent, &mut pending),
                Some(Err(status)) => {
                    tracing::info!(error = %status, "session stream broke; its requests are cancelled");
                    return;
                }
                None => reading = false,
            },
            Some((id, ev)) = running.next(), if pending.len() < BACKLOG => {
                pending.push(event(&svc, id, ev, &mut sent));
                // Whatever else is ready goes in the same batch.
                while pending.len() < BACKLOG {
                    match running.next().now_or_never() {
                        Some(Some((id, ev))) => pending.push(event(&svc, id, ev, &mut sent)),
                        _ => break,
                    }
                }
            }
            else => return,
        }
    }
}

fn error(id: String, code: Code, message: String) -> pb::SessionEvent {
    pb::SessionEvent {
        id,
        event: Some(pb::session_event::Event::Error(pb::SessionError {
            code: code as i32,
            message,
        })),
    }
}

/// One of a request's events as the session sends it.
fn event(
    svc: &SiroccoService,
    id: String,
    ev: Result<Event, Status>,
    sent: &mut HashMap<String, u32>,
) -> pb::SessionEvent {
    use pb::generate_stream_response::Event as E;
    match ev.map(|e| svc.event_to_pb(e).event) {
        Ok(Some(E::Token(t))) => {
            *sent.entry(id.clone()).or_default() += 1;
            pb::SessionEvent {
                id,
                event: Some(pb::session_event::Event::Token(t)),
            }
        }
        Ok(Some(E::Finished(f))) => {
            sent.remove(&id);
            pb::SessionEvent {
                id,
                event: Some(pb::session_event::Event::Finished(f)),
            }
        }
        Ok(None) => pb::SessionEvent { id, event: None },
        Err(status) => {
            sent.remove(&id);
            error(id, status.code(), status.message().to_string())
        }
    }
}

fn on_request(
    svc: &SiroccoService,
    req: pb::SessionRequest,
    running: &mut Requests,
    sent: &mut HashMap<String, u32>,
    pending: &mut Vec<pb::SessionEvent>,
) {
    use pb::session_request::Kind;
    match req.kind {
        Some(Kind::Start(start)) => {
            let id = start.id;
            if id.is_empty() {
                pending.push(error(id, Code::InvalidArgument, "start.id is empty".into()));
            } else if running.contains_key(&id) {
                pending.push(error(
                    id.clone(),
                    Code::AlreadyExists,
                    format!("start.id {id:?} names a running request of this session (it goes on)"),
                ));
            } else if running.len() >= MAX_RUNNING {
                pending.push(error(
                    id,
                    Code::ResourceExhausted,
                    format!("this session has {MAX_RUNNING} requests running, the most it may"),
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
                match svc.start_request(request, request_id, None) {
                    Ok((_, rx)) => {
                        let rx: EventReceiver = rx;
                        running.insert(id, UnboundedReceiverStream::new(rx));
                    }
                    Err(status) => pending.push(error(id, status.code(), status.message().to_string())),
                }
            }
        }
        Some(Kind::Cancel(cancel)) => {
            let id = cancel.id;
            if running.remove(&id).is_some() {
                // Dropping its receiver is what cancels it (the batcher sees the client gone).
                let generated = sent.remove(&id).unwrap_or(0);
                pending.push(pb::SessionEvent {
                    id,
                    event: Some(pb::session_event::Event::Finished(pb::Finished {
                        reason: pb::FinishReason::Cancelled as i32,
                        generated_tokens: generated,
                        ..Default::default()
                    })),
                });
            } else {
                pending.push(error(
                    id.clone(),
                    Code::NotFound,
                    format!("cancel.id {id:?} names no running request of this session"),
                ));
            }
        }
        None => pending.push(error(
            String::new(),
            Code::InvalidArgument,
            "a SessionRequest needs `start` or `cancel`".into(),
        )),
    }
}
