//! Streaming detokenization: turning generated ids, one at a time, into text deltas.
//!
//! Decoding one id at a time is wrong for SentencePiece-style tokenizers: a character may be
//! split across several byte-fallback (`<0xNN>`) or byte-level tokens, and the leading space of a
//! `▁` piece depends on what comes before it. So, as TGI and vLLM do, the decoder keeps a short
//! window of ids: it decodes `ids[prefix..read]` (text already emitted) and `ids[prefix..]`, and
//! emits the difference once it does not end in an incomplete character (U+FFFD).

use anyhow::Result;

use crate::Tokenizer;

const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;
/// Prompt ids decoded before the first generated id, for its spacing (vLLM uses 5 too).
const CONTEXT_IDS: usize = 5;
/// A UTF-8 character has at most 4 bytes, so at most 3 ids can hold an incomplete one.
const MAX_PARTIAL_IDS: usize = 3;
/// Ids already emitted are dropped from the window once this many have piled up.
const COMPACT_AT: usize = 64;

/// Turns generated ids into text deltas for one sequence.
///
/// The concatenation of every [`push`](Self::push) delta and the final
/// [`finish`](Self::finish) equals `decode(prompt ++ generated)` minus its prefix
/// `decode(prompt)`, both with special tokens skipped (TGI's semantics), where only the prompt's
/// last few ids are used as context. With an empty prompt (or just `<s>`), it is
/// `decode(generated)`. So after a Mistral chat prompt, a first token `▁Paris` gives `" Paris"`,
/// while as the very first token of a text it gives `"Paris"`.
///
/// If the prompt ends inside a character (say, it holds tokens already streamed by a failed
/// replica), those trailing ids count as not yet emitted, so the character comes out whole once
/// the generated ids complete it.
///
/// Text is held back only while it ends in U+FFFD. The output equals the full decode except
/// around invalid or unfinished byte sequences under Hugging Face's byte fallback, which turns a
/// whole run of byte tokens into U+FFFD once any of them is bad: this decoder keeps the
/// characters of the run it already emitted and replaces only the rest.
#[derive(Clone, Debug)]
pub struct StreamDecoder {
    tok: Tokenizer,
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix: usize,
    /// End of the ids whose text has been emitted.
    read: usize,
}

impl StreamDecoder {
    /// A decoder for text generated after `prompt_ids`. Prompt ids outside the vocabulary are
    /// ignored.
    pub fn new(tok: &Tokenizer, prompt_ids: &[u32]) -> Self {
        let window = CONTEXT_IDS + 2 * MAX_PARTIAL_IDS;
        let tail: Vec<u32> = prompt_ids[prompt_ids.len().saturating_sub(window)..]
            .iter()
            .copied()
            .filter(|&id| tok.contains(id))
            .collect();
        let text = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        // A prompt ending inside a character: leave those ids to be emitted with the rest of it.
        let mut read = tail.len();
        while read > 0 && tail.len() - read < MAX_PARTIAL_IDS && text(&tail[..read]).ends_with(REPLACEMENT) {
            read -= 1;
        }
        // A window starting inside a character would decode it as U+FFFD; start it earlier.
        let mut prefix = read.saturating_sub(CONTEXT_IDS);
        while prefix > 0
            && read - prefix < CONTEXT_IDS + MAX_PARTIAL_IDS
            && text(&tail[prefix..read]).starts_with(REPLACEMENT)
        {
            prefix -= 1;
        }
        Self {
            tok: tok.clone(),
            ids: tail[prefix..].to_vec(),
            prefix: 0,
            read: read - prefix,
        }
    }

    /// Adds a generated id and returns the text it completes (often empty while a character is
    /// incomplete, and for special tokens). An id the tokenizer does not know (a model's padded
    /// vocabulary) has no text and leaves the decoder unchanged.
    pub fn push(&mut self, id: u32) -> Result<String> {
        if !self.tok.contains(id) {
            return Ok(String::new());
        }
        self.ids.push(id);
        self.emit(false)
    }

    /// Returns whatever text is still held back, an incomplete character coming out as U+FFFD.
    /// The decoder stays usable.
    pub fn finish(&mut self) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        self.emit(true)
    }

    fn emit(&mut self, force: bool) -> Result<String> {
        let emitted = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let text = self.tok.decode(&self.ids[self.prefix..], true)?;
        let complete = text.len() > emitted.len() && !text.ends_with(REPLACEMENT);
        if !(complete || force) {
            return Ok(String::new());
        }
        let delta = match text.strip_prefix(&emitted) {
            Some(rest) => rest.to_string(),
            // The emitted text was rewritten: Hugging Face's byte fallback turns a whole run of
            // byte tokens into U+FFFD once it holds an invalid or incomplete character, even
            // characters already emitted. The run then crosses `read`, so the pending ids start
            // with a byte token and decode fine (and without leading-space effects) alone.
            None => self.tok.decode(&self.ids[self.read..], true)?,
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        if self.prefix >= COMPACT_AT {
            self.ids.drain(..self.prefix);
            self.read -= self.prefix;
            self.prefix = 0;
        }
        Ok(delta)
    }
}
