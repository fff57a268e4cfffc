//! The handlers: each checks the API key, parses and validates its body, queues the
//! request and answers, whole or streamed.

use super::error::ApiError;
use super::request::{parse_chat, parse_completion, FieldNames, Scheduling};
use super::response::{
    chat_logprobs, collect, completion_logprobs, finish_str, sse_events, usage_chunk_from, whole_response, StreamItem,
    Usage,
};
use super::tool_calls::{self, CallReader};
use crate::infer::Infer;
use crate::request::EventReceiver;
use crate::server::outcome_of;
use crate::validation::{check_text_bytes, release_memory, validate, Field, Invalid, RELEASE_AFTER_BYTES};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Sse;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sirocco_proto::v1 as pb;
use sirocco_tokenizer::{ChatTemplate, Tokenizer};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone)]
pub(crate) struct OpenAiState {
    pub(crate) infer: Arc<Infer>,
    pub(crate) tokenizer: Option<Tokenizer>,
    pub(crate) chat: ChatTemplate,
    pub(crate) model_name: String,
    pub(crate) api_key: Option<String>,
}

pub(crate) fn routes(state: OpenAiState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .with_state(Arc::new(state))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Refuses a request without the API key (when one is set).
pub(super) fn check_key(api_key: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    if !crate::headers::authorized(api_key, given) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key (send Authorization: Bearer <key>)",
        ));
    }
    Ok(())
}

/// A validation error, its field named as this request's body spells it.
fn from_invalid(e: Invalid, names: &FieldNames) -> ApiError {
    ApiError::invalid(e.message).param(names.name(e.field))
}

/// Validates and queues the request, `samples` samples of it; the receiver yields
/// their events. `rank` asks for every sample's log-probabilities, for `best_of`.
#[allow(clippy::too_many_arguments)]
fn start(
    state: &OpenAiState,
    headers: &HeaderMap,
    input: pb::generate_request::Input,
    add_special: bool,
    params: pb::SamplingParameters,
    scheduling: &Scheduling,
    samples: usize,
    rank: bool,
    names: &FieldNames,
) -> Result<EventReceiver, ApiError> {
    let id = crate::headers::request_id(headers.get("x-request-id").and_then(|v| v.to_str().ok()));
    let req = pb::GenerateRequest {
        input: Some(input),
        parameters: Some(params),
        add_special_tokens: Some(add_special),
        request_id: id,
        prefix_cache: scheduling.prefix_cache,
        priority: scheduling.priority,
        timeout_ms: scheduling.timeout_ms,
        num_samples: Some(samples.min(u32::MAX as usize) as u32),
    };
    let mut valid = validate(
        req,
        String::new(),
        state.tokenizer.as_ref(),
        &state.infer.model,
        &|f: Field| names.name(f),
    )
    .map_err(|e| {
        state.infer.metrics.request_ended("invalid_argument", "none");
        from_invalid(e, names)
    })?;
    valid.logprobs |= rank;
    tracing::info!(request_id = %valid.id, prompt_tokens = valid.prompt_ids.len(), max_new_tokens = valid.max_new_tokens, samples, api = "openai", "request queued");
    state.infer.generate(valid).map_err(|s| {
        state.infer.metrics.request_ended(outcome_of(&s), "none");
        ApiError::from_status(&s)
    })
}

async fn models(State(state): State<Arc<OpenAiState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    check_key(state.api_key.as_deref(), &headers)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "sirocco",
            "max_model_len": state.infer.model.max_context,
        }]
    })))
}

