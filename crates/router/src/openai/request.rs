//! A completions or chat body parsed and checked field by field, before the shared
//! validation ([`crate::validation`]) sees it. Every refusal names the body field at
//! fault ([`FieldError`]); only a body that is not a JSON object has no field to name.

use super::error::ApiError;
use super::tools::{self, Tools};
use crate::validation::Field;
use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::{Map, Value};
use sirocco_proto::v1 as pb;
use sirocco_tokenizer::ChatMessage;

/// A body field the router refuses: its name as the body spells it, and why.
#[derive(Debug, PartialEq)]
pub(super) struct FieldError {
    pub(super) field: String,
    pub(super) message: String,
    status: StatusCode,
}

impl FieldError {
    /// A value the router does not accept (400).
    pub(super) fn invalid(field: &str, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
            status: StatusCode::BAD_REQUEST,
        }
    }

    /// A value of the wrong JSON type (422).
    pub(super) fn wrong_type(field: &str, message: impl Into<String>) -> Self {
        FieldError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            ..Self::invalid(field, message)
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::new(e.status, "invalid_request_error", e.message).param(&e.field)
    }
}

/// Which endpoint a body was sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

/// A body that passed the field checks; `I` is what the model is asked to continue
/// (a completions prompt, or a chat conversation still to be rendered).
pub(super) struct Parsed<I> {
    pub(super) input: I,
    /// The sampling parameters; a chat request without a token limit gets its
    /// default from the route (it depends on the model).
    pub(super) params: pb::SamplingParameters,
    /// Whether the answer carries log-probabilities.
    pub(super) logprobs: bool,
    pub(super) return_token_ids: bool,
    pub(super) stream: bool,
    /// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
    pub(super) include_usage: bool,
    /// How the request is scheduled (extensions to OpenAI's API).
    pub(super) scheduling: Scheduling,
    /// Choices to return (`n`, default 1).
    pub(super) n: usize,
    /// Samples to generate, of which the `n` most likely are returned (`best_of`,
    /// completions only; default `n`).
    pub(super) best_of: usize,
    /// A chat request's tools (none for completions).
    pub(super) tools: Tools,
    /// How this body spells the fields the shared validation checks.
    pub(super) names: FieldNames,
}

/// Parses a `/v1/completions` body for a server serving `served_model`.
pub(super) fn parse_completion(
    body: Bytes,
    served_model: &str,
) -> Result<Parsed<pb::generate_request::Input>, ApiError> {
    parse(body, Endpoint::Completions, served_model, prompt)
}

/// Parses a `/v1/chat/completions` body for a server serving `served_model`.
pub(super) fn parse_chat(body: Bytes, served_model: &str) -> Result<Parsed<Vec<ChatMessage>>, ApiError> {
    parse(body, Endpoint::Chat, served_model, messages)
}

