//! Checks a client's request before it is queued: the input, every sampling
//! parameter (named as the client's API spells it, with its allowed range), and that
//! prompt plus output fit the model's context and the cluster's KV cache. Text is
//! bounded in bytes before it is tokenized here, so that no request makes the router
//! tokenize more text than could ever fit the context.

use crate::ModelInfo;
use sirocco_proto::v1 as pb;
use sirocco_sampling::SamplingParams;
use sirocco_tokenizer::Tokenizer;
use std::time::{Duration, Instant};
use tonic::Status;

/// The most stop sequences a request may carry.
pub(crate) const MAX_STOP_SEQUENCES: usize = 8;
/// The longest stop sequence, in bytes.
pub(crate) const MAX_STOP_SEQUENCE_BYTES: usize = 256;
pub(crate) const MAX_STOP_TOKEN_IDS: usize = 64;
pub(crate) const MAX_TOP_LOGPROBS: usize = 20;
pub(crate) const DEFAULT_MAX_NEW_TOKENS: usize = 16;
/// Priorities run from the most urgent to the least (lower runs first).
pub(crate) const PRIORITIES: std::ops::RangeInclusive<i32> = -1000..=1000;
/// The most samples one request may ask for.
pub(crate) const MAX_SAMPLES: usize = 128;
/// The least input text accepted whatever the vocabulary: a small vocabulary's
/// longest token says little about how much text the context holds.
pub(crate) const MIN_INPUT_BYTES: usize = 64 << 10;
/// Requests up to this size are always read and answered with a precise error; only
/// larger ones are cut off by the transport.
pub(crate) const MIN_MESSAGE_BYTES: usize = 4 << 20;
/// Room in a request message for everything beside its input.
const MESSAGE_SLACK_BYTES: usize = 64 << 10;
/// After a request whose input was this large, the router hands freed heap back to
/// the system; otherwise the allocator keeps it, and a few large requests leave the
/// process holding hundreds of MB.
pub(crate) const RELEASE_AFTER_BYTES: usize = 128 << 10;

/// The most bytes of input text that can fit `max_context` tokens: no token stands
/// for more text than its vocabulary entry spells (a `▁` or `Ġ` piece is longer than
/// the space it encodes, a `<0x0A>` piece longer than its byte).
pub(crate) fn max_input_bytes(tokenizer: Option<&Tokenizer>, max_context: usize) -> usize {
    let longest = tokenizer.map_or(0, |t| {
        (0..t.vocab_size() as u32)
            .filter_map(|id| t.id_to_piece(id))
            .map(|p| p.len())
            .max()
            .unwrap_or(0)
    });
    max_context.saturating_mul(longest).max(MIN_INPUT_BYTES)
}

/// The largest request message a server reads: room for the largest acceptable input
/// (text, or token ids at up to `per_token` bytes each), `escape` times over for
/// encodings that may escape text (JSON: up to 6 bytes per byte).
pub(crate) fn max_message_bytes(model: &ModelInfo, escape: usize, per_token: usize) -> usize {
    let input = (model.max_input_bytes.saturating_mul(escape)).max(model.max_context.saturating_mul(per_token));
    input.max(MIN_MESSAGE_BYTES).saturating_add(MESSAGE_SLACK_BYTES)
}

/// Hands the heap's free memory back to the system (glibc keeps it otherwise).
pub(crate) fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A request field that can be invalid. Each API names it its own way: see
/// [`grpc_name`]; the OpenAI API maps these onto its body fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    Input,
    InputText,
    InputTokenIds,
    MaxNewTokens,
    Temperature,
    TopP,
    MinP,
    RepetitionPenalty,
    FrequencyPenalty,
    PresencePenalty,
    StopSequences,
    StopTokenIds,
    Logprobs,
    TopLogprobs,
    Constraint,
    Priority,
    Timeout,
    NumSamples,
}