async fn completions(State(state): State<Arc<OpenAiState>>, headers: HeaderMap, body: Bytes) -> Response {
    let large = body.len() >= RELEASE_AFTER_BYTES;
    let r = completions_inner(state, headers, body).await;
    if large {
        release_memory();
    }
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn completions_inner(state: Arc<OpenAiState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(state.api_key.as_deref(), &headers)?;
    let p = parse_completion(body, &state.model_name)?;
    let (want_logprobs, return_ids) = (p.logprobs, p.return_token_ids);
    let rank = p.best_of > p.n;
    let rx = start(
        &state,
        &headers,
        p.input,
        true,
        p.params,
        &p.scheduling,
        p.best_of,
        rank,
        &p.names,
    )?;
    let answer = Answer {
        api: Api::Completion,
        n: p.n,
        samples: p.best_of,
        stream: p.stream,
        include_usage: p.include_usage,
        logprobs: want_logprobs,
        return_ids,
        tools: None,
    };
    answer.send(&state, rx).await
}

async fn chat_completions(State(state): State<Arc<OpenAiState>>, headers: HeaderMap, body: Bytes) -> Response {
    let large = body.len() >= RELEASE_AFTER_BYTES;
    let r = chat_inner(state, headers, body).await;
    if large {
        release_memory();
    }
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_inner(state: Arc<OpenAiState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(state.api_key.as_deref(), &headers)?;
    let mut p = parse_chat(body, &state.model_name)?;
    let messages = std::mem::take(&mut p.input);
    let tools = std::mem::take(&mut p.tools);
    if p.params.max_new_tokens.is_none() {
        // No limit given: as much as the context leaves, capped by the router's limit.
        p.params.max_new_tokens = Some(state.infer.model.max_new_tokens_limit.min(1024) as u32);
    }
    if tools.constrain(&mut p.params, state.tokenizer.as_ref())? {
        // A grammar of calls that does not compile fails on a tool's parameters.
        p.names.constrained_by("tools");
    }
    // Bounded before the template copies the conversation into a prompt.
    check_text_bytes(
        "messages (all contents together)",
        messages.iter().map(|x| x.text_bytes()).sum(),
        &state.infer.model,
    )
    .map_err(|e| ApiError::invalid(e).param("messages"))?;
    let prompt = state
        .chat
        .render_with_tools(&messages, tools.offered())
        .map_err(|e| ApiError::invalid(format!("{e:#}")).param("messages"))?;
    drop(messages);
    let (want_logprobs, return_ids) = (p.logprobs, p.return_token_ids);
    let rx = start(
        &state,
        &headers,
        pb::generate_request::Input::Text(prompt),
        false,
        p.params,
        &p.scheduling,
        p.n,
        false,
        &p.names,
    )?;
    let answer = Answer {
        api: Api::Chat,
        n: p.n,
        samples: p.n,
        stream: p.stream,
        include_usage: p.include_usage,
        logprobs: want_logprobs,
        return_ids,
        tools: tools.reader(state.tokenizer.as_ref()),
    };
    answer.send(&state, rx).await
}

/// Which endpoint answers: the two differ only in the shape of a choice.
#[derive(Clone, Copy)]
enum Api {
    Completion,
    Chat,
}

impl Api {
    fn id_prefix(self) -> &'static str {
        match self {
            Api::Completion => "cmpl",
            Api::Chat => "chatcmpl",
        }
    }

    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    fn logprobs(self, tokenizer: Option<&Tokenizer>, ids: &[u32], logprobs: &[f32], tops: &[Vec<(u32, f32)>]) -> Value {
        match self {
            Api::Completion => completion_logprobs(tokenizer, ids, logprobs, tops),
            Api::Chat => chat_logprobs(tokenizer, ids, logprobs, tops),
        }
    }

    /// A choice carrying `text`: the whole answer, or one streamed piece of it.
    fn choice(self, text: &str, stream: bool) -> Value {
        match (self, stream) {
            (Api::Completion, _) => json!({"index": 0, "text": text, "finish_reason": null, "logprobs": null}),
            (Api::Chat, false) => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": null, "logprobs": null})
            }
            (Api::Chat, true) => {
                json!({"index": 0, "delta": {"content": text}, "finish_reason": null, "logprobs": null})
            }
        }
    }

    /// The streamed choice that ends the answer.
    fn finish_choice(self, f: sirocco_scheduler::FinishReason) -> Value {
        match self {
            Api::Completion => json!({"index": 0, "text": "", "finish_reason": finish_str(f), "logprobs": null}),
            Api::Chat => json!({"index": 0, "delta": {}, "finish_reason": finish_str(f), "logprobs": null}),
        }
    }

    /// The streamed choice that opens the answer, where the API has one.
    fn start_choice(self) -> Option<Value> {
        match self {
            Api::Completion => None,
            Api::Chat => Some(
                json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}),
            ),
        }
    }
}

/// How a request asked to be answered.
struct Answer {
    api: Api,
    /// Choices returned.
    n: usize,
    /// Samples generated: `n`, or more for `best_of` (the `n` most likely return).
    samples: usize,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    return_ids: bool,
    /// Where the model may call tools: what finds the calls in its answer.
    tools: Option<CallReader>,
}

/// A streamed token whose chunk is not sent yet: its id and log-probabilities.
type Held = (u32, f32, Vec<(u32, f32)>);

/// `choice` as the choice of index `index`.
fn indexed(mut choice: Value, index: usize) -> Value {
    choice["index"] = json!(index);
    choice
}

