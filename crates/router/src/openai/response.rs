//! Answers in OpenAI's shapes, built from a request's events: a whole response with
//! its usage, or a stream of server-sent events (chunks, an optional usage chunk,
//! `[DONE]`), with completions- or chat-style log-probabilities.

use super::error::ApiError;
use crate::request::{Event, EventReceiver};
use axum::http::StatusCode;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt as _;
use serde_json::{json, Value};
use sirocco_scheduler::FinishReason;
use sirocco_tokenizer::Tokenizer;
use std::convert::Infallible;

pub(super) fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Cancelled => "abort",
    }
}

/// A whole generation, gathered from its events.
pub(super) struct Gen {
    pub(super) text: String,
    pub(super) ids: Vec<u32>,
    pub(super) logprobs: Vec<f32>,
    pub(super) tops: Vec<Vec<(u32, f32)>>,
    pub(super) finish: FinishReason,
    pub(super) usage: Usage,
}

impl Gen {
    /// The sample's log-probability: what `best_of` ranks samples by.
    pub(super) fn total_logprob(&self) -> f64 {
        self.logprobs.iter().map(|&l| f64::from(l)).sum()
    }
}

/// A request's token counts, as OpenAI's `usage` reports them.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Usage {
    pub(super) prompt: usize,
    pub(super) completion: usize,
    /// Prompt tokens served from the prefix cache.
    pub(super) cached: usize,
}

impl Usage {
    /// Counts one more sample of the same prompt: its prompt counts once, its
    /// completion adds (the first sample's cached count stands).
    pub(super) fn add_sample(&mut self, sample: Usage, first: bool) {
        if first {
            *self = Usage {
                completion: self.completion,
                ..sample
            };
        }
        self.completion += sample.completion;
    }

    fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// A whole (non-streaming) response with its choices and their usage.
pub(super) fn whole_response(
    object: &str,
    id: &str,
    created: u64,
    model: &str,
    choices: Vec<Value>,
    usage: Usage,
) -> Response {
    Json(json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": choices,
        "usage": usage.json(),
    }))
    .into_response()
}

/// The last chunk of a stream that asked for usage: no choices, just the counts.
pub(super) fn usage_chunk_from(mut chunk: Value, usage: Usage) -> Value {
    chunk["choices"] = json!([]);
    chunk["usage"] = usage.json();
    chunk
}

/// Gathers the whole generations of a request's `samples`, in sample order;
/// `spell` gives each token's text as the answer reads it. Any sample's error is
/// the request's.
pub(super) async fn collect(
    mut rx: EventReceiver,
    samples: usize,
    spell: impl Fn(u32, String) -> String,
) -> Result<Vec<Gen>, ApiError> {
    let mut gens: Vec<Gen> = (0..samples)
        .map(|_| Gen {
            text: String::new(),
            ids: Vec::new(),
            logprobs: Vec::new(),
            tops: Vec::new(),
            finish: FinishReason::Length,
            usage: Usage::default(),
        })
        .collect();
    let mut open = samples;
    while let Some((i, ev)) = rx.recv().await {
        let g = &mut gens[i as usize];
        match ev.map_err(|s| ApiError::from_status(&s))? {
            Event::Token {
                id,
                text,
                logprob,
                top_logprobs,
            } => {
                g.text.push_str(&spell(id, text));
                g.ids.push(id);
                g.logprobs.push(logprob.unwrap_or(0.0));
                g.tops.push(top_logprobs);
            }
            Event::Finished {
                reason,
                prompt_tokens,
                generated_tokens,
                cached_prompt_tokens,
                ..
            } => {
                g.finish = reason;
                g.usage = Usage {
                    prompt: prompt_tokens,
                    completion: generated_tokens,
                    cached: cached_prompt_tokens,
                };
                open -= 1;
                if open == 0 {
                    return Ok(gens);
                }
            }
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "generation ended without a result",
    ))
}

fn token_text(tokenizer: Option<&Tokenizer>, id: u32) -> String {
    tokenizer.and_then(|t| t.decode(&[id], false).ok()).unwrap_or_default()
}

