//! A stub router for the tests: it keeps every GenerateStream request it is sent,
//! answers `max_new_tokens` tokens of ids 100, 101, ... (a request with a constraint:
//! the tokens of `JSON_ANSWER`, ended as complete) and says half of each prompt came
//! from its prefix cache unless the request opted out, so the wire between the bench
//! and a router can be checked without one.

use sirocco_proto::v1 as pb;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The first id of every answer.
pub const FIRST_ANSWER_ID: u32 = 100;

/// The texts of the tokens that answer a constrained request: a complete JSON object.
pub const JSON_ANSWER: &[&str] = &["{\"", "ok", "\":", " true", "}"];

#[derive(Clone, Default)]
pub struct Stub {
    seen: Arc<Mutex<Vec<pb::GenerateRequest>>>,
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

fn event(e: pb::generate_stream_response::Event) -> Result<pb::GenerateStreamResponse, Status> {
    Ok(pb::GenerateStreamResponse {
        event: Some(e),
        sample: 0,
    })
}

#[tonic::async_trait]
impl pb::sirocco_server::Sirocco for Stub {
    async fn generate(&self, _: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    type GenerateStreamStream = Events;

    async fn generate_stream(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Events>, Status> {
        let req = req.into_inner();
        let prompt = match &req.input {
            Some(pb::generate_request::Input::TokenIds(t)) => t.ids.len() as u32,
            _ => return Err(Status::invalid_argument("token ids expected")),
        };
        let params = req.parameters.clone().unwrap_or_default();
        let (n, texts, reason) = match params.constraint {
            Some(_) => (JSON_ANSWER.len() as u32, JSON_ANSWER, pb::FinishReason::Eos),
            None => (params.max_new_tokens.unwrap_or(16), &[][..], pb::FinishReason::Length),
        };
        let cached = if req.prefix_cache == Some(false) { 0 } else { prompt / 2 };
        self.seen.lock().map_err(|_| Status::internal("poisoned"))?.push(req);
        let tokens = (0..n).map(|i| {
            event(pb::generate_stream_response::Event::Token(pb::Token {
                id: FIRST_ANSWER_ID + i,
                text: texts.get(i as usize).map_or(String::new(), |t| t.to_string()),
                ..Default::default()
            }))
        });
        let finished = event(pb::generate_stream_response::Event::Finished(pb::Finished {
            reason: reason.into(),
            prompt_tokens: prompt,
            generated_tokens: n,
            cached_prompt_tokens: cached,
            ..Default::default()
        }));
        let events: Vec<_> = tokens.chain([finished]).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::SessionEvents, Status>> + Send>>;

    async fn session(
        &self,
        _: Request<tonic::Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn tokenize(&self, _: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(pb::ModelInfoResponse {
            vocab_size: 1000,
            max_context: 4096,
            model: "stub".into(),
            ..Default::default()
        }))
    }
}

impl Stub {
    /// Serves on a free local port until the test's runtime ends; returns its address.
    pub async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let service = pb::sirocco_server::SiroccoServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        format!("http://{addr}")
    }

    /// The requests sent since the last call.
    pub fn take(&self) -> Vec<pb::GenerateRequest> {
        self.seen
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }
}