fn parse<I>(
    body: Bytes,
    endpoint: Endpoint,
    served_model: &str,
    input: impl FnOnce(&Map<String, Value>) -> Result<I, FieldError>,
) -> Result<Parsed<I>, ApiError> {
    let chat = endpoint == Endpoint::Chat;
    let mut allowed = COMMON_ALLOWED.to_vec();
    let mut refused = COMMON_REFUSED.to_vec();
    allowed.extend(super::constraint::FIELDS);
    if chat {
        allowed.extend(["messages", "top_logprobs", "max_completion_tokens"]);
        allowed.extend(tools::FIELDS);
        refused.push((
            "best_of",
            "`best_of` is a completions parameter (/v1/completions); use `n`",
        ));
    } else {
        allowed.extend(["prompt", "best_of"]);
        refused.extend(tools::FIELDS.map(|f| (f, "tool calling is a chat feature (/v1/chat/completions)")));
    }
    let m = parse_body(&body, &allowed, &refused)?;
    drop(body);
    let mut names = FieldNames::of(&m, chat);
    let mut params = common_params(&m, served_model)?;
    if let Some((c, field)) = super::constraint::parse(&m)? {
        params.constraint = Some(c);
        names.constraint = field;
    }
    let logprobs = if chat {
        let want = get_bool(&m, "logprobs")?;
        params.logprobs = want;
        params.top_logprobs = get_u64(&m, "top_logprobs")?.map_or(0, |n| n.min(u32::MAX as u64) as u32);
        want
    } else {
        // Completions default to 16 tokens, as OpenAI's do.
        params.max_new_tokens.get_or_insert(16);
        // Completions ask for top log-probabilities with `logprobs: n`.
        let n = get_u64(&m, "logprobs")?;
        if let Some(n) = n {
            params.logprobs = true;
            params.top_logprobs = n as u32;
        }
        n.is_some()
    };
    let stream = get_bool(&m, "stream")?;
    let n = get_u64(&m, "n")?.unwrap_or(1);
    if n == 0 {
        return Err(FieldError::invalid("n", "`n` must be at least 1, got 0").into());
    }
    let best_of = get_u64(&m, "best_of")?.unwrap_or(n);
    if best_of < n {
        return Err(FieldError::invalid("best_of", format!("`best_of` ({best_of}) must be at least `n` ({n})")).into());
    }
    if stream && best_of > n {
        return Err(FieldError::invalid(
            "best_of",
            "`best_of` greater than `n` cannot be streamed (the best are known only at the end)",
        )
        .into());
    }
    let clamp = |x: u64| x.min(u32::MAX.into()) as usize;
    names.samples = if best_of > n { "best_of" } else { "n" };
    Ok(Parsed {
        input: input(&m)?,
        params,
        logprobs,
        return_token_ids: get_bool(&m, "return_token_ids")?,
        stream,
        n: clamp(n),
        best_of: clamp(best_of),
        include_usage: include_usage(&m),
        scheduling: Scheduling {
            prefix_cache: match m.get("prefix_cache") {
                None | Some(Value::Null) => None,
                Some(_) => Some(get_bool(&m, "prefix_cache")?),
            },
            priority: get_i64(&m, "priority")?.map(|p| p.clamp(i32::MIN.into(), i32::MAX.into()) as i32),
            timeout_ms: match get_f32(&m, "timeout")? {
                Some(t) if t.is_finite() && t > 0.0 => Some((f64::from(t) * 1000.0).ceil().min(u32::MAX.into()) as u32),
                Some(t) => {
                    return Err(
                        FieldError::invalid("timeout", format!("`timeout` must be positive seconds, got {t}")).into(),
                    )
                }
                None => None,
            },
        },
        tools: if chat { tools::parse(&m)? } else { Tools::default() },
        names,
    })
}

/// How a request is scheduled: extensions to OpenAI's API, as vLLM's.
pub(super) struct Scheduling {
    /// `prefix_cache: false` opts out of the prefix cache.
    pub(super) prefix_cache: Option<bool>,
    /// `priority`: lower runs first.
    pub(super) priority: Option<i32>,
    /// `timeout`, in seconds in the body.
    pub(super) timeout_ms: Option<u32>,
}

/// How one request's body spells the fields validation checks.
pub(super) struct FieldNames {
    chat: bool,
    /// `max_tokens`, or `max_completion_tokens` when the client sent that.
    max_tokens: &'static str,
    /// The field that asked for structured output.
    constraint: &'static str,
    /// The field that set how many samples to generate (`n` or `best_of`).
    samples: &'static str,
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
            constraint: "response_format",
            samples: "n",
        }
    }

    /// Names `field` as the one that constrained the output.
    pub(super) fn constrained_by(&mut self, field: &'static str) {
        self.constraint = field;
    }

    pub(super) fn name(&self, f: Field) -> &'static str {
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
            Field::Constraint => self.constraint,
            Field::Priority => "priority",
            Field::Timeout => "timeout",
            Field::NumSamples => self.samples,
        }
    }
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
                return Err(
                    FieldError::invalid(k, format!("parameter `{k}` is not supported by sirocco: {why}")).into(),
                );
            }
        } else if !allowed.contains(&k.as_str()) {
            return Err(FieldError::invalid(k, format!("parameter `{k}` is not supported by sirocco")).into());
        }
    }
    Ok(map)
}

fn get_f32(m: &Map<String, Value>, k: &str) -> Result<Option<f32>, FieldError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| FieldError::wrong_type(k, format!("`{k}` must be a number"))),
    }
}

fn get_i64(m: &Map<String, Value>, k: &str) -> Result<Option<i64>, FieldError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| FieldError::wrong_type(k, format!("`{k}` must be an integer"))),
    }
}

fn get_u64(m: &Map<String, Value>, k: &str) -> Result<Option<u64>, FieldError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| FieldError::wrong_type(k, format!("`{k}` must be a non-negative integer"))),
    }
}

fn get_bool(m: &Map<String, Value>, k: &str) -> Result<bool, FieldError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(FieldError::wrong_type(k, format!("`{k}` must be a boolean"))),
    }
}