/// Completions-style logprobs for tokens `ids`.
pub(super) fn completion_logprobs(
    tokenizer: Option<&Tokenizer>,
    ids: &[u32],
    lps: &[f32],
    tops: &[Vec<(u32, f32)>],
) -> Value {
    let tokens: Vec<String> = ids.iter().map(|&i| token_text(tokenizer, i)).collect();
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
        .map(|t| Value::Object(t.iter().map(|&(i, lp)| (token_text(tokenizer, i), json!(lp))).collect()))
        .collect();
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": text_offset})
}

/// Chat-style logprobs for tokens `ids`.
pub(super) fn chat_logprobs(
    tokenizer: Option<&Tokenizer>,
    ids: &[u32],
    lps: &[f32],
    tops: &[Vec<(u32, f32)>],
) -> Value {
    let content: Vec<Value> = ids
        .iter()
        .zip(lps)
        .zip(tops)
        .map(|((&i, &lp), t)| {
            let text = token_text(tokenizer, i);
            json!({
                "token": text,
                "logprob": lp,
                "bytes": text.as_bytes(),
                "top_logprobs": t.iter().map(|&(ti, tlp)| {
                    let tt = token_text(tokenizer, ti);
                    json!({"token": tt, "logprob": tlp, "bytes": tt.as_bytes()})
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"content": content})
}

/// What a streaming response is made of: a start per choice, then the choices'
/// tokens as they come, a finish per choice, and the usage.
pub(super) enum StreamItem {
    Start {
        index: usize,
    },
    Token {
        index: usize,
        id: u32,
        text: String,
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    Finish {
        index: usize,
        reason: FinishReason,
    },
    Usage(Usage),
}

/// Where a stream stands: its events, the samples still open, their usage.
struct Streaming<R> {
    rx: EventReceiver,
    open: usize,
    usage: Usage,
    done: bool,
    render: R,
}

/// Turns a request's events (of `samples` choices) into SSE `data:` lines:
/// `render` makes the JSON chunks of each (none while it holds text back, several
/// where it lets it out); an error mid-stream becomes an error object; `[DONE]`
/// ends it after every choice has finished.
pub(super) fn sse_events(
    rx: EventReceiver,
    samples: usize,
    include_usage: bool,
    mut render: impl FnMut(StreamItem) -> Vec<Value> + Send + 'static,
) -> impl futures::Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let first: Vec<SseEvent> = (0..samples)
        .flat_map(|index| render(StreamItem::Start { index }))
        .map(data)
        .collect();
    let state = Streaming {
        rx,
        open: samples,
        usage: Usage::default(),
        done: false,
        render,
    };
    let rest = futures::stream::unfold(state, move |mut st| async move {
        if st.done {
            return None;
        }
        let data = |v: Value| SseEvent::default().data(v.to_string());
        let (index, ev) = st.rx.recv().await?;
        let index = index as usize;
        let out = match ev {
            Ok(Event::Token {
                id,
                text,
                logprob,
                top_logprobs,
            }) => (st.render)(StreamItem::Token {
                index,
                id,
                text,
                logprob: logprob.unwrap_or(0.0),
                top: top_logprobs,
            })
            .into_iter()
            .map(data)
            .collect::<Vec<_>>(),
            Ok(Event::Finished {
                reason,
                prompt_tokens,
                generated_tokens,
                cached_prompt_tokens,
                ..
            }) => {
                let mut out: Vec<SseEvent> = (st.render)(StreamItem::Finish { index, reason })
                    .into_iter()
                    .map(data)
                    .collect();
                let sample = Usage {
                    prompt: prompt_tokens,
                    completion: generated_tokens,
                    cached: cached_prompt_tokens,
                };
                st.usage.add_sample(sample, index == 0);
                st.open -= 1;
                if st.open == 0 {
                    if include_usage {
                        out.extend((st.render)(StreamItem::Usage(st.usage)).into_iter().map(data));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                out
            }
            Err(s) => {
                st.done = true;
                let v = ApiError::from_status(&s).body(false);
                vec![data(v), SseEvent::default().data("[DONE]")]
            }
        };
        Some((out, st))
    });
    futures::StreamExt::flat_map(futures::stream::iter([first]).chain(rest), |v| {
        futures::stream::iter(v.into_iter().map(Ok))
    })
}
