//! The public gRPC service (`sirocco.v1.Sirocco`).

use crate::infer::Infer;
use crate::request::{Event, EventReceiver, EventSender};
use crate::validation::{check_text_bytes, grpc_name, release_memory, tokenize_bounded, validate, RELEASE_AFTER_BYTES};
use sirocco_proto::v1 as pb;
use sirocco_scheduler::FinishReason;
use sirocco_tokenizer::Tokenizer;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub(crate) struct SiroccoService {
    pub(crate) infer: Arc<Infer>,
    pub(crate) tokenizer: Option<Tokenizer>,
    /// How `chat` inputs become prompts.
    pub(crate) chat: sirocco_tokenizer::ChatTemplate,
}

fn request_id<T>(req: &Request<T>) -> String {
    crate::headers::request_id(req.metadata().get("x-request-id").and_then(|v| v.to_str().ok()))
}

/// The gRPC API's gate: calls must carry `key` (when one is set) as a bearer token.
pub(crate) fn check_key(key: Option<String>) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if !crate::headers::authorized(key.as_deref(), given) {
            return Err(Status::unauthenticated(
                "missing or wrong API key (send metadata authorization: Bearer <key>)",
            ));
        }
        Ok(req)
    }
}

fn finish_to_pb(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::StopSequence,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

impl SiroccoService {
    fn top_to_pb(&self, top: &[(u32, f32)]) -> Vec<pb::TopLogprob> {
        top.iter()
            .map(|&(id, logprob)| pb::TopLogprob {
                id,
                text: self
                    .tokenizer
                    .as_ref()
                    .and_then(|t| t.decode(&[id], false).ok())
                    .unwrap_or_default(),
                logprob,
            })
            .collect()
    }

    pub(crate) fn event_to_pb(&self, ev: Event) -> pb::GenerateStreamResponse {
        use pb::generate_stream_response::Event as E;
        let event = match ev {
            Event::Token {
                id,
                text,
                logprob,
                top_logprobs,
            } => E::Token(pb::Token {
                id,
                text,
                logprob,
                top_logprobs: self.top_to_pb(&top_logprobs),
            }),
            Event::Finished {
                reason,
                prompt_tokens,
                generated_tokens,
                stop,
                cached_prompt_tokens,
            } => E::Finished(pb::Finished {
                reason: finish_to_pb(reason) as i32,
                prompt_tokens: prompt_tokens as u32,
                generated_tokens: generated_tokens as u32,
                stop,
                cached_prompt_tokens: cached_prompt_tokens as u32,
            }),
        };
        pb::GenerateStreamResponse {
            event: Some(event),
            sample: 0,
        }
    }

    /// A `chat` input as the text prompt the model's chat template makes of it (the
    /// template writes the special tokens itself); other inputs as they are.
    fn render_chat(&self, mut req: pb::GenerateRequest) -> Result<pb::GenerateRequest, Status> {
        let chat = match req.input.take() {
            Some(pb::generate_request::Input::Chat(chat)) => chat,
            other => {
                req.input = other;
                return Ok(req);
            }
        };
        if chat.messages.is_empty() {
            return Err(Status::invalid_argument(
                "input.chat.messages: the conversation is empty",
            ));
        }
        // Bounded before the template copies the conversation into a prompt.
        let bytes = chat.messages.iter().map(|m| m.content.len()).sum();
        check_text_bytes("input.chat.messages (all contents together)", bytes, &self.infer.model)
            .map_err(Status::invalid_argument)?;
        let messages: Vec<sirocco_tokenizer::ChatMessage> = chat
            .messages
            .into_iter()
            .map(|m| sirocco_tokenizer::ChatMessage {
                role: m.role,
                content: m.content,
                ..Default::default()
            })
            .collect();
        let prompt = self
            .chat
            .render(&messages)
            .map_err(|e| Status::invalid_argument(format!("input.chat: {e:#}")))?;
        req.input = Some(pb::generate_request::Input::Text(prompt));
        req.add_special_tokens = Some(false);
        Ok(req)
    }

    /// Validates and queues a call's request: its id, its sample count, and the
    /// receiver of its events (each under its sample's index).
    fn start(&self, req: Request<pb::GenerateRequest>) -> Result<(String, usize, EventReceiver), Status> {
        let id = request_id(&req);
        let header_timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::headers::grpc_timeout_ms);
        let mut req = req.into_inner();
        // The client's deadline: the shorter of grpc-timeout and the body's timeout_ms.
        req.timeout_ms = match (req.timeout_ms, header_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (senders, rx) = EventSender::samples();
        let (id, n) = self.start_into(req, id, senders)?;
        Ok((id, n, rx))
    }

    /// Validates and queues `req` (request id `id` unless it names one), sample i's
    /// events going to `tx(i)`: its id and sample count.
    pub(crate) fn start_into(
        &self,
        req: pb::GenerateRequest,
        id: String,
        tx: impl FnMut(usize) -> EventSender,
    ) -> Result<(String, usize), Status> {
        let req = match self.render_chat(req) {
            Ok(r) => r,
            Err(status) => {
                self.infer.metrics.request_ended(outcome_of(&status), "none");
                return Err(status);
            }
        };
        let large = matches!(&req.input, Some(pb::generate_request::Input::Text(t)) if t.len() >= RELEASE_AFTER_BYTES);
        let valid = validate(req, id, self.tokenizer.as_ref(), &self.infer.model, &grpc_name);
        if large {
            release_memory();
        }
        let result = valid.map_err(Status::from).and_then(|valid| {
            let (id, n) = (valid.id.clone(), valid.num_samples);
            tracing::info!(request_id = %id, prompt_tokens = valid.prompt_ids.len(), max_new_tokens = valid.max_new_tokens, samples = n, "request queued");
            self.infer.generate_into(valid, tx)?;
            Ok((id, n))
        });
        if let Err(status) = &result {
            self.infer.metrics.request_ended(outcome_of(status), "none");
        }
        result
    }
}

/// The `outcome` label of a request refused with `status`.
pub(crate) fn outcome_of(status: &Status) -> &'static str {
    match status.code() {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::Cancelled => "cancelled",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        _ => "internal",
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::sirocco_server::Sirocco for SiroccoService {
    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let (id, n, mut rx) = self.start(req)?;
        let mut samples = vec![pb::Sample::default(); n];
        let mut open = n;
        while let Some((i, ev)) = rx.recv().await {
            let sample = &mut samples[i as usize];
            match self.event_to_pb(ev?).event {
                Some(pb::generate_stream_response::Event::Token(t)) => {
                    sample.text.push_str(&t.text);
                    sample.tokens.push(t);
                }
                Some(pb::generate_stream_response::Event::Finished(f)) => {
                    sample.finished = Some(f);
                    open -= 1;
                    if open == 0 {
                        // Sample 0 at the top level, and in `samples` too when there are more.
                        let (first, samples) = if n > 1 {
                            (samples[0].clone(), samples)
                        } else {
                            (samples.swap_remove(0), Vec::new())
                        };
                        return Ok(Response::new(pb::GenerateResponse {
                            text: first.text,
                            tokens: first.tokens,
                            finished: first.finished,
                            request_id: id,
                            samples,
                        }));
                    }
                }
                None => {}
            }
        }
        Err(Status::internal("generation ended without a result"))
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (_, _, rx) = self.start(req)?;
        let this = self.clone();
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |(i, ev)| {
            ev.map(|e| pb::GenerateStreamResponse {
                sample: i as u32,
                ..this.event_to_pb(e)
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::SessionEvents, Status>> + Send>>;

    async fn session(
        &self,
        req: Request<tonic::Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // One batch waits for the transport: while the client reads slowly, events
        // gather in the session's backlog and leave in larger batches.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(crate::session::serve(self.clone(), req.into_inner(), tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = req.into_inner();
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this model has no tokenizer"))?;
        let large = req.text.len() >= RELEASE_AFTER_BYTES;
        let ids = tokenize_bounded(
            "text",
            &req.text,
            req.add_special_tokens.unwrap_or(true),
            tok,
            &self.infer.model,
        );
        drop(req);
        if large {
            release_memory();
        }
        let ids = ids.map_err(Status::invalid_argument)?;
        let pieces = ids.iter().map(|&i| tok.id_to_piece(i).unwrap_or_default()).collect();
        Ok(Response::new(pb::TokenizeResponse { ids, pieces }))
    }

    async fn model_info(&self, _req: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let m = &self.infer.model;
        Ok(Response::new(pb::ModelInfoResponse {
            architecture: "MistralForCausalLM".into(),
            sliding_window: m.sliding_window.unwrap_or(0) as u32,
            vocab_size: m.vocab_size as u32,
            max_context: m.max_context as u32,
            tp: m.tp as u32,
            replicas: self.infer.live_replicas.load(std::sync::atomic::Ordering::SeqCst) as u32,
            model: m.name.clone(),
            max_new_tokens_limit: m.max_new_tokens_limit as u32,
            num_attention_heads: m.attention_heads as u32,
            num_key_value_heads: m.kv_heads as u32,
        }))
    }
}
