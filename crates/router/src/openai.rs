//! The OpenAI-compatible HTTP API: `POST /v1/completions`, `POST /v1/chat/completions`
//! (both streaming as server-sent events ending in `data: [DONE]`) and
//! `GET /v1/models`. Requests are translated into the same validated requests the
//! gRPC API queues, so both see the same limits and the same batches.
//!
//! Every body field is either supported or refused by name; nothing is silently
//! ignored (but `user`, which only labels a request). As in vLLM, `prompt` may be
//! token ids, and `ignore_eos` and `return_token_ids` are accepted.

use crate::infer::{Event, Finish, Infer};
use crate::server::outcome_of;
use crate::validation::{check_text_bytes, release_memory, validate, Field, Invalid, RELEASE_AFTER_BYTES};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use sirocco_proto::v1 as pb;
use sirocco_tokenizer::Tokenizer;
use sirocco_tokenizer::{ChatMessage, ChatTemplate};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tonic::{Code, Status};

#[derive(Clone)]
pub struct OpenAiState {
    pub infer: Arc<Infer>,
    pub tokenizer: Option<Tokenizer>,
    pub chat: ChatTemplate,
    pub model_name: String,
    pub api_key: Option<String>,
}

pub fn routes(state: OpenAiState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .with_state(Arc::new(state))
}

/// An error in OpenAI's shape with a fitting HTTP status.
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }

    /// A validation error, its field named as this request's body spells it.
    fn from_invalid(e: Invalid, names: &FieldNames) -> Self {
        Self::invalid(e.message).param(names.name(e.field))
    }

    fn from_status(s: &Status) -> Self {
        let (status, kind) = match s.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        Self::new(status, kind, s.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}});
        (self.status, Json(body)).into_response()
    }
}

/// How one request's body spells the fields validation checks.
struct FieldNames {
    chat: bool,
    /// `max_tokens`, or `max_completion_tokens` when the client sent that.
    max_tokens: &'static str,
}

impl FieldNames {
    fn of(m: &Map<String, Value>, chat: bool) -> Self {
        let sent = |k: &str| m.get(k).is_some_and(|v| !v.is_null());
        FieldNames {
            chat,
            max_tokens: if sent("max_completion_tokens") {
                "max_completion_tokens"
            } else {
                "max_tokens"
            },
        }
    }

    fn name(&self, f: Field) -> &'static str {
        match f {
            Field::Input | Field::InputText | Field::InputTokenIds if self.chat => "messages",
            Field::Input | Field::InputText | Field::InputTokenIds => "prompt",
            Field::MaxNewTokens => self.max_tokens,
            Field::Temperature => "temperature",
            Field::TopP => "top_p",
            Field::MinP => "min_p",
            Field::RepetitionPenalty => "repetition_penalty",
            Field::FrequencyPenalty => "frequency_penalty",
            Field::PresencePenalty => "presence_penalty",
            Field::StopSequences => "stop",
            Field::StopTokenIds => "stop_token_ids",
            Field::Logprobs => "logprobs",
            // Completions ask for top log-probabilities with `logprobs: n`.
            Field::TopLogprobs if self.chat => "top_logprobs",
            Field::TopLogprobs => "logprobs",
        }
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn check_key(state: &OpenAiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else { return Ok(()) };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given != Some(key.as_str()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key (send Authorization: Bearer <key>)",
        ));
    }
    Ok(())
}

/// The body as a JSON object, with every key checked against `allowed`.
fn parse_body(body: &Bytes, allowed: &[&str], refused: &[(&str, &str)]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(map) = v else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "the body must be a JSON object",
        ));
    };
    for k in map.keys() {
        if let Some((_, why)) = refused.iter().find(|(name, _)| name == k) {
            if !map[k].is_null() {
                return Err(ApiError::invalid(format!("parameter `{k}` is not supported by sirocco: {why}")).param(k));
            }
        } else if !allowed.contains(&k.as_str()) {
            return Err(ApiError::invalid(format!("parameter `{k}` is not supported by sirocco")).param(k));
        }
    }
    Ok(map)
}

fn get_f32(m: &Map<String, Value>, k: &str) -> Result<Option<f32>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                format!("`{k}` must be a number"),
            )
            .param(k)
        }),
    }
}

fn get_u64(m: &Map<String, Value>, k: &str) -> Result<Option<u64>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                format!("`{k}` must be a non-negative integer"),
            )
            .param(k)
        }),
    }
}

fn get_bool(m: &Map<String, Value>, k: &str) -> Result<bool, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            format!("`{k}` must be a boolean"),
        )
        .param(k)),
    }
}

