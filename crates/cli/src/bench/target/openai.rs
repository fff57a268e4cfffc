//! A request over the OpenAI-compatible HTTP API (`POST /v1/completions` or
//! `/v1/chat/completions`, streamed as server-sent events), counted by the token ids
//! the server returns, else its `usage`, a tokenizer or the chunks, with the cached
//! prompt tokens its `usage` names; and the served model from `GET /v1/models`.

use super::{Ask, Target};
use crate::bench::record::{count_tokens, Count, Finish, Record};
use crate::bench::workload::Prompt;
use crate::bench::Api;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// One streamed chunk of an OpenAI response.
struct Chunk {
    at: Duration,
    /// Its `token_ids`, when the server returns them.
    ids: Option<usize>,
    has_text: bool,
}

/// `req` carrying the bearer token, if any.
fn authorized(req: reqwest::RequestBuilder, bearer: Option<&str>) -> reqwest::RequestBuilder {
    match bearer {
        Some(b) => req.header("authorization", b),
        None => req,
    }
}

/// The first model GET /v1/models lists, if any.
pub async fn served_model(http: &reqwest::Client, base: &str, bearer: Option<&str>) -> Option<String> {
    let req = authorized(http.get(format!("{base}/v1/models")), bearer);
    let v: Value = req.send().await.ok()?.json().await.ok()?;
    v["data"][0]["id"].as_str().map(String::from)
}

impl Target {
    pub(super) async fn send_openai(
        &self,
        request_id: String,
        prompt: &Prompt,
        ask: &Ask,
        start: Instant,
        rec: &mut Record,
    ) -> Result<(), String> {
        let (max_tokens, ignore_eos) = self.limits(ask);
        let mut body = json!({
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if self.extensions {
            // Servers that do not know them ignore them (vLLM, llama.cpp, ours); some
            // refuse them, hence --no-extensions.
            body["ignore_eos"] = json!(ignore_eos);
            body["return_token_ids"] = json!(true);
            if let Some(on) = ask.prefix_cache {
                body["prefix_cache"] = json!(on);
            }
        }
        if let Some(schema) = &ask.json_schema {
            body["response_format"] = response_format(schema)?;
        }
        match (self.api, prompt) {
            (Api::OpenaiChat, Prompt::Text(t)) => body["messages"] = json!([{"role": "user", "content": t}]),
            (Api::OpenaiChat, Prompt::Ids(_)) => return Err("chat requests need text prompts".into()),
            (_, Prompt::Ids(ids)) => body["prompt"] = json!(ids),
            (_, Prompt::Text(t)) => body["prompt"] = json!(t),
        }
        if let Some(m) = &self.model {
            body["model"] = json!(m);
        }
        let req = self
            .http
            .post(&self.completions_url)
            .header("x-request-id", request_id)
            .json(&body);
        let resp = authorized(req, self.bearer.as_deref())
            .send()
            .await
            .map_err(|e| format!("POST {}: {e}", self.completions_url))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(format!("HTTP {status}: {}", truncate(text.trim(), 300)));
        }
        let mut bytes = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut text = String::new();
        let mut usage: Option<(usize, usize)> = None;
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk.map_err(|e| format!("reading the stream: {e}"))?;
            let now = start.elapsed();
            buf.extend_from_slice(&chunk);
            while let Some((event, rest)) = split_event(&buf) {
                let data = sse_data(&event);
                buf = rest;
                let Some(data) = data else { continue };
                if data.trim() == "[DONE]" {
                    if rec.constrained {
                        rec.text.clone_from(&text);
                    }
                    return self.count(rec, prompt, &chunks, &text, usage);
                }
                let v: Value =
                    serde_json::from_str(&data).map_err(|e| format!("bad SSE data ({e}): {}", truncate(&data, 200)))?;
                if let Some(err) = v.get("error") {
                    let msg = err["message"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| err.to_string());
                    return Err(format!("server error in stream: {msg}"));
                }
                for choice in v["choices"].as_array().into_iter().flatten() {
                    // Completions stream `text`, chat streams `delta.content`.
                    let content = choice["text"].as_str().or(choice["delta"]["content"].as_str());
                    let content = content.unwrap_or_default();
                    text.push_str(content);
                    if let Some(reason) = choice["finish_reason"].as_str() {
                        rec.finish = Some(match reason {
                            "length" => Finish::Length,
                            _ => Finish::Complete,
                        });
                    }
                    chunks.push(Chunk {
                        at: now,
                        ids: choice.get("token_ids").and_then(Value::as_array).map(Vec::len),
                        has_text: !content.is_empty(),
                    });
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    let n = |k: &str| u[k].as_u64().map(|x| x as usize);
                    usage = Some((n("prompt_tokens").unwrap_or(0), n("completion_tokens").unwrap_or(0)));
                    rec.cached_prompt_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64().map(|x| x as usize);
                }
            }
        }
        Err("stream ended without data: [DONE]".into())
    }

