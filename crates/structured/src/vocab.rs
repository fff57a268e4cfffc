//! The served tokenizer as llguidance sees it: the bytes each id stands for (special
//! tokens marked, so that no grammar literal can produce them by accident) and a
//! way to tokenize text.

use anyhow::{anyhow, Context, Result};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use sirocco_tokenizer::Tokenizer;
use std::sync::Arc;

struct Vocab {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // llguidance needs tokens that spell exactly `s`. The tokenizer's own answer
        // usually does, but a SentencePiece tokenizer prepends a space to text it
        // sees as a start, and invalid UTF-8 has no text: then the longest-match
        // tokens of the vocabulary, which always spell `s`.
        if let Ok(text) = std::str::from_utf8(s) {
            if let Ok(ids) = self.tokenizer.encode(text, false) {
                if self.trie.decode_raw(&ids) == s {
                    return ids;
                }
            }
        }
        self.trie.greedy_tokenize(s)
    }
}

/// llguidance's view of `tokenizer`, for a model whose vocabulary has `model_vocab`
/// ids (ids the tokenizer lacks, a padded vocabulary's, stand for no bytes and so
/// are never allowed).
pub(crate) fn tok_env(tokenizer: &Tokenizer, model_vocab: usize) -> Result<TokEnv> {
    let json: serde_json::Value = serde_json::from_str(&tokenizer.to_json()?).context("the tokenizer's JSON")?;
    // The reader asserts on vocabularies it does not expect; that is a tokenizer
    // structured output cannot serve, not a reason to stop the router.
    let mut words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
        .map_err(|_| anyhow!("llguidance cannot read this tokenizer's vocabulary"))??;
    words.resize(words.len().max(model_vocab).max(tokenizer.vocab_size()), Vec::new());
    let eos = tokenizer
        .eos_id()
        .ok_or_else(|| anyhow!("the tokenizer has no end-of-sequence token to end a constrained output"))?;
    let info = TokRxInfo {
        vocab_size: words.len() as u32,
        tok_eos: eos,
        tok_bos: tokenizer.bos_id(),
        tok_pad: None,
        tok_unk: None,
        tok_end_of_turn: None,
    };
    Ok(Arc::new(Vocab {
        trie: TokTrie::from(&info, &words),
        tokenizer: tokenizer.clone(),
    }))
}
