//! Tokenizers built from GGUF metadata against the same vocabularies loaded from
//! `tokenizer.json`, and against SentencePiece's own ids for Mistral's vocabulary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use serde_json::{json, Value as Json};
use sirocco_tokenizer::Tokenizer;

/// `<repo root>/../shared`. Missing test data is a failure, not a skip.
fn shared(rel: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared").join(rel);
    assert!(path.exists(), "test data file {} is missing", path.display());
    path
}

fn strings(v: impl IntoIterator<Item = String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

/// Writes `md` as a GGUF file (no tensors) and builds its tokenizer.
fn gguf_tokenizer(md: &[(&str, Value)]) -> anyhow::Result<Tokenizer> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &refs, &[]).unwrap();
    Tokenizer::from_gguf(&path)
}

/// GPT-2's byte-to-symbol map: printable bytes stand for themselves, the others for
/// the code points from U+0100 on.
fn byte_symbols() -> Vec<char> {
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

const MERGES: [&str; 12] = [
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "1 2", "12 3", "' s", "Ġ Ġ", "t h", "th in",
];
const EOT: &str = "<|endoftext|>";

/// A small byte-level BPE vocabulary: its tokens (bytes, then merges, then EOT) and merges.
fn small_bpe() -> (Vec<String>, Vec<String>) {
    let mut tokens: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
    for m in MERGES {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push(EOT.into());
    (tokens, MERGES.iter().map(|m| m.to_string()).collect())
}

fn small_bpe_json(pre_tokenizer: Json) -> Tokenizer {
    let (tokens, merges) = small_bpe();
    let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let eot = tokens.len() - 1;
    let j = json!({
        "version": "1.0",
        "added_tokens": [{"id": eot, "content": EOT, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    Tokenizer::from_json_str(&j.to_string()).unwrap()
}

fn small_bpe_gguf(pre: &str) -> Tokenizer {
    let (tokens, merges) = small_bpe();
    let n = tokens.len();
    let types: Vec<Value> = (0..n).map(|i| Value::I32(if i == n - 1 { 3 } else { 1 })).collect();
    gguf_tokenizer(&[
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(n as u32 - 1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(n as u32 - 1)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ])
    .unwrap()
}

const TEXTS: [&str; 6] = [
    "the thinner's 123 then",
    "  two spaces\n\nand a newline 4567 1234",
    "emoji 🌬️🔥 café naïve",
    "the end<|endoftext|>the start",
    "",
    " a",
];

fn same(a: &Tokenizer, b: &Tokenizer, what: &str) {
    for text in TEXTS {
        let ids = a.encode(text, true).unwrap();
        assert_eq!(b.encode(text, true).unwrap(), ids, "{what}: {text:?}");
        assert_eq!(
            b.decode(&ids, false).unwrap(),
            a.decode(&ids, false).unwrap(),
            "{what}: {text:?}"
        );
        assert_eq!(
            b.decode(&ids, true).unwrap(),
            a.decode(&ids, true).unwrap(),
            "{what}: {text:?}"
        );
        assert_eq!(b.decode(&ids, false).unwrap(), text, "{what}");
    }
}

#[test]
fn byte_level_bpe_from_gguf_matches_tokenizer_json() {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let gpt2 = small_bpe_gguf("gpt2");
    same(&small_bpe_json(byte_level.clone()), &gpt2, "gpt2");
    // SmolLM's tokenizer.json splits digits apart before GPT-2's regex.
    let smollm_json = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true}, byte_level]});
    let smollm = small_bpe_gguf("smollm");
    same(&small_bpe_json(smollm_json), &smollm, "smollm");
    // The merges and the pre-tokenizer both matter: "123" is one token only for gpt2.
    assert_eq!(gpt2.encode("123", false).unwrap().len(), 1);
    assert_eq!(smollm.encode("123", false).unwrap().len(), 3);
    assert_eq!(gpt2.encode(" the", false).unwrap().len(), 1);
    // EOT is special and BOS is not added when the file says not to.
    let eot = gpt2.vocab_size() as u32 - 1;
    assert_eq!(gpt2.encode(EOT, true).unwrap(), vec![eot]);
    assert_eq!(gpt2.decode(&[eot], true).unwrap(), "");
    assert_eq!((gpt2.bos_id(), gpt2.eos_id()), (Some(eot), Some(eot)));
}

/// Mistral's vocabulary as llama.cpp's converter writes it. `tokenizer.json` has no
/// piece scores, so each merged piece scores minus the rank of its first merge (the
/// order SentencePiece's own scores put them in, which the JSON's merges came from).
fn mistral_gguf_metadata() -> Vec<(&'static str, Value)> {
    let text = std::fs::read_to_string(shared("tokenizers/mistral-7b-v0.1/tokenizer.json")).unwrap();
    let j: Json = serde_json::from_str(&text).unwrap();
    let vocab = j["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut first_rank: HashMap<String, usize> = HashMap::new();
    for (rank, m) in j["model"]["merges"].as_array().unwrap().iter().enumerate() {
        let pair = m.as_array().unwrap();
        let merged = format!("{}{}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        first_rank.entry(merged).or_insert(rank);
    }
    let scores = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| Value::F32(first_rank.get(t).map_or(-1e6 - id as f32, |&r| -(r as f32))))
        .collect();
    let types = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| {
            Value::I32(match id {
                0 => 2,
                1 | 2 => 3,
                _ if t.starts_with("<0x") && t.len() == 6 => 6,
                _ => 1,
            })
        })
        .collect();
    vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ]
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn sentencepiece_from_gguf_reproduces_sentencepiece() {
    let tok = gguf_tokenizer(&mistral_gguf_metadata()).unwrap();
    let json = Tokenizer::from_file(&shared("tokenizers/mistral-7b-v0.1/tokenizer.json")).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.vocab_size()),
        (Some(1), Some(2), 32000)
    );
    let text = std::fs::read_to_string(shared("tokenizers/mistral-7b-v0.1/encodings.json")).unwrap();
    let cases: Json = serde_json::from_str(&text).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let expected = ids(&c["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), expected, "{text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), ids(&c["ids_with_bos"]), "{text:?}");
        assert_eq!(
            tok.decode(&expected, true).unwrap(),
            c["decoded"].as_str().unwrap(),
            "{text:?}"
        );
        let pieces: Vec<String> = expected.iter().map(|&i| tok.id_to_piece(i).unwrap()).collect();
        let want: Vec<&str> = c["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(pieces, want, "{text:?}");
    }
    for text in TEXTS {
        assert_eq!(
            tok.encode(text, true).unwrap(),
            json.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(tok.decode(&[1, 22557, 2], true).unwrap(), "Hello");
}

#[test]
fn unsupported_vocabularies_are_named() {
    let e = format!(
        "{:#}",
        gguf_tokenizer(&[("tokenizer.ggml.model", Value::String("bert".into()))]).unwrap_err()
    );
    assert!(e.contains("\"bert\""), "{e}");
    let (tokens, merges) = small_bpe();
    let e = format!(
        "{:#}",
        gguf_tokenizer(&[
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("jais".into())),
            ("tokenizer.ggml.tokens", strings(tokens.clone())),
            ("tokenizer.ggml.merges", strings(merges)),
        ])
        .unwrap_err()
    );
    assert!(e.contains("tokenizer.ggml.pre") && e.contains("\"jais\""), "{e}");
    let e = format!(
        "{:#}",
        gguf_tokenizer(&[
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(tokens)),
        ])
        .unwrap_err()
    );
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");
    let e = format!("{:#}", gguf_tokenizer(&[]).unwrap_err());
    assert!(e.contains("no tokenizer"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00").unwrap();
    let e = format!("{:#}", Tokenizer::from_gguf(&junk).unwrap_err());
    assert!(e.contains("junk.gguf") && e.contains("not a valid GGUF file"), "{e}");
}