/// The field as `sirocco.v1.GenerateRequest` spells it.
pub(crate) fn grpc_name(f: Field) -> &'static str {
    match f {
        Field::Input => "input",
        Field::InputText => "input.text",
        Field::InputTokenIds => "input.token_ids",
        Field::MaxNewTokens => "parameters.max_new_tokens",
        Field::Temperature => "parameters.temperature",
        Field::TopP => "parameters.top_p",
        Field::MinP => "parameters.min_p",
        Field::RepetitionPenalty => "parameters.repetition_penalty",
        Field::FrequencyPenalty => "parameters.frequency_penalty",
        Field::PresencePenalty => "parameters.presence_penalty",
        Field::StopSequences => "parameters.stop_sequences",
        Field::StopTokenIds => "parameters.stop_token_ids",
        Field::Logprobs => "parameters.logprobs",
        Field::TopLogprobs => "parameters.top_logprobs",
        Field::Constraint => "parameters.constraint",
        Field::Priority => "priority",
        Field::Timeout => "timeout_ms",
        Field::NumSamples => "num_samples",
    }
}

/// Why a request was refused, and which field is at fault.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Invalid {
    pub(crate) field: Field,
    pub(crate) message: String,
}

impl From<Invalid> for Status {
    fn from(e: Invalid) -> Status {
        Status::invalid_argument(e.message)
    }
}

/// A request that passed validation, ready to queue.
#[derive(Clone, Debug)]
pub(crate) struct ValidRequest {
    pub(crate) id: String,
    pub(crate) prompt_ids: Vec<u32>,
    pub(crate) params: SamplingParams,
    pub(crate) max_new_tokens: usize,
    pub(crate) stop_sequences: Vec<String>,
    pub(crate) stop_token_ids: Vec<u32>,
    pub(crate) ignore_eos: bool,
    pub(crate) logprobs: bool,
    pub(crate) top_logprobs: usize,
    /// False when the request opted out of the prefix cache.
    pub(crate) prefix_cache: bool,
    /// Structured output: the grammar the output must follow.
    pub(crate) constraint: Option<sirocco_structured::Compiled>,
    /// Queue order: lower runs first (see [`crate::queue`]).
    pub(crate) priority: i32,
    /// When the request ends with DEADLINE_EXCEEDED if it has not finished.
    pub(crate) deadline: Option<Instant>,
    /// How many samples of the prompt to generate.
    pub(crate) num_samples: usize,
    /// Set on each queued sample of a request of several (see [`SampleOf`]).
    pub(crate) sample: Option<SampleOf>,
}

/// One sample of a request of several: its siblings share its `group` and prompt,
/// and the batcher prefills that prompt once and forks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SampleOf {
    pub(crate) group: u64,
    pub(crate) index: usize,
}

/// Refuses text over the model's input bound before anything reads it whole.
pub(crate) fn check_text_bytes(field: &str, len: usize, model: &ModelInfo) -> Result<(), String> {
    if len > model.max_input_bytes {
        return Err(format!(
            "{field} is {len} bytes, over the limit of {} bytes (the most text {} tokens of context can hold)",
            model.max_input_bytes, model.max_context
        ));
    }
    Ok(())
}

/// Tokenizes `text` after checking its size in bytes, and its tokens against the context.
pub(crate) fn tokenize_bounded(
    field: &str,
    text: &str,
    add_special: bool,
    tokenizer: &Tokenizer,
    model: &ModelInfo,
) -> Result<Vec<u32>, String> {
    check_text_bytes(field, text.len(), model)?;
    let ids = tokenizer
        .encode(text, add_special)
        .map_err(|e| format!("{field}: cannot tokenize: {e}"))?;
    if ids.len() > model.max_context {
        return Err(format!(
            "{field} is {} tokens, over the context limit of {} tokens",
            ids.len(),
            model.max_context
        ));
    }
    Ok(ids)
}