fn get_stop(m: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match m.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("`stop` must be a string or a list of strings").param("stop")),
        Some(_) => Err(ApiError::invalid("`stop` must be a string or a list of strings").param("stop")),
    }
}

/// Fields both endpoints share, mapped onto sirocco's sampling parameters.
fn common_params(m: &Map<String, Value>, state: &OpenAiState) -> Result<pb::SamplingParameters, ApiError> {
    if let Some(model) = m.get("model").and_then(|v| v.as_str()) {
        if model != state.model_name {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "model `{model}` is not served here; this server serves `{}`",
                    state.model_name
                ),
            )
            .param("model"));
        }
    }
    if let Some(n) = get_u64(m, "n")? {
        if n != 1 {
            return Err(ApiError::invalid(format!(
                "`n` must be 1 (sirocco returns one choice per request), got {n}"
            ))
            .param("n"));
        }
    }
    let max_tokens = match get_u64(m, "max_completion_tokens")? {
        Some(x) => Some(x),
        None => get_u64(m, "max_tokens")?,
    };
    // OpenAI's default temperature is 1, and its range 0 to 2.
    let temperature = get_f32(m, "temperature")?.unwrap_or(1.0);
    if temperature > 2.0 {
        return Err(
            ApiError::invalid(format!("`temperature` must be in [0, 2], got {temperature}")).param("temperature"),
        );
    }
    let stop_token_ids = match m.get("stop_token_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("`stop_token_ids` must be a list of token ids").param("stop_token_ids"))?,
        Some(_) => {
            return Err(ApiError::invalid("`stop_token_ids` must be a list of token ids").param("stop_token_ids"))
        }
    };
    Ok(pb::SamplingParameters {
        max_new_tokens: max_tokens.map(|x| x.min(u32::MAX as u64) as u32),
        temperature: Some(temperature),
        top_p: get_f32(m, "top_p")?,
        top_k: get_u64(m, "top_k")?.map(|x| x as u32),
        min_p: get_f32(m, "min_p")?,
        repetition_penalty: get_f32(m, "repetition_penalty")?,
        frequency_penalty: get_f32(m, "frequency_penalty")?,
        presence_penalty: get_f32(m, "presence_penalty")?,
        seed: get_u64(m, "seed")?,
        stop_sequences: get_stop(m)?,
        stop_token_ids,
        ignore_eos: get_bool(m, "ignore_eos")?,
        logprobs: false,
        top_logprobs: 0,
    })
}

const COMMON_ALLOWED: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "n",
    "stream",
    "stream_options",
    "stop",
    "stop_token_ids",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "return_token_ids",
    "user",
    "logprobs",
];

const COMMON_REFUSED: &[(&str, &str)] = &[
    ("logit_bias", "logit biases are not implemented"),
    ("best_of", "only one sequence is generated per request"),
    ("tools", "tool calling is not implemented"),
    ("tool_choice", "tool calling is not implemented"),
    ("functions", "function calling is not implemented"),
    ("function_call", "function calling is not implemented"),
    ("response_format", "structured output is not implemented"),
    ("parallel_tool_calls", "tool calling is not implemented"),
    ("echo", "echoing the prompt is not implemented"),
    ("suffix", "insertion is not implemented"),
    ("audio", "audio is not supported"),
    ("modalities", "only text is supported"),
    ("prediction", "predicted outputs are not implemented"),
];

fn include_usage(m: &Map<String, Value>) -> bool {
    m.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

fn finish_str(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::Eos | Finish::Stop => "stop",
        Finish::Cancelled => "abort",
    }
}

struct Gen {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    tops: Vec<Vec<(u32, f32)>>,
    finish: Finish,
    prompt_tokens: usize,
}

/// A whole (non-streaming) response with its one choice and its usage.
fn whole_response(
    object: &str,
    id: &str,
    created: u64,
    model: &str,
    mut choice: Value,
    g: &Gen,
    return_ids: bool,
) -> Response {
    if return_ids {
        choice["token_ids"] = json!(g.ids);
    }
    Json(json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": [choice],
        "usage": usage(g.prompt_tokens, g.ids.len()),
    }))
    .into_response()
}

