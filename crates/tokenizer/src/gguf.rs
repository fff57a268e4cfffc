//! Tokenizers described by a llama.cpp GGUF file's `tokenizer.ggml.*` metadata, built
//! to behave as the Hugging Face `tokenizer.json` the file was converted from:
//! `gpt2` vocabularies as byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre`
//! names, `llama` (SentencePiece) vocabularies as BPE with byte fallback and merges
//! derived from the piece scores, as transformers' converter derives them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: u64 = 1;
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// SentencePiece's word-boundary marker.
const SPACE: &str = "\u{2581}";

/// A GGUF file's metadata (the tensors are not read).
pub(crate) fn read_metadata(path: &Path) -> Result<HashMap<String, Value>> {
    let mut file = std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?,
    );
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("{} is not a valid GGUF file: {e}", path.display()))?;
    Ok(content.metadata)
}

/// What GGUF metadata says of chat: its `tokenizer.chat_template`, and the text of
/// its BOS and EOS tokens.
pub(crate) struct ChatFacts {
    pub template: Option<String>,
    pub bos: Option<String>,
    pub eos: Option<String>,
}

impl ChatFacts {
    pub fn from_metadata(metadata: &HashMap<String, Value>) -> Result<Self> {
        let md = Md(metadata);
        Ok(ChatFacts {
            template: md.str("tokenizer.chat_template")?.map(str::to_owned),
            bos: md.token("tokenizer.ggml.bos_token_id")?,
            eos: md.token("tokenizer.ggml.eos_token_id")?,
        })
    }
}

/// A tokenizer built from GGUF metadata, with the BOS/EOS facts the metadata gives.
pub(crate) struct GgufTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
}

struct Md<'a>(&'a HashMap<String, Value>);

impl<'a> Md<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }

    fn bad(&self, key: &str) -> String {
        format!("metadata key `{key}` has an unexpected type")
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => bail!(self.bad(key)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => bail!(self.bad(key)),
        }
    }

    fn id(&self, key: &str) -> Result<Option<u32>> {
        self.get(key)
            .map(|v| as_u64(v).map(|n| n as u32).with_context(|| self.bad(key)))
            .transpose()
    }

    /// The text of the token whose id `id_key` holds.
    fn token(&self, id_key: &str) -> Result<Option<String>> {
        let Some(id) = self.id(id_key)? else {
            return Ok(None);
        };
        let tokens = match self.get("tokenizer.ggml.tokens") {
            None => None,
            Some(Value::Array(t)) => Some(t),
            Some(_) => bail!(self.bad("tokenizer.ggml.tokens")),
        };
        match tokens.and_then(|t| t.get(id as usize)) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("`{id_key}` is {id}, which names no string in tokenizer.ggml.tokens"),
        }
    }

    /// An array's elements through `f`; `None` when the key is absent.
    fn array<T>(&self, key: &str, f: impl Fn(&'a Value) -> Option<T>) -> Result<Option<Vec<T>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| f(v).with_context(|| format!("element {i} of `{key}` has an unexpected type")))
                .collect::<Result<Vec<T>>>()
                .map(Some),
            Some(_) => bail!(self.bad(key)),
        }
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn as_f32(v: &Value) -> Option<f32> {
    match *v {
        Value::F32(x) => Some(x),
        Value::F64(x) => Some(x as f32),
        _ => None,
    }
}

impl GgufTokenizer {
    pub fn from_metadata(metadata: &HashMap<String, Value>) -> Result<Self> {
        let md = Md(metadata);
        let kind = md
            .str("tokenizer.ggml.model")?
            .context("the file has no tokenizer (no `tokenizer.ggml.model`)")?;
        if !["gpt2", "llama"].contains(&kind) {
            bail!(
                "unsupported tokenizer.ggml.model {kind:?}: sirocco reads \"gpt2\" (byte-level BPE) \
                 and \"llama\" (SentencePiece) vocabularies"
            );
        }
        let tokens = md
            .array("tokenizer.ggml.tokens", as_string)?
            .context("missing metadata key `tokenizer.ggml.tokens`")?;
        let types = md.array("tokenizer.ggml.token_type", as_u64)?;
        if let Some(t) = &types {
            if t.len() != tokens.len() {
                bail!(
                    "`tokenizer.ggml.token_type` has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                );
            }
        }
        let type_of = |id: usize| types.as_ref().map_or(NORMAL, |t| t[id]);
        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        // llama.cpp adds BOS by default for SentencePiece vocabularies only.
        let (mut inner, add_bos_default) = if kind == "gpt2" {
            (byte_level_bpe(&md, vocab)?, false)
        } else {
            (sentencepiece_bpe(&md, &tokens, &type_of, vocab)?, true)
        };
        // Control and unknown tokens are special (skipped when decoding with
        // skip_special); user-defined ones are matched whole, as SentencePiece does.
        let added = |wanted: &[u64], special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .enumerate()
                .filter(|&(i, _)| wanted.contains(&type_of(i)))
                .map(|(_, t)| AddedToken::from(t.clone(), special).normalized(false))
                .collect()
        };
        inner.add_special_tokens(&added(&[UNKNOWN, CONTROL], true));
        inner.add_tokens(&added(&[USER_DEFINED], false));
        let id = |key: &str| -> Result<Option<u32>> {
            match md.id(key)? {
                Some(id) if id as usize >= tokens.len() => {
                    bail!("`{key}` is {id}, outside the {} tokens", tokens.len())
                }
                other => Ok(other),
            }
        };
        Ok(GgufTokenizer {
            inner,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            add_bos: md.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default),
        })
    }
}

