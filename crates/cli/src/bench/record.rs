//! What one request saw (its token counts and timings, the prompt tokens the server
//! served from its prefix cache, or its error), and how its tokens were counted: by
//! ids the client received, the server's `usage`, a tokenizer or the streamed chunks.

use super::workload::Prompt;
use sirocco_tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::time::Duration;

/// What one request saw. Times are from when it was sent.
#[derive(Debug, Default)]
pub struct Record {
    /// The request's number in its batch (records come in the order they complete).
    pub index: usize,
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub ttft: Option<Duration>,
    /// Gaps between consecutive tokens; tokens arriving in one message have a zero gap.
    pub itl: Vec<Duration>,
    pub e2e: Duration,
    pub error: Option<String>,
    /// How output_tokens was counted.
    pub output_count: Count,
    /// How input_tokens was counted.
    pub input_count: Count,
    /// Prompt tokens whose KV the server took from its prefix cache; None when it
    /// did not say (an OpenAI server without `usage.prompt_tokens_details`).
    pub cached_prompt_tokens: Option<usize>,
    /// The token ids streamed back (gRPC): a multi-turn conversation sends them back
    /// as the model's turn.
    pub output_ids: Vec<u32>,
    /// Whether the request constrained its output (structured output).
    pub constrained: bool,
    /// The text streamed back, kept for constrained requests only (to check it).
    pub text: String,
    /// Why generation ended, where the server said.
    pub finish: Option<Finish>,
}

/// Why a request's generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// At its max_new_tokens.
    Length,
    /// At the end of sequence, a stop, or the end of its constrained language.
    Complete,
    Cancelled,
}

/// Where a token count comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Count {
    /// Token ids (or gRPC token events) the client received, or the ids it sent.
    #[default]
    TokenIds,
    /// The server's `usage`.
    Usage,
    /// --tokenizer over the text.
    Tokenizer,
    /// One token per streamed chunk with content.
    Chunks,
    /// Nothing to count with (a text prompt without `usage` or a tokenizer): 0.
    Unknown,
}

impl Count {
    fn name(self) -> &'static str {
        match self {
            Count::TokenIds => "token_ids",
            Count::Usage => "usage",
            Count::Tokenizer => "tokenizer",
            Count::Chunks => "chunks",
            Count::Unknown => "unknown",
        }
    }
}

/// The counting methods of `counts`: one name, or each with its number of requests
/// when they differ (a server that sent `usage` for some streams only).
pub fn methods(counts: impl Iterator<Item = Count>) -> String {
    let mut by = BTreeMap::new();
    for c in counts {
        *by.entry(c).or_insert(0usize) += 1;
    }
    match by.len() {
        0 => "none".into(),
        1 => by.keys().next().map_or("none", |c| c.name()).into(),
        _ => by
            .iter()
            .map(|(c, n)| format!("{} ({n})", c.name()))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// How many tokens `tok` makes of `text`; its failure fails the request.
pub fn count_tokens(tok: &Tokenizer, text: &str, add_bos: bool) -> Result<usize, String> {
    Ok(tok.encode(text, add_bos).map_err(|e| format!("{e:#}"))?.len())
}

impl Record {
    /// Notes `n` tokens arriving now.
    pub fn tokens(&mut self, n: usize, at: Duration, last: &mut Option<Duration>) {
        for _ in 0..n {
            match *last {
                None => self.ttft = Some(at),
                Some(prev) => self.itl.push(at - prev),
            }
            *last = Some(at);
        }
        self.output_tokens += n;
    }

    /// Sets the input count and checks the server's claims against what was received.
    /// A text prompt is counted by `usage`, else by the tokenizer (as the server would,
    /// with BOS where the tokenizer adds one; a chat template's tokens are not counted).
    pub fn settle(
        &mut self,
        prompt: &Prompt,
        server_prompt: Option<usize>,
        server_generated: Option<usize>,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<(), String> {
        (self.input_tokens, self.input_count) = match (prompt, server_prompt, tokenizer) {
            (Prompt::Ids(ids), Some(n), _) if n != ids.len() => {
                return Err(format!("the server counted {n} prompt tokens, {} were sent", ids.len()))
            }
            (Prompt::Ids(ids), _, _) => (ids.len(), Count::TokenIds),
            (Prompt::Text(_), Some(n), _) => (n, Count::Usage),
            (Prompt::Text(t), None, Some(tok)) => (count_tokens(tok, t, tok.adds_bos())?, Count::Tokenizer),
            (Prompt::Text(_), None, None) => (0, Count::Unknown),
        };
        match server_generated {
            Some(n) if n != self.output_tokens => Err(format!(
                "the server reported {n} generated tokens, the client received {}",
                self.output_tokens
            )),
            _ => Ok(()),
        }
    }
}