    /// Counts a finished OpenAI stream: by the token ids when every chunk with text had
    /// them, else by `usage`, the tokenizer or the chunks. Without ids, TTFT is the first
    /// chunk with content and ITL the gaps between such chunks, as a user sees them.
    fn count(
        &self,
        rec: &mut Record,
        prompt: &Prompt,
        chunks: &[Chunk],
        text: &str,
        usage: Option<(usize, usize)>,
    ) -> Result<(), String> {
        let (usage_prompt, usage_completion) = usage.unzip();
        let has_ids = chunks.iter().any(|c| c.ids.is_some()) && chunks.iter().all(|c| c.ids.is_some() || !c.has_text);
        if has_ids {
            let mut last = None;
            for c in chunks {
                rec.tokens(c.ids.unwrap_or(0), c.at, &mut last);
            }
            return rec.settle(prompt, usage_prompt, usage_completion, self.tokenizer.as_ref());
        }
        let content: Vec<&Chunk> = chunks.iter().filter(|c| c.has_text).collect();
        rec.ttft = content.first().map(|c| c.at);
        rec.itl = content.windows(2).map(|w| w[1].at - w[0].at).collect();
        (rec.output_tokens, rec.output_count) = match (usage_completion, &self.tokenizer) {
            (Some(n), _) => (n, Count::Usage),
            (None, Some(tok)) => (count_tokens(tok, text, false)?, Count::Tokenizer),
            (None, None) => (content.len(), Count::Chunks),
        };
        rec.settle(prompt, usage_prompt, None, self.tokenizer.as_ref())
    }
}

/// The OpenAI `response_format` that constrains an output to the JSON Schema `schema`
/// (JSON text, checked when the run starts).
fn response_format(schema: &str) -> Result<Value, String> {
    let schema: Value = serde_json::from_str(schema).map_err(|e| format!("the JSON Schema is no JSON: {e}"))?;
    Ok(json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}))
}

/// Splits the first whole SSE event (ended by a blank line) off the buffer.
fn split_event(buf: &[u8]) -> Option<(String, Vec<u8>)> {
    let (end, sep) = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| (p, 2))
        .into_iter()
        .chain(buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4)))
        .min_by_key(|&(p, _)| p)?;
    Some((
        String::from_utf8_lossy(&buf[..end]).into_owned(),
        buf[end + sep..].to_vec(),
    ))
}

/// The `data:` lines of one SSE event, joined; None for comments and other fields.
fn sse_data(event: &str) -> Option<String> {
    let lines: Vec<&str> = event
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_on_blank_lines() {
        let buf = b"data: {\"a\":1}\n\n: comment\r\n\r\ndata: [DONE]\n\npartial".to_vec();
        let (e, rest) = split_event(&buf).unwrap();
        assert_eq!(sse_data(&e).as_deref(), Some("{\"a\":1}"));
        let (e, rest) = split_event(&rest).unwrap();
        assert_eq!(sse_data(&e), None);
        let (e, rest) = split_event(&rest).unwrap();
        assert_eq!(sse_data(&e).as_deref(), Some("[DONE]"));
        assert!(split_event(&rest).is_none());
    }
}