/// The last chunk of a stream that asked for usage: no choices, just the counts.
fn usage_chunk_from(mut chunk: Value, prompt: usize, completion: usize) -> Value {
    chunk["choices"] = json!([]);
    chunk["usage"] = usage(prompt, completion);
    chunk
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Queues the request; the receiver yields its events.
fn start(
    state: &OpenAiState,
    headers: &HeaderMap,
    input: pb::generate_request::Input,
    add_special: bool,
    params: pb::SamplingParameters,
    names: &FieldNames,
) -> Result<crate::infer::EventReceiver, ApiError> {
    let id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let req = pb::GenerateRequest {
        input: Some(input),
        parameters: Some(params),
        add_special_tokens: Some(add_special),
        request_id: id,
    };
    let valid = validate(
        req,
        String::new(),
        state.tokenizer.as_ref(),
        &state.infer.model,
        &|f: Field| names.name(f),
    )
    .map_err(|e| {
        state.infer.metrics.request_ended("invalid_argument", "none");
        ApiError::from_invalid(e, names)
    })?;
    tracing::info!(request_id = %valid.id, prompt_tokens = valid.prompt_ids.len(), max_new_tokens = valid.max_new_tokens, api = "openai", "request queued");
    state.infer.generate(valid).map_err(|s| {
        state.infer.metrics.request_ended(outcome_of(&s), "none");
        ApiError::from_status(&s)
    })
}

async fn collect(mut rx: crate::infer::EventReceiver) -> Result<Gen, ApiError> {
    let mut g = Gen {
        text: String::new(),
        ids: Vec::new(),
        logprobs: Vec::new(),
        tops: Vec::new(),
        finish: Finish::Length,
        prompt_tokens: 0,
    };
    while let Some(ev) = rx.recv().await {
        match ev.map_err(|s| ApiError::from_status(&s))? {
            Event::Token {
                id,
                text,
                logprob,
                top_logprobs,
            } => {
                g.text.push_str(&text);
                g.ids.push(id);
                g.logprobs.push(logprob.unwrap_or(0.0));
                g.tops.push(top_logprobs);
            }
            Event::Finished {
                reason, prompt_tokens, ..
            } => {
                g.finish = reason;
                g.prompt_tokens = prompt_tokens;
                return Ok(g);
            }
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "generation ended without a result",
    ))
}

fn token_text(state: &OpenAiState, id: u32) -> String {
    state
        .tokenizer
        .as_ref()
        .and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_default()
}

/// Completions-style logprobs for tokens `ids`.
fn completion_logprobs(state: &OpenAiState, ids: &[u32], lps: &[f32], tops: &[Vec<(u32, f32)>]) -> Value {
    let tokens: Vec<String> = ids.iter().map(|&i| token_text(state, i)).collect();
    let mut offset = 0;
    let text_offset: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let at = offset;
            offset += t.len();
            at
        })
        .collect();
    let top: Vec<Value> = tops
        .iter()
        .map(|t| Value::Object(t.iter().map(|&(i, lp)| (token_text(state, i), json!(lp))).collect()))
        .collect();
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": text_offset})
}

