//! Requests over one multiplexed `sirocco.v1.Sirocco/Session` stream: a task owns the
//! stream and hands each event to the request its id names, which times it as it
//! arrives.

use super::grpc::{finished, grpc_request, token};
use super::{Ask, Target};
use crate::bench::record::Record;
use crate::bench::workload::Prompt;
use anyhow::{Context, Result};
use sirocco_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

type Waiting = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<pb::session_event::Event>>>>;

/// The run's session: where requests are sent, and who waits for which id.
pub(super) struct Mux {
    out: mpsc::UnboundedSender<pb::SessionRequest>,
    waiting: Waiting,
}

impl Mux {
    pub(super) async fn open(channel: Channel, bearer: Option<&str>) -> Result<Mux> {
        let (out, rx) = mpsc::unbounded_channel();
        let req = grpc_request(UnboundedReceiverStream::new(rx), bearer).map_err(anyhow::Error::msg)?;
        let mut events = pb::sirocco_client::SiroccoClient::new(channel)
            .session(req)
            .await
            .context("opening a Session stream")?
            .into_inner();
        let waiting: Waiting = Arc::default();
        let w = waiting.clone();
        tokio::spawn(async move {
            while let Ok(Some(batch)) = events.message().await {
                let map = w.lock().unwrap_or_else(|e| e.into_inner());
                for ev in batch.events {
                    if let (Some(tx), Some(e)) = (map.get(&ev.id), ev.event) {
                        let _ = tx.send(e);
                    }
                }
            }
            // The stream ended: every request still waiting fails.
            w.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        Ok(Mux { out, waiting })
    }
}

impl Target {
    pub(super) async fn send_session(
        &self,
        request_id: String,
        prompt: &Prompt,
        ask: &Ask,
        start: Instant,
        rec: &mut Record,
    ) -> Result<(), String> {
        let mux = self.session.as_ref().ok_or("no session is open")?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        mux.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id.clone(), tx);
        let request = self.generate_request(request_id.clone(), prompt, ask);
        let started = mux.out.send(pb::SessionRequest {
            kind: Some(pb::session_request::Kind::Start(pb::SessionStart {
                id: request_id.clone(),
                request: Some(request),
            })),
        });
        let result = match started {
            Err(_) => Err("the session stream is closed".to_string()),
            Ok(()) => {
                let mut last = None;
                loop {
                    match rx.recv().await {
                        Some(pb::session_event::Event::Token(t)) => token(rec, t, start, &mut last),
                        Some(pb::session_event::Event::Finished(f)) => break finished(rec, f, prompt),
                        Some(pb::session_event::Event::Error(e)) => {
                            break Err(format!("{:?}: {}", tonic::Code::from(e.code), e.message))
                        }
                        None => break Err("the session stream ended".to_string()),
                    }
                }
            }
        };
        mux.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request_id);
        result
    }
}
