//! Checks a client's request before it is queued: the input, every sampling
//! parameter (named, with its allowed range), and that prompt plus output fit the
//! model's context and the cluster's KV cache. Text is tokenized here.

use crate::ModelInfo;
use sirocco_proto::v1 as pb;
use sirocco_sampling::SamplingParams;
use sirocco_tokenizer::Tokenizer;
use tonic::Status;

/// The most stop sequences a request may carry.
pub const MAX_STOP_SEQUENCES: usize = 8;
/// The longest stop sequence, in bytes.
pub const MAX_STOP_SEQUENCE_BYTES: usize = 256;
pub const MAX_STOP_TOKEN_IDS: usize = 64;
pub const MAX_TOP_LOGPROBS: usize = 20;
pub const DEFAULT_MAX_NEW_TOKENS: usize = 16;

/// A request that passed validation, ready to queue.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub id: String,
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    pub stop_sequences: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: bool,
    pub top_logprobs: usize,
}

fn invalid(msg: String) -> Status {
    Status::invalid_argument(msg)
}

fn check_range(name: &str, v: Option<f32>, ok: impl Fn(f32) -> bool, range: &str) -> Result<(), Status> {
    match v {
        Some(x) if !x.is_finite() || !ok(x) => Err(invalid(format!("parameters.{name} must be {range}, got {x}"))),
        _ => Ok(()),
    }
}

pub fn validate(
    req: pb::GenerateRequest,
    request_id: String,
    tokenizer: Option<&Tokenizer>,
    model: &ModelInfo,
) -> Result<ValidRequest, Status> {
    let vocab = model.vocab_size;
    let prompt_ids = match req.input {
        None => return Err(invalid("input: give `text` or `token_ids`".into())),
        Some(pb::generate_request::Input::Text(text)) => {
            if text.is_empty() {
                return Err(invalid("input.text: the prompt is empty".into()));
            }
            let tok = tokenizer.ok_or_else(|| {
                invalid("input.text: this model has no tokenizer; send input.token_ids instead".into())
            })?;
            tok.encode(&text, req.add_special_tokens.unwrap_or(true))
                .map_err(|e| invalid(format!("input.text: cannot tokenize: {e}")))?
        }
        Some(pb::generate_request::Input::TokenIds(ids)) => {
            if ids.ids.is_empty() {
                return Err(invalid("input.token_ids: the prompt is empty".into()));
            }
            if let Some(bad) = ids.ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(invalid(format!(
                    "input.token_ids: token id {bad} is outside the vocabulary [0, {vocab})"
                )));
            }
            ids.ids
        }
    };
    let p = req.parameters.unwrap_or_default();
    let max_new_tokens = p.max_new_tokens.map_or(DEFAULT_MAX_NEW_TOKENS, |m| m as usize);
    if max_new_tokens == 0 || max_new_tokens > model.max_new_tokens_limit {
        return Err(invalid(format!(
            "parameters.max_new_tokens must be in [1, {}], got {max_new_tokens}",
            model.max_new_tokens_limit
        )));
    }
    if prompt_ids.len() + max_new_tokens > model.max_context {
        return Err(invalid(format!(
            "the prompt ({} tokens) plus parameters.max_new_tokens ({max_new_tokens}) is {} tokens, over the context limit of {}",
            prompt_ids.len(),
            prompt_ids.len() + max_new_tokens,
            model.max_context
        )));
    }
    check_range("temperature", p.temperature, |x| x >= 0.0, ">= 0")?;
    check_range("top_p", p.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
    check_range("min_p", p.min_p, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?;
    check_range("repetition_penalty", p.repetition_penalty, |x| x > 0.0, "> 0")?;
    check_range(
        "frequency_penalty",
        p.frequency_penalty,
        |x| (-2.0..=2.0).contains(&x),
        "in [-2, 2]",
    )?;
    check_range(
        "presence_penalty",
        p.presence_penalty,
        |x| (-2.0..=2.0).contains(&x),
        "in [-2, 2]",
    )?;
    if p.stop_sequences.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(format!(
            "parameters.stop_sequences: at most {MAX_STOP_SEQUENCES} allowed, got {}",
            p.stop_sequences.len()
        )));
    }
    for (i, s) in p.stop_sequences.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_STOP_SEQUENCE_BYTES {
            return Err(invalid(format!(
                "parameters.stop_sequences[{i}] must be 1 to {MAX_STOP_SEQUENCE_BYTES} bytes long, got {}",
                s.len()
            )));
        }
    }
    if p.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(invalid(format!(
            "parameters.stop_token_ids: at most {MAX_STOP_TOKEN_IDS} allowed, got {}",
            p.stop_token_ids.len()
        )));
    }
    if let Some(bad) = p.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(invalid(format!(
            "parameters.stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab})"
        )));
    }
    if p.top_logprobs as usize > MAX_TOP_LOGPROBS {
        return Err(invalid(format!(
            "parameters.top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {}",
            p.top_logprobs
        )));
    }
    let needed = model.kv_slots_needed(prompt_ids.len() + max_new_tokens);
    if needed > model.kv_capacity_tokens {
        return Err(invalid(format!(
            "the request needs {needed} KV cache slots per rank but a replica holds {}; lower parameters.max_new_tokens or the prompt",
            model.kv_capacity_tokens
        )));
    }
    let params = SamplingParams {
        temperature: p.temperature.unwrap_or(0.0),
        top_k: p.top_k.unwrap_or(0) as usize,
        top_p: p.top_p.unwrap_or(1.0),
        min_p: p.min_p.unwrap_or(0.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        seed: p.seed,
    };
    params.validate().map_err(|e| invalid(format!("parameters: {e}")))?;
    Ok(ValidRequest {
        id: if req.request_id.is_empty() {
            request_id
        } else {
            req.request_id
        },
        prompt_ids,
        params,
        max_new_tokens,
        stop_sequences: p.stop_sequences,
        stop_token_ids: p.stop_token_ids,
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs || p.top_logprobs > 0,
        top_logprobs: p.top_logprobs as usize,
    })
}
