//! [`Tokenizer`]: a cheaply clonable wrapper over a Hugging Face `tokenizers` tokenizer with the
//! BOS/EOS handling the engine needs.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Context, Result};

use crate::builtin::builtin_json;

/// A tokenizer. Cloning is cheap (the vocabulary is shared), so each sequence's
/// [`crate::StreamDecoder`] can own one.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json =
            std::fs::read_to_string(path).with_context(|| format!("cannot read tokenizer file {}", path.display()))?;
        Self::from_json_str(&json).with_context(|| format!("cannot load tokenizer file {}", path.display()))
    }

    /// Parses the contents of a Hugging Face `tokenizer.json`.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = s.parse().map_err(|e| anyhow!("invalid tokenizer.json: {e}"))?;
        Ok(Self::wrap(inner))
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Self {
        Self {
            bos_id: inner.token_to_id("<s>"),
            eos_id: inner.token_to_id("</s>"),
            inner: Arc::new(inner),
        }
    }

    /// The tokenizer of sirocco's built-in demo model; see [`crate::BUILTIN_VOCAB_SIZE`].
    pub fn builtin() -> Self {
        static BUILTIN: OnceLock<Tokenizer> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                // Built from constants in this crate and pinned by its tests, so failure here
                // is a bug in this crate, not bad input.
                Self::from_json_str(&builtin_json().to_string()).expect("the built-in tokenizer definition is valid")
            })
            .clone()
    }

    /// Number of token ids, added (special) tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of `<s>`, if the vocabulary has it.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Id of `</s>`, if the vocabulary has it.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Token ids of `text`. With `add_bos`, the tokenizer's special tokens are added (for
    /// Mistral's and the built-in tokenizer, a leading `<s>`), and `<s>` is prepended if the
    /// tokenizer's post-processor did not already put one first.
    ///
    /// As in Hugging Face `tokenizers`, special-token text inside `text` (a literal `"<s>"`) is
    /// encoded as that special token, whatever `add_bos` says.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_bos)
            .map_err(|e| anyhow!("cannot encode text: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, Some(bos)) = (add_bos, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; with `skip_special`, special tokens such as `<s>` and `</s>` are left out.
    /// Fails on an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| !self.contains(id)) {
            bail!("token id {bad} is outside the vocabulary (size {})", self.vocab_size());
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }

    /// The tokenizer as a Hugging Face `tokenizer.json`.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))
    }

    /// The vocabulary entry of `id` (such as `"▁Hello"`, `"<0x0A>"` or `"Ġworld"`).
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` names a token; ids of a model's padded vocabulary may not.
    pub(crate) fn contains(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some()
    }
}