fn get_stop(m: &Map<String, Value>) -> Result<Vec<String>, FieldError> {
    let bad = || FieldError::invalid("stop", "`stop` must be a string or a list of strings");
    match m.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// Fields both endpoints share, mapped onto sirocco's sampling parameters.
fn common_params(m: &Map<String, Value>, served_model: &str) -> Result<pb::SamplingParameters, FieldError> {
    if let Some(model) = m.get("model").and_then(|v| v.as_str()) {
        if model != served_model {
            return Err(FieldError {
                status: StatusCode::NOT_FOUND,
                ..FieldError::invalid(
                    "model",
                    format!("model `{model}` is not served here; this server serves `{served_model}`"),
                )
            });
        }
    }
    let max_tokens = match get_u64(m, "max_completion_tokens")? {
        Some(x) => Some(x),
        None => get_u64(m, "max_tokens")?,
    };
    // OpenAI's default temperature is 1, and its range 0 to 2.
    let temperature = get_f32(m, "temperature")?.unwrap_or(1.0);
    if temperature > 2.0 {
        return Err(FieldError::invalid(
            "temperature",
            format!("`temperature` must be in [0, 2], got {temperature}"),
        ));
    }
    let bad_ids = || FieldError::invalid("stop_token_ids", "`stop_token_ids` must be a list of token ids");
    let stop_token_ids = match m.get("stop_token_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad_ids)?,
        Some(_) => return Err(bad_ids()),
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
        constraint: None,
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
    "prefix_cache",
    "priority",
    "timeout",
    "user",
    "logprobs",
];

const COMMON_REFUSED: &[(&str, &str)] = &[
    ("logit_bias", "logit biases are not implemented"),
    ("functions", "function calling is not implemented"),
    ("function_call", "function calling is not implemented"),
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

/// A completions `prompt`: a string, one string in a list, or token ids.
fn prompt(m: &Map<String, Value>) -> Result<pb::generate_request::Input, FieldError> {
    match m.get("prompt") {
        Some(Value::String(s)) => Ok(pb::generate_request::Input::Text(s.clone())),
        Some(Value::Array(a)) if a.iter().all(|x| x.is_u64()) && !a.is_empty() => {
            Ok(pb::generate_request::Input::TokenIds(pb::TokenIds {
                ids: a.iter().map(|x| x.as_u64().unwrap_or(0).min(u32::MAX as u64) as u32).collect(),
            }))
        }
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(pb::generate_request::Input::Text(
            a[0].as_str().unwrap_or_default().to_string(),
        )),
        Some(Value::Array(_)) => Err(FieldError::invalid(
            "prompt",
            "`prompt` must be a string, one string in a list, or a list of token ids (batches of prompts are not supported; send one request each)",
        )),
        _ => Err(FieldError::invalid(
            "prompt",
            "`prompt` is required: a string or a list of token ids",
        )),
    }
}

/// A chat body's `messages`, each with a role and text content (none for an assistant
/// turn that calls tools), and its tool fields.
fn messages(m: &Map<String, Value>) -> Result<Vec<ChatMessage>, FieldError> {
    let Some(Value::Array(a)) = m.get("messages") else {
        return Err(FieldError::invalid(
            "messages",
            "`messages` is required: a list of messages",
        ));
    };
    a.iter()
        .enumerate()
        .map(|(i, x)| {
            let role = x
                .get("role")
                .and_then(|r| r.as_str())
                .ok_or_else(|| FieldError::invalid("messages", format!("messages[{i}].role is required")))?;
            let (tool_calls, tool_call_id) = tools::message_fields(i, role, x)?;
            let content = match x.get("content") {
                None | Some(Value::Null) if !tool_calls.is_empty() => String::new(),
                v => message_text(i, v.unwrap_or(&Value::Null))?,
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
                tool_calls,
                tool_call_id,
            })
        })
        .collect()
}

/// A message's text: a string, or a list of `{"type": "text", "text": ...}` parts.
fn message_text(i: usize, v: &Value) -> Result<String, FieldError> {
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
                    _ => Err(FieldError::invalid(
                        "messages",
                        format!("messages[{i}].content: only text parts are supported"),
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join("")),
        _ => Err(FieldError::invalid(
            "messages",
            format!("messages[{i}].content must be a string or a list of text parts"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion(body: Value) -> Result<Parsed<pb::generate_request::Input>, ApiError> {
        parse_completion(Bytes::from(body.to_string()), "m")
    }

    fn chat(body: Value) -> Result<Parsed<Vec<ChatMessage>>, ApiError> {
        parse_chat(Bytes::from(body.to_string()), "m")
    }

    /// The field a refusal names, and its status.
    fn refused<T>(r: Result<T, ApiError>) -> (String, StatusCode) {
        let Err(e) = r else { panic!("the body was accepted") };
        (
            e.param.unwrap_or_else(|| panic!("{:?} names no field", e.message)),
            e.status,
        )
    }

    fn hi() -> Value {
        json!([{"role": "user", "content": "hi"}])
    }

    #[test]
    fn each_refused_completions_field_is_named() {
        let bad = StatusCode::BAD_REQUEST;
        let wrong_type = StatusCode::UNPROCESSABLE_ENTITY;
        let cases = [
            (json!({"prompt": "x", "temperature": 2.5}), "temperature", bad),
            (json!({"prompt": "x", "temperature": "hot"}), "temperature", wrong_type),
            (json!({"prompt": "x", "max_tokens": -1}), "max_tokens", wrong_type),
            (json!({"prompt": "x", "max_tokens": 1.5}), "max_tokens", wrong_type),
            (json!({"prompt": "x", "n": 0}), "n", bad),
            (json!({"prompt": "x", "n": -2}), "n", wrong_type),
            (json!({"prompt": "x", "n": 3, "best_of": 2}), "best_of", bad),
            (json!({"prompt": "x", "best_of": 3, "stream": true}), "best_of", bad),
            (json!({"prompt": "x", "stop": 5}), "stop", bad),
            (json!({"prompt": "x", "stop": ["a", 1]}), "stop", bad),
            (json!({"prompt": "x", "stop_token_ids": [-1]}), "stop_token_ids", bad),
            (json!({"prompt": "x", "stop_token_ids": 3}), "stop_token_ids", bad),
            (json!({"prompt": "x", "logprobs": true}), "logprobs", wrong_type),
            (json!({"prompt": "x", "top_p": "a"}), "top_p", wrong_type),
            (json!({"prompt": "x", "top_k": -3}), "top_k", wrong_type),
            (json!({"prompt": "x", "min_p": []}), "min_p", wrong_type),
            (
                json!({"prompt": "x", "repetition_penalty": {}}),
                "repetition_penalty",
                wrong_type,
            ),
            (
                json!({"prompt": "x", "frequency_penalty": "a"}),
                "frequency_penalty",
                wrong_type,
            ),
            (
                json!({"prompt": "x", "presence_penalty": "a"}),
                "presence_penalty",
                wrong_type,
            ),
            (json!({"prompt": "x", "seed": -1}), "seed", wrong_type),
            (json!({"prompt": "x", "ignore_eos": 1}), "ignore_eos", wrong_type),
            (json!({"prompt": "x", "stream": "yes"}), "stream", wrong_type),
            (
                json!({"prompt": "x", "return_token_ids": 0}),
                "return_token_ids",
                wrong_type,
            ),
            (json!({"prompt": "x", "model": "other"}), "model", StatusCode::NOT_FOUND),
            (json!({}), "prompt", bad),
            (json!({"prompt": 7}), "prompt", bad),
            (json!({"prompt": []}), "prompt", bad),
            (json!({"prompt": ["a", "b"]}), "prompt", bad),
            (
                json!({"prompt": "x", "response_format": {"type": "yaml"}}),
                "response_format",
                bad,
            ),
            (json!({"prompt": "x", "tools": []}), "tools", bad),
            (json!({"prompt": "x", "tool_choice": "auto"}), "tool_choice", bad),
            (
                json!({"prompt": "x", "parallel_tool_calls": false}),
                "parallel_tool_calls",
                bad,
            ),
            (json!({"prompt": "x", "wat": 1}), "wat", bad),
            // Chat-only fields are unknown here.
            (json!({"prompt": "x", "messages": []}), "messages", bad),
            (json!({"prompt": "x", "top_logprobs": 2}), "top_logprobs", bad),
        ];
        for (body, field, status) in cases {
            assert_eq!(refused(completion(body.clone())), (field.to_string(), status), "{body}");
        }
    }

    #[test]
    fn each_refused_chat_field_is_named() {
        let bad = StatusCode::BAD_REQUEST;
        let wrong_type = StatusCode::UNPROCESSABLE_ENTITY;
        let cases = [
            (json!({}), "messages", bad),
            (json!({"messages": "hi"}), "messages", bad),
            (json!({"messages": [{"content": "hi"}]}), "messages", bad),
            (json!({"messages": [{"role": "user", "content": 3}]}), "messages", bad),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages",
                bad,
            ),
            (json!({"messages": hi(), "logprobs": 3}), "logprobs", wrong_type),
            (
                json!({"messages": hi(), "top_logprobs": "x"}),
                "top_logprobs",
                wrong_type,
            ),
            (
                json!({"messages": hi(), "max_completion_tokens": "a"}),
                "max_completion_tokens",
                wrong_type,
            ),
            (json!({"messages": hi(), "temperature": 3}), "temperature", bad),
            (json!({"messages": hi(), "n": 0}), "n", bad),
            (json!({"messages": hi(), "best_of": 2}), "best_of", bad),
            (
                json!({"messages": hi(), "response_format": {"type": "json_schema"}}),
                "response_format",
                bad,
            ),
            (json!({"messages": hi(), "prompt": "x"}), "prompt", bad),
        ];
        for (body, field, status) in cases {
            assert_eq!(refused(chat(body.clone())), (field.to_string(), status), "{body}");
        }
    }

    #[test]
    fn a_body_that_is_no_json_object_names_no_field() {
        for body in [&b"{"[..], b"[1]"] {
            let e = parse_completion(Bytes::from_static(body), "m").err().unwrap();
            assert_eq!((e.status, e.param), (StatusCode::UNPROCESSABLE_ENTITY, None));
        }
    }

    #[test]
    fn accepted_bodies_map_onto_sampling_parameters() {
        let p =
            completion(json!({"prompt": [1, 2], "logprobs": 3, "stop": "x", "response_format": null, "model": "m"}))
                .unwrap();
        assert_eq!(
            p.input,
            pb::generate_request::Input::TokenIds(pb::TokenIds { ids: vec![1, 2] })
        );
        assert_eq!(p.params.max_new_tokens, Some(16), "completions default to 16 tokens");
        assert_eq!((p.logprobs, p.params.logprobs, p.params.top_logprobs), (true, true, 3));
        assert_eq!(p.params.stop_sequences, ["x"]);
        assert_eq!(p.params.temperature, Some(1.0));
        let p = chat(
            json!({"messages": hi(), "logprobs": true, "top_logprobs": 2, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert_eq!(
            p.input,
            [ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }]
        );
        assert_eq!(p.params.max_new_tokens, None, "the route sets the chat default");
        assert_eq!(
            (p.logprobs, p.params.top_logprobs, p.stream, p.include_usage),
            (true, 2, true, true)
        );
    }

    #[test]
    fn chat_takes_tools_and_tool_turns() {
        let weather =
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}});
        let p = chat(json!({
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
            ],
            "tools": [weather], "tool_choice": "required", "parallel_tool_calls": false,
        }))
        .unwrap();
        assert_eq!(p.input[1].content, "", "a turn of calls has no text");
        assert_eq!(p.input[1].tool_calls[0].name, "get_weather");
        assert_eq!(
            (p.input[2].tool_call_id.as_deref(), p.input[2].content.as_str()),
            (Some("call_1"), "sunny")
        );
        assert_eq!(p.tools.offered().len(), 1);
        // A message without content is still refused unless it calls tools.
        let e = chat(json!({"messages": [{"role": "assistant", "content": null}]}))
            .err()
            .unwrap();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = chat(json!({"messages": hi(), "tools": [{"type": "function", "function": {"name": "a b"}}]}))
            .err()
            .unwrap();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.name"));
    }

    #[test]
    fn validation_errors_are_named_as_the_body_spells_the_field() {
        let p = completion(json!({"prompt": "x"})).unwrap();
        assert_eq!(p.names.name(Field::TopLogprobs), "logprobs");
        assert_eq!(p.names.name(Field::InputText), "prompt");
        assert_eq!(p.names.name(Field::MaxNewTokens), "max_tokens");
        assert_eq!(p.names.name(Field::StopSequences), "stop");
        let p = chat(json!({"messages": hi(), "max_completion_tokens": 5})).unwrap();
        assert_eq!(p.names.name(Field::TopLogprobs), "top_logprobs");
        assert_eq!(p.names.name(Field::InputTokenIds), "messages");
        assert_eq!(p.names.name(Field::MaxNewTokens), "max_completion_tokens");
        assert_eq!(p.params.max_new_tokens, Some(5));
    }
}
