//! [`Tokenizer`]: a cheaply clonable wrapper over a Hugging Face `tokenizers` tokenizer with the
//! BOS/EOS handling the engine needs.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Context, Result};

use crate::builtin::builtin_json;
#[cfg(feature = "gguf")]
use crate::gguf::GgufTokenizer;

/// A tokenizer. Cloning is cheap (the vocabulary is shared), so each sequence's
/// [`crate::StreamDecoder`] can own one.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos_id: Option<u32>,
    /// End-of-sequence ids: generation stops on any of them.
    eos_ids: Vec<u32>,
    /// Whether `encode(.., add_bos: true)` puts BOS first: `tokenizer_config.json` or a
    /// GGUF file says (SmolLM's, for one, does not want it).
    add_bos: bool,
    /// `known[id]`: whether `id` names a token. Looked up per streamed token, where
    /// asking the tokenizer would copy the token's text each time.
    known: Arc<Vec<bool>>,
}

/// Which ids name a token of `t`, added tokens included (ids past the last are
/// known to be unknown).
fn known_ids(t: &tokenizers::Tokenizer) -> Arc<Vec<bool>> {
    let vocab = t.get_vocab(true);
    let mut known = vec![false; vocab.values().max().map_or(0, |&m| m as usize + 1)];
    for &id in vocab.values() {
        known[id as usize] = true;
    }
    Arc::new(known)
}

/// The text of token `key` (`bos_token`, `eos_token`, ...) in a
/// `tokenizer_config.json`, written either as the text or as an object with its
/// `content`.
pub fn config_token<'a>(config: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    match &config[key] {
        serde_json::Value::String(s) => Some(s),
        v => v["content"].as_str(),
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
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
            eos_ids: inner.token_to_id("</s>").into_iter().collect(),
            add_bos: true,
            known: known_ids(&inner),
            inner: Arc::new(inner),
        }
    }

    /// The tokenizer of a Hugging Face checkpoint directory: `tokenizer.json`, with BOS,
    /// EOS and whether to add BOS as `tokenizer_config.json` and `generation_config.json`
    /// say (an `eos_token_id` list stops on any of its ids). `None` when the directory
    /// has no tokenizer.json. Without those files, `<s>` and `</s>` are BOS and EOS.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let mut t = Self::from_file(&path)?;
        let read = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            let v = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))?;
            Ok(Some(v))
        };
        if let Some(cfg) = read("tokenizer_config.json")? {
            let token = |key: &str| -> Result<Option<u32>> {
                let Some(text) = config_token(&cfg, key) else {
                    return Ok(None);
                };
                t.inner
                    .token_to_id(text)
                    .map(Some)
                    .with_context(|| format!("tokenizer_config.json's {key} {text:?} is not in tokenizer.json"))
            };
            if let Some(b) = token("bos_token")? {
                t.bos_id = Some(b);
            }
            if let Some(e) = token("eos_token")? {
                t.eos_ids = vec![e];
            }
            if let Some(add) = cfg["add_bos_token"].as_bool() {
                t.add_bos = add;
            }
        }
        if let Some(gen) = read("generation_config.json")? {
            if let Some(b) = gen["bos_token_id"].as_u64() {
                t.bos_id = Some(b as u32);
            }
            let ids: Vec<u32> = match &gen["eos_token_id"] {
                serde_json::Value::Number(n) => n.as_u64().into_iter().map(|x| x as u32).collect(),
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                _ => Vec::new(),
            };
            for e in ids {
                if !t.eos_ids.contains(&e) {
                    t.eos_ids.push(e);
                }
            }
        }
        Ok(Some(t))
    }

    /// Refuses a tokenizer with ids the model has no row for. A model's vocabulary may
    /// be larger (padded); generated ids past the tokenizer decode to no text.
    pub fn check_fits(&self, model_vocab: usize) -> Result<()> {
        if self.vocab_size() > model_vocab {
            bail!(
                "the tokenizer has {} tokens but the model's vocabulary only {model_vocab}: \
                 they do not belong together",
                self.vocab_size()
            );
        }
        Ok(())
    }

    /// Builds the tokenizer a llama.cpp GGUF file describes in its `tokenizer.ggml.*`
    /// metadata (`gpt2` byte-level BPE or `llama` SentencePiece vocabularies).
    #[cfg(feature = "gguf")]
    pub fn from_gguf(path: &Path) -> Result<Self> {
        Self::from_gguf_metadata(&crate::gguf::read_metadata(path)?)
            .with_context(|| format!("cannot build the tokenizer of {}", path.display()))
    }

    /// [`Tokenizer::from_gguf`] from metadata already read.
    #[cfg(feature = "gguf")]
    pub fn from_gguf_metadata(
        metadata: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    ) -> Result<Self> {
        let t = GgufTokenizer::from_metadata(metadata)?;
        Ok(Self {
            known: known_ids(&t.inner),
            inner: Arc::new(t.inner),
            bos_id: t.bos_id,
            eos_ids: t.eos_id.into_iter().collect(),
            add_bos: t.add_bos,
        })
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

    /// Id of `<s>`, if the vocabulary has it (of the GGUF file's BOS token, for one).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The first end-of-sequence id, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_ids.first().copied()
    }

    /// Whether encoding with special tokens puts BOS first.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Every end-of-sequence id.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Token ids of `text`. With `add_bos`, the tokenizer's special tokens are added (for
    /// Mistral's and the built-in tokenizer, a leading `<s>`), and `<s>` is prepended if the
    /// tokenizer's post-processor did not already put one first (for a GGUF tokenizer,
    /// only if its file asks for BOS).
    ///
    /// As in Hugging Face `tokenizers`, special-token text inside `text` (a literal `"<s>"`) is
    /// encoded as that special token, whatever `add_bos` says.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_bos)
            .map_err(|e| anyhow!("cannot encode text: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, true, Some(bos)) = (add_bos, self.add_bos, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; with `skip_special`, special tokens such as `<s>` and `</s>` are left out.
    /// Ids the tokenizer does not know (a model's padded vocabulary) have no text, as in
    /// transformers.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let known: Vec<u32> = ids.iter().copied().filter(|&id| self.contains(id)).collect();
        self.inner
            .decode(&known, skip_special)
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

    /// The id of the special token spelled `text` (such as Mistral's `[TOOL_CALLS]`),
    /// if the vocabulary has one; ordinary tokens spelling that text do not count.
    pub fn special_token_id(&self, text: &str) -> Option<u32> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .find(|(_, t)| t.special && t.content == text)
            .map(|(id, _)| id)
    }

    /// Whether `id` names a token; ids of a model's padded vocabulary may not.
    pub(crate) fn contains(&self, id: u32) -> bool {
        self.known.get(id as usize).copied().unwrap_or(false)
    }
}