/// Validates `req`, naming fields as `name` spells them for the client's API.
pub(crate) fn validate(
    req: pb::GenerateRequest,
    request_id: String,
    tokenizer: Option<&Tokenizer>,
    model: &ModelInfo,
    name: &dyn Fn(Field) -> &'static str,
) -> Result<ValidRequest, Invalid> {
    let invalid = |field: Field, message: String| Invalid { field, message };
    let vocab = model.vocab_size;
    // The prompt's own field, for the errors about its length.
    let input = match &req.input {
        Some(pb::generate_request::Input::TokenIds(_)) => Field::InputTokenIds,
        _ => Field::InputText,
    };
    let prompt_ids = match req.input {
        None => {
            return Err(invalid(
                Field::Input,
                format!("{}: give `text` or `token_ids`", name(Field::Input)),
            ))
        }
        Some(pb::generate_request::Input::Text(text)) => {
            let field = name(Field::InputText);
            if text.is_empty() {
                return Err(invalid(Field::InputText, format!("{field}: the prompt is empty")));
            }
            let tok = tokenizer.ok_or_else(|| {
                invalid(
                    Field::InputText,
                    format!(
                        "{field}: this model has no tokenizer; send {} instead",
                        name(Field::InputTokenIds)
                    ),
                )
            })?;
            tokenize_bounded(field, &text, req.add_special_tokens.unwrap_or(true), tok, model)
                .map_err(|m| invalid(Field::InputText, m))?
        }
        // The gRPC frontend renders a conversation into text before validating it.
        Some(pb::generate_request::Input::Chat(_)) => {
            return Err(invalid(
                Field::Input,
                format!("{}: a conversation needs the chat template", name(Field::Input)),
            ))
        }
        Some(pb::generate_request::Input::TokenIds(ids)) => {
            let field = name(Field::InputTokenIds);
            if ids.ids.is_empty() {
                return Err(invalid(Field::InputTokenIds, format!("{field}: the prompt is empty")));
            }
            if let Some(bad) = ids.ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(invalid(
                    Field::InputTokenIds,
                    format!("{field}: token id {bad} is outside the vocabulary [0, {vocab})"),
                ));
            }
            ids.ids
        }
    };
    let priority = req.priority.unwrap_or(0);
    if !PRIORITIES.contains(&priority) {
        return Err(invalid(
            Field::Priority,
            format!(
                "{} must be in [{}, {}] (lower runs first), got {priority}",
                name(Field::Priority),
                PRIORITIES.start(),
                PRIORITIES.end()
            ),
        ));
    }
    let deadline = match req.timeout_ms {
        Some(0) => {
            return Err(invalid(
                Field::Timeout,
                format!("{} must be positive, got 0", name(Field::Timeout)),
            ))
        }
        Some(ms) => Some(Instant::now() + Duration::from_millis(ms.into())),
        None => None,
    };
    let num_samples = req.num_samples.map_or(1, |n| n as usize);
    if !(1..=MAX_SAMPLES).contains(&num_samples) {
        return Err(invalid(
            Field::NumSamples,
            format!(
                "{} must be in [1, {MAX_SAMPLES}], got {num_samples}",
                name(Field::NumSamples)
            ),
        ));
    }
    let p = req.parameters.unwrap_or_default();
    let max_new_tokens = p.max_new_tokens.map_or(DEFAULT_MAX_NEW_TOKENS, |m| m as usize);
    if max_new_tokens == 0 || max_new_tokens > model.max_new_tokens_limit {
        return Err(invalid(
            Field::MaxNewTokens,
            format!(
                "{} must be in [1, {}], got {max_new_tokens}",
                name(Field::MaxNewTokens),
                model.max_new_tokens_limit
            ),
        ));
    }
    if prompt_ids.len() + max_new_tokens > model.max_context {
        return Err(invalid(
            input,
            format!(
                "the prompt ({} tokens, {}) plus {} ({max_new_tokens}) is {} tokens, over the context limit of {}",
                prompt_ids.len(),
                name(input),
                name(Field::MaxNewTokens),
                prompt_ids.len() + max_new_tokens,
                model.max_context
            ),
        ));
    }
    let range = |field: Field, v: Option<f32>, ok: fn(f32) -> bool, range: &str| match v {
        Some(x) if !x.is_finite() || !ok(x) => Err(invalid(field, format!("{} must be {range}, got {x}", name(field)))),
        _ => Ok(()),
    };
    range(Field::Temperature, p.temperature, |x| x >= 0.0, ">= 0")?;
    range(Field::TopP, p.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
    range(Field::MinP, p.min_p, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?;
    range(Field::RepetitionPenalty, p.repetition_penalty, |x| x > 0.0, "> 0")?;
    let penalty = |x: f32| (-2.0..=2.0).contains(&x);
    range(Field::FrequencyPenalty, p.frequency_penalty, penalty, "in [-2, 2]")?;
    range(Field::PresencePenalty, p.presence_penalty, penalty, "in [-2, 2]")?;
    let stops = name(Field::StopSequences);
    if p.stop_sequences.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(
            Field::StopSequences,
            format!(
                "{stops}: at most {MAX_STOP_SEQUENCES} allowed, got {}",
                p.stop_sequences.len()
            ),
        ));
    }
    for (i, s) in p.stop_sequences.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_STOP_SEQUENCE_BYTES {
            return Err(invalid(
                Field::StopSequences,
                format!(
                    "{stops}[{i}] must be 1 to {MAX_STOP_SEQUENCE_BYTES} bytes long, got {}",
                    s.len()
                ),
            ));
        }
    }
    let stop_ids = name(Field::StopTokenIds);
    if p.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(invalid(
            Field::StopTokenIds,
            format!(
                "{stop_ids}: at most {MAX_STOP_TOKEN_IDS} allowed, got {}",
                p.stop_token_ids.len()
            ),
        ));
    }
    if let Some(bad) = p.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(invalid(
            Field::StopTokenIds,
            format!("{stop_ids}: token id {bad} is outside the vocabulary [0, {vocab})"),
        ));
    }
    if p.top_logprobs as usize > MAX_TOP_LOGPROBS {
        return Err(invalid(
            Field::TopLogprobs,
            format!(
                "{} must be in [0, {MAX_TOP_LOGPROBS}], got {}",
                name(Field::TopLogprobs),
                p.top_logprobs
            ),
        ));
    }
    if p.top_logprobs > 0 && !p.logprobs {
        return Err(invalid(
            Field::TopLogprobs,
            format!(
                "{} needs {} set to true",
                name(Field::TopLogprobs),
                name(Field::Logprobs)
            ),
        ));
    }
    // Last: compiling is the costliest check.
    let constraint_error = |m: String| invalid(Field::Constraint, format!("{}: {m}", name(Field::Constraint)));
    let constraint = match p.constraint.map(crate::structured::from_pb) {
        None | Some(Ok(None)) => None,
        Some(Err(m)) => return Err(constraint_error(m)),
        Some(Ok(Some(c))) => Some(model.structured.compile(&c).map_err(constraint_error)?),
    };
    let needed = model.kv.slots_needed(prompt_ids.len() + max_new_tokens);
    if needed > model.kv.capacity_tokens {
        return Err(invalid(
            Field::MaxNewTokens,
            format!(
                "the request needs {needed} KV cache slots per rank but a replica holds {}; lower {} or the prompt ({})",
                model.kv.capacity_tokens,
                name(Field::MaxNewTokens),
                name(input)
            ),
        ));
    }
    Ok(ValidRequest {
        id: if req.request_id.is_empty() {
            request_id
        } else {
            req.request_id
        },
        prompt_ids,
        params: SamplingParams {
            temperature: p.temperature.unwrap_or(0.0),
            top_k: p.top_k.unwrap_or(0) as usize,
            top_p: p.top_p.unwrap_or(1.0),
            min_p: p.min_p.unwrap_or(0.0),
            repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
            presence_penalty: p.presence_penalty.unwrap_or(0.0),
            seed: p.seed,
        },
        max_new_tokens,
        stop_sequences: p.stop_sequences,
        stop_token_ids: p.stop_token_ids,
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
        top_logprobs: p.top_logprobs as usize,
        prefix_cache: req.prefix_cache.unwrap_or(true),
        constraint,
        priority,
        deadline,
        num_samples,
        sample: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(max_context: usize, max_input_bytes: usize) -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            vocab_size: 1000,
            max_context,
            sliding_window: None,
            eos_ids: vec![2],
            attention_heads: 4,
            kv_heads: 2,
            tp: 1,
            kv: sirocco_scheduler::KvGeometry {
                capacity_tokens: 1 << 20,
                block_size: 16,
                positions_per_seq: max_context,
            },
            max_new_tokens_limit: max_context,
            max_input_bytes,
            structured: crate::structured::StructuredOutput::new(Some(Tokenizer::builtin()), 1000),
        }
    }

    fn text_request(text: String, parameters: pb::SamplingParameters) -> pb::GenerateRequest {
        pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Text(text)),
            parameters: Some(parameters),
            ..Default::default()
        }
    }

    #[test]
    fn the_input_bound_is_the_context_times_the_longest_token() {
        let tok = Tokenizer::builtin();
        let longest = (0..tok.vocab_size() as u32)
            .filter_map(|i| tok.id_to_piece(i))
            .map(|p| p.len())
            .max()
            .unwrap();
        assert!(longest > 1);
        let context = 1 << 20;
        assert_eq!(max_input_bytes(Some(&tok), context), context * longest);
        // Small contexts and no tokenizer get the floor.
        assert_eq!(max_input_bytes(Some(&tok), 8), MIN_INPUT_BYTES);
        assert_eq!(max_input_bytes(None, 1 << 20), MIN_INPUT_BYTES);
    }

    #[test]
    fn text_over_the_byte_bound_is_refused_before_tokenizing() {
        let tok = Tokenizer::builtin();
        let m = model(64, 1000);
        let err = validate(
            text_request("a".repeat(1001), Default::default()),
            "id".into(),
            Some(&tok),
            &m,
            &grpc_name,
        )
        .unwrap_err();
        assert_eq!(err.field, Field::InputText);
        assert!(err.message.contains("input.text is 1001 bytes"), "{}", err.message);
        assert!(err.message.contains("limit of 1000 bytes"), "{}", err.message);
        // Within the bytes but over the context in tokens: refused by token count.
        let err = tokenize_bounded("text", &"a b ".repeat(200), false, &tok, &m).unwrap_err();
        assert!(err.contains("over the context limit of 64 tokens"), "{err}");
    }

    #[test]
    fn errors_name_fields_as_the_caller_spells_them() {
        let tok = Tokenizer::builtin();
        let m = model(64, 1000);
        let openai = |f: Field| match f {
            Field::MaxNewTokens => "max_tokens",
            Field::TopLogprobs => "logprobs",
            _ => "other",
        };
        let bad = pb::SamplingParameters {
            max_new_tokens: Some(0),
            ..Default::default()
        };
        let err = validate(text_request("hi".into(), bad), "id".into(), Some(&tok), &m, &openai).unwrap_err();
        assert_eq!(err.field, Field::MaxNewTokens);
        assert!(
            err.message.starts_with("max_tokens must be in [1, 64]"),
            "{}",
            err.message
        );
        let top_without_logprobs = pb::SamplingParameters {
            top_logprobs: 3,
            ..Default::default()
        };
        let err = validate(
            text_request("hi".into(), top_without_logprobs),
            "id".into(),
            Some(&tok),
            &m,
            &grpc_name,
        )
        .unwrap_err();
        assert_eq!(err.field, Field::TopLogprobs);
        assert_eq!(
            err.message,
            "parameters.top_logprobs needs parameters.logprobs set to true"
        );
    }
}