/// Chat-style logprobs for tokens `ids`.
fn chat_logprobs(state: &OpenAiState, ids: &[u32], lps: &[f32], tops: &[Vec<(u32, f32)>]) -> Value {
    let content: Vec<Value> = ids
        .iter()
        .zip(lps)
        .zip(tops)
        .map(|((&i, &lp), t)| {
            let text = token_text(state, i);
            json!({
                "token": text,
                "logprob": lp,
                "bytes": text.as_bytes(),
                "top_logprobs": t.iter().map(|&(ti, tlp)| {
                    let tt = token_text(state, ti);
                    json!({"token": tt, "logprob": tlp, "bytes": tt.as_bytes()})
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"content": content})
}

async fn models(State(state): State<Arc<OpenAiState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    check_key(&state, &headers)?;
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
    check_key(&state, &headers)?;
    let mut allowed = COMMON_ALLOWED.to_vec();
    allowed.push("prompt");
    let m = parse_body(&body, &allowed, COMMON_REFUSED)?;
    drop(body);
    let names = FieldNames::of(&m, false);
    let mut params = common_params(&m, &state)?;
    // Completions default to 16 tokens, as OpenAI's do.
    params.max_new_tokens.get_or_insert(16);
    let n_logprobs = get_u64(&m, "logprobs")?;
    if let Some(n) = n_logprobs {
        params.logprobs = true;
        params.top_logprobs = n as u32;
    }
    let input = match m.get("prompt") {
        Some(Value::String(s)) => pb::generate_request::Input::Text(s.clone()),
        Some(Value::Array(a)) if a.iter().all(|x| x.is_u64()) && !a.is_empty() => {
            pb::generate_request::Input::TokenIds(pb::TokenIds {
                ids: a.iter().map(|x| x.as_u64().unwrap_or(0).min(u32::MAX as u64) as u32).collect(),
            })
        }
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            pb::generate_request::Input::Text(a[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid("`prompt` must be a string, one string in a list, or a list of token ids (batches of prompts are not supported; send one request each)").param("prompt"))
        }
        _ => return Err(ApiError::invalid("`prompt` is required: a string or a list of token ids").param("prompt")),
    };
    let return_ids = get_bool(&m, "return_token_ids")?;
    let stream = get_bool(&m, "stream")?;
    let usage_chunk = include_usage(&m);
    let rx = start(&state, &headers, input, true, params, &names)?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now();
    let model = state.model_name.clone();
    if !stream {
        let g = collect(rx).await?;
        let choice = json!({
            "index": 0,
            "text": g.text,
            "finish_reason": finish_str(g.finish),
            "logprobs": if n_logprobs.is_some() { completion_logprobs(&state, &g.ids, &g.logprobs, &g.tops) } else { Value::Null },
        });
        return Ok(whole_response(
            "text_completion",
            &id,
            created,
            &model,
            choice,
            &g,
            return_ids,
        ));
    }
    let st = state.clone();
    let chunk = move |choice: Value| json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [choice]});
    let events = sse_events(rx, usage_chunk, move |ev| match ev {
        StreamItem::Token {
            id: tok,
            text,
            logprob,
            top,
        } => {
            let mut c = json!({"index": 0, "text": text, "finish_reason": null, "logprobs": null});
            if n_logprobs.is_some() {
                c["logprobs"] = completion_logprobs(&st, &[tok], &[logprob], &[top]);
            }
            if return_ids {
                c["token_ids"] = json!([tok]);
            }
            Some(chunk(c))
        }
        StreamItem::Finish(f) => Some(chunk(
            json!({"index": 0, "text": "", "finish_reason": finish_str(f), "logprobs": null}),
        )),
        StreamItem::Usage(p, c) => Some(usage_chunk_from(chunk(json!(null)), p, c)),
        StreamItem::Start => None,
    });
    Ok(Sse::new(events).into_response())
}

/// What a streaming response is made of, in order.
enum StreamItem {
    Start,
    Token {
        id: u32,
        text: String,
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    Finish(Finish),
    Usage(usize, usize),
}

/// Turns a request's events into SSE `data:` lines: `render` makes each JSON chunk;
/// an error mid-stream becomes an error object; `[DONE]` ends it.
fn sse_events(
    rx: crate::infer::EventReceiver,
    include_usage: bool,
    render: impl Fn(StreamItem) -> Option<Value> + Send + 'static,
) -> impl futures::Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let first = render(StreamItem::Start).map(data);
    let rest = futures::stream::unfold(
        (rx, false, 0usize, render),
        move |(mut rx, done, n, render)| async move {
            if done {
                return None;
            }
            let data = |v: Value| SseEvent::default().data(v.to_string());
            match rx.recv().await {
                Some(Ok(Event::Token {
                    id,
                    text,
                    logprob,
                    top_logprobs,
                })) => {
                    let v = render(StreamItem::Token {
                        id,
                        text,
                        logprob: logprob.unwrap_or(0.0),
                        top: top_logprobs,
                    });
                    Some((v.map(data).into_iter().collect::<Vec<_>>(), (rx, false, n + 1, render)))
                }
                Some(Ok(Event::Finished {
                    reason,
                    prompt_tokens,
                    generated_tokens,
                    ..
                })) => {
                    let mut out: Vec<SseEvent> = render(StreamItem::Finish(reason)).map(data).into_iter().collect();
                    if include_usage {
                        out.extend(render(StreamItem::Usage(prompt_tokens, generated_tokens)).map(data));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    Some((out, (rx, true, n, render)))
                }
                Some(Err(s)) => {
                    let e = ApiError::from_status(&s);
                    let v = json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": null}});
                    Some((vec![data(v), SseEvent::default().data("[DONE]")], (rx, true, n, render)))
                }
                None => None,
            }
        },
    );
    futures::StreamExt::flat_map(
        futures::stream::iter(first.into_iter().map(|e| vec![e])).chain(rest),
        |v| futures::stream::iter(v.into_iter().map(Ok)),
    )
}

use futures::StreamExt as _;

async fn chat_completions(State(state): State<Arc<OpenAiState>>, headers: HeaderMap, body: Bytes) -> Response {
    let large = body.len() >= RELEASE_AFTER_BYTES;
    let r = chat_inner(state, headers, body).await;
    if large {
        release_memory();
    }
    r.unwrap_or_else(IntoResponse::into_response)
}

/// A message's text: a string, or a list of `{"type": "text", "text": ...}` parts.
fn message_text(i: usize, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| {
                match (
                    p.get("type").and_then(|t| t.as_str()),
                    p.get("text").and_then(|t| t.as_str()),
                ) {
                    (Some("text"), Some(t)) => Ok(t.to_string()),
                    _ => Err(
                        ApiError::invalid(format!("messages[{i}].content: only text parts are supported"))
                            .param("messages"),
                    ),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join("")),
        _ => Err(ApiError::invalid(format!(
            "messages[{i}].content must be a string or a list of text parts"
        ))
        .param("messages")),
    }
}

async fn chat_inner(state: Arc<OpenAiState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(&state, &headers)?;
    let mut allowed = COMMON_ALLOWED.to_vec();
    allowed.extend(["messages", "top_logprobs", "max_completion_tokens"]);
    let m = parse_body(&body, &allowed, COMMON_REFUSED)?;
    drop(body);
    let names = FieldNames::of(&m, true);
    let mut params = common_params(&m, &state)?;
    let want_logprobs = get_bool(&m, "logprobs")?;
    params.logprobs = want_logprobs;
    params.top_logprobs = get_u64(&m, "top_logprobs")?.map_or(0, |n| n.min(u32::MAX as u64) as u32);
    if params.max_new_tokens.is_none() {
        // No limit given: as much as the context leaves, capped by the router's limit.
        params.max_new_tokens = Some(state.infer.model.max_new_tokens_limit.min(1024) as u32);
    }
    let messages: Vec<ChatMessage> = match m.get("messages") {
        Some(Value::Array(a)) => {
            a.iter()
                .enumerate()
                .map(|(i, x)| {
                    let role = x.get("role").and_then(|r| r.as_str()).ok_or_else(|| {
                        ApiError::invalid(format!("messages[{i}].role is required")).param("messages")
                    })?;
                    let content = message_text(i, x.get("content").unwrap_or(&Value::Null))?;
                    Ok(ChatMessage {
                        role: role.to_string(),
                        content,
                    })
                })
                .collect::<Result<_, ApiError>>()?
        }
        _ => return Err(ApiError::invalid("`messages` is required: a list of messages").param("messages")),
    };
    // Bounded before the template copies the conversation into a prompt.
    check_text_bytes(
        "messages (all contents together)",
        messages.iter().map(|x| x.content.len()).sum(),
        &state.infer.model,
    )
    .map_err(|e| ApiError::invalid(e).param("messages"))?;
    let prompt = state
        .chat
        .render(&messages)
        .map_err(|e| ApiError::invalid(format!("{e:#}")).param("messages"))?;
    let return_ids = get_bool(&m, "return_token_ids")?;
    let stream = get_bool(&m, "stream")?;
    let usage_chunk = include_usage(&m);
    let rx = start(
        &state,
        &headers,
        pb::generate_request::Input::Text(prompt),
        false,
        params,
        &names,
    )?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now();
    let model = state.model_name.clone();
    if !stream {
        let g = collect(rx).await?;
        let choice = json!({
            "index": 0,
            "message": {"role": "assistant", "content": g.text},
            "finish_reason": finish_str(g.finish),
            "logprobs": if want_logprobs { chat_logprobs(&state, &g.ids, &g.logprobs, &g.tops) } else { Value::Null },
        });
        return Ok(whole_response(
            "chat.completion",
            &id,
            created,
            &model,
            choice,
            &g,
            return_ids,
        ));
    }
    let st = state.clone();
    let chunk = move |choice: Value| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]});
    let events = sse_events(rx, usage_chunk, move |ev| match ev {
        StreamItem::Start => Some(chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}),
        )),
        StreamItem::Token {
            id: tok,
            text,
            logprob,
            top,
        } => {
            let mut c = json!({"index": 0, "delta": {"content": text}, "finish_reason": null, "logprobs": null});
            if want_logprobs {
                c["logprobs"] = chat_logprobs(&st, &[tok], &[logprob], &[top]);
            }
            if return_ids {
                c["token_ids"] = json!([tok]);
            }
            Some(chunk(c))
        }
        StreamItem::Finish(f) => Some(chunk(
            json!({"index": 0, "delta": {}, "finish_reason": finish_str(f), "logprobs": null}),
        )),
        StreamItem::Usage(p, c) => Some(usage_chunk_from(chunk(json!(null)), p, c)),
    });
    Ok(Sse::new(events).into_response())
}