impl Answer {
    /// The whole answer once generation ends, or a stream of server-sent events.
    async fn send(self, state: &Arc<OpenAiState>, rx: EventReceiver) -> Result<Response, ApiError> {
        let Answer {
            api,
            n,
            samples,
            stream,
            include_usage,
            logprobs,
            return_ids,
            tools,
        } = self;
        let id = format!("{}-{}", api.id_prefix(), uuid::Uuid::new_v4().simple());
        let created = now();
        let model = state.model_name.clone();
        if !stream {
            let mut gens = collect(rx, samples, |id, text| match &tools {
                Some(r) => r.spell(id, &text).into_owned(),
                None => text,
            })
            .await?;
            let mut usage = Usage::default();
            for (i, g) in gens.iter().enumerate() {
                usage.add_sample(g.usage, i == 0);
            }
            if samples > n {
                // best_of: the n samples of highest log-probability, best first.
                gens.sort_by(|a, b| b.total_logprob().total_cmp(&a.total_logprob()));
                gens.truncate(n);
            }
            let choices = gens
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let mut choice = indexed(api.choice(&g.text, false), i);
                    choice["finish_reason"] = json!(finish_str(g.finish));
                    if let Some(calls) = tools.as_ref().and_then(|r| r.calls(&g.text)) {
                        choice["message"] = tool_calls::message(&calls);
                        choice["finish_reason"] = json!("tool_calls");
                    }
                    if logprobs {
                        choice["logprobs"] = api.logprobs(state.tokenizer.as_ref(), &g.ids, &g.logprobs, &g.tops);
                    }
                    if return_ids {
                        choice["token_ids"] = json!(g.ids);
                    }
                    choice
                })
                .collect();
            return Ok(whole_response(api.object(false), &id, created, &model, choices, usage));
        }
        let st = state.clone();
        let object = api.object(true);
        let chunk = move |choice: Value| json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
        // A chunk's choice with the tokens it carries, where the request asked for them.
        let with_tokens = move |mut c: Value, held: Vec<Held>| {
            let ids: Vec<u32> = held.iter().map(|h| h.0).collect();
            if logprobs {
                let lps: Vec<f32> = held.iter().map(|h| h.1).collect();
                let tops: Vec<Vec<(u32, f32)>> = held.into_iter().map(|h| h.2).collect();
                c["logprobs"] = api.logprobs(st.tokenizer.as_ref(), &ids, &lps, &tops);
            }
            if return_ids {
                c["token_ids"] = json!(ids);
            }
            c
        };
        // Each choice finds its own calls and holds its own tokens back.
        let mut calls: Vec<_> = (0..samples).map(|_| tools.clone().map(CallReader::stream)).collect();
        let mut held: Vec<Vec<Held>> = vec![Vec::new(); samples];
        let events = sse_events(rx, samples, include_usage, move |ev| match ev {
            StreamItem::Start { index } => api
                .start_choice()
                .map(|c| chunk(indexed(c, index)))
                .into_iter()
                .collect(),
            StreamItem::Token {
                index,
                id: tok,
                text,
                logprob,
                top,
            } => {
                held[index].push((tok, logprob, top));
                let text = match &mut calls[index] {
                    Some(c) => match c.push(tok, &text) {
                        Some(t) => t,
                        None => return Vec::new(),
                    },
                    None => text,
                };
                let choice = indexed(api.choice(&text, true), index);
                vec![chunk(with_tokens(choice, std::mem::take(&mut held[index])))]
            }
            StreamItem::Finish { index, reason } => {
                let mut out = Vec::new();
                let mut finish = indexed(api.finish_choice(reason), index);
                match calls[index].as_mut().map(|c| c.finish()) {
                    Some(Ok(made)) => {
                        for (k, delta) in tool_calls::deltas(&made).into_iter().enumerate() {
                            let mut c =
                                json!({"index": index, "delta": delta, "finish_reason": null, "logprobs": null});
                            // The tokens held back go out with the first call.
                            if k == 0 {
                                c = with_tokens(c, std::mem::take(&mut held[index]));
                            }
                            out.push(chunk(c));
                        }
                        finish["finish_reason"] = json!("tool_calls");
                    }
                    Some(Err(text)) if !text.is_empty() || !held[index].is_empty() => {
                        let choice = indexed(api.choice(&text, true), index);
                        out.push(chunk(with_tokens(choice, std::mem::take(&mut held[index]))));
                    }
                    _ => {}
                }
                out.push(chunk(finish));
                out
            }
            StreamItem::Usage(u) => vec![usage_chunk_from(chunk(json!(null)), u)],
        });
        Ok(Sse::new(events).into_response())
    }
}