/// llama.cpp's Llama 3 pre-tokenizer regex (also used by Smaug).
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's: Llama 3's, but one digit at a time.
const REGEX_QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    let s = Split::new(
        SplitPattern::Regex(regex.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow::anyhow!("bad pre-tokenizer regex: {e}"))?;
    Ok(s.into())
}

/// A `gpt2` vocabulary: byte-level BPE, split first as `tokenizer.ggml.pre` says (the
/// pipelines of the Hugging Face tokenizers llama.cpp recognises by those names).
fn byte_level_bpe(md: &Md, vocab: HashMap<String, u32>) -> Result<tokenizers::Tokenizer> {
    let merges = md
        .array("tokenizer.ggml.merges", as_string)?
        .context("missing metadata key `tokenizer.ggml.merges`")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
            None => bail!("`tokenizer.ggml.merges` entry {m:?} is not two tokens separated by a space"),
        })
        .collect::<Result<Vec<_>>>()?;
    let pre = md.str("tokenizer.ggml.pre")?.unwrap_or("default");
    // GPT-2's own regex is ByteLevel's built-in one.
    let gpt2 = || ByteLevel::new(false, true, true);
    let (pre_tokenizer, normalizer, ignore_merges): (PreTokenizerWrapper, Option<NormalizerWrapper>, bool) = match pre {
        "default" | "gpt2" | "gpt-2" => (gpt2().into(), None, false),
        // GPT-2's regex after splitting digits apart: SmolLM's and StarCoder's.
        "smollm" | "starcoder" | "refact" => (
            PreTokenizerSequence::new(vec![Digits::new(true).into(), gpt2().into()]).into(),
            None,
            false,
        ),
        "llama3" | "llama-bpe" | "smaug-bpe" => (
            PreTokenizerSequence::new(vec![split(REGEX_LLAMA3)?, ByteLevel::new(false, true, false).into()]).into(),
            None,
            true,
        ),
        "qwen2" => (
            PreTokenizerSequence::new(vec![split(REGEX_QWEN2)?, ByteLevel::new(false, false, false).into()]).into(),
            Some(NFC.into()),
            false,
        ),
        other => bail!(
            "unsupported tokenizer.ggml.pre {other:?}: sirocco knows gpt2, smollm, starcoder, refact, \
                 llama3 (llama-bpe, smaug-bpe) and qwen2"
        ),
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| anyhow::anyhow!("invalid BPE vocabulary: {e}"))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(pre_tokenizer));
    t.with_normalizer(normalizer);
    t.with_decoder(Some(ByteLevel::new(false, true, true)));
    Ok(t)
}

/// A `llama` (SentencePiece BPE) vocabulary as Hugging Face's converter makes it:
/// spaces become `▁` (with one prepended unless `tokenizer.ggml.add_space_prefix` is
/// false), unknown bytes fall back to `<0xNN>` pieces, and the merges are every split
/// of a piece into two pieces, ranked by the merged piece's score: SentencePiece merges
/// the best-scoring pair first, which is what BPE's ranks then do.
fn sentencepiece_bpe(
    md: &Md,
    tokens: &[String],
    type_of: &dyn Fn(usize) -> u64,
    vocab: HashMap<String, u32>,
) -> Result<tokenizers::Tokenizer> {
    let scores = md
        .array("tokenizer.ggml.scores", as_f32)?
        .context("missing metadata key `tokenizer.ggml.scores` (a llama vocabulary needs its piece scores)")?;
    if scores.len() != tokens.len() {
        bail!(
            "`tokenizer.ggml.scores` has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        );
    }
    let mut merges: Vec<(usize, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // Only normal pieces come out of merging text; control and byte pieces do not.
        if type_of(id) != NORMAL {
            continue;
        }
        let first = merges.len();
        for (cut, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&piece[..cut]), vocab.get(&piece[cut..])) {
                merges.push((id, l, r));
            }
        }
        merges[first..].sort_by_key(|&(_, l, r)| (l, r));
    }
    // Stable, so equal scores keep the order of the pieces' ids.
    merges.sort_by(|a, b| scores[b.0].total_cmp(&scores[a.0]));
    let merges = merges
        .into_iter()
        .map(|(_, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect();
    let unk = md.id("tokenizer.ggml.unknown_token_id")?.unwrap_or(0) as usize;
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = tokens.get(unk) {
        builder = builder.unk_token(u.clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| anyhow::anyhow!("invalid SentencePiece vocabulary: {e}"))?;
    let prefix = md.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let replace = |from: &str, to: &str| Replace::new(from, to).map_err(|e| anyhow::anyhow!("{e}"));
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if prefix {
        normalizers.push(Prepend::new(SPACE.into()).into());
    }
    normalizers.push(replace(" ", SPACE)?.into());
    let mut decoders = vec![
        replace(SPACE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    t.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(t)
}
