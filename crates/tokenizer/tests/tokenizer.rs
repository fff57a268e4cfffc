//! Tokenizer tests against real tokenizers and SentencePiece's own output (from `shared/`, beside
//! the repository root), plus the built-in tokenizer and streaming detokenization.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sirocco_tokenizer::{StreamDecoder, Tokenizer, BUILTIN_VOCAB_SIZE};

const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// `<repo root>/../shared`. Missing test data is a failure, not a skip.
fn shared(rel: &str) -> PathBuf {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = repo_root.join("../shared");
    assert!(
        dir.is_dir(),
        "test data directory {} is missing: shared/ must sit beside the repository root",
        dir.display()
    );
    let path = dir.join(rel);
    assert!(path.exists(), "test data file {} is missing", path.display());
    path
}

fn read_json(rel: &str) -> Value {
    let path = shared(rel);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn mistral() -> Tokenizer {
    Tokenizer::from_file(&shared("tokenizers/mistral-7b-v0.1/tokenizer.json")).unwrap()
}

fn mistral_cases() -> Vec<Value> {
    let cases = read_json("tokenizers/mistral-7b-v0.1/encodings.json")["cases"].clone();
    let cases = cases.as_array().unwrap().clone();
    assert!(cases.len() >= 10, "too few cases in encodings.json");
    cases
}

/// Streams `generated` after `prompt` one id at a time; checks that no delta holds U+FFFD unless
/// `full` does, and returns the concatenated text.
fn stream(tok: &Tokenizer, prompt: &[u32], generated: &[u32], full: &str) -> String {
    let mut dec = StreamDecoder::new(tok, prompt);
    let mut out = String::new();
    for &id in generated {
        let delta = dec.push(id).unwrap();
        assert!(
            !delta.contains(REPLACEMENT) || full.contains(REPLACEMENT),
            "delta {delta:?} of {full:?} holds U+FFFD"
        );
        out.push_str(&delta);
    }
    out.push_str(&dec.finish().unwrap());
    out
}

#[test]
fn mistral_special_ids() {
    let tok = mistral();
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.id_to_piece(0).as_deref(), Some("<unk>"));
    assert_eq!(tok.id_to_piece(13).as_deref(), Some("<0x0A>"));
    assert_eq!(tok.id_to_piece(32000), None);
}

#[test]
fn special_tokens_are_found_by_their_text() {
    // Mistral v0.3's vocabulary adds control tokens such as [TOOL_CALLS].
    let mut json = read_json("tokenizers/mistral-7b-v0.1/tokenizer.json");
    let added = json["added_tokens"].as_array_mut().unwrap();
    for (id, content, special) in [(32000, "[TOOL_CALLS]", true), (32001, "[PLAIN]", false)] {
        added.push(
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                                      "rstrip": false, "normalized": false, "special": special}),
        );
    }
    let tok = Tokenizer::from_json_str(&json.to_string()).unwrap();
    assert_eq!(tok.special_token_id("[TOOL_CALLS]"), Some(32000));
    assert_eq!(tok.special_token_id("</s>"), Some(2));
    assert_eq!(tok.special_token_id("[PLAIN]"), None, "not special");
    assert_eq!(tok.special_token_id("[TOOL"), None);
    // Skipped when decoding, so that only its id says a call began.
    assert_eq!(tok.decode(&[32000], true).unwrap(), "");
    assert_eq!(mistral().special_token_id("[TOOL_CALLS]"), None);
}

#[test]
fn mistral_encode_matches_sentencepiece() {
    let tok = mistral();
    for case in mistral_cases() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&case["ids"]), "{text:?}");
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids_with_bos"]),
            "{text:?} with BOS"
        );
        let pieces: Vec<String> = ids(&case["ids"])
            .iter()
            .map(|&id| tok.id_to_piece(id).unwrap())
            .collect();
        assert_eq!(pieces, strings(&case["pieces"]), "{text:?}");
    }
    // SentencePiece's ids for a few more strings, with BOS.
    let check = read_json("tokenizers/mistral-7b-v0.1/tokenizer_check.json");
    let examples = check["examples_spm"].as_array().unwrap();
    assert!(!examples.is_empty());
    for ex in examples {
        let text = ex["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(&ex["ids"]), "{text:?}");
    }
}

#[test]
fn mistral_literal_special_text_becomes_special_tokens() {
    // The one documented difference from SentencePiece: like Hugging Face, "<s>"/"</s>" in the
    // text are the control tokens. tokenizer_check.json records what this JSON gives.
    let tok = mistral();
    let check = read_json("tokenizers/mistral-7b-v0.1/tokenizer_check.json");
    for ex in check["spm_exact_mismatches"].as_array().unwrap() {
        let text = ex["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(&ex["spm_exact"]), "{text:?}");
    }
    // BOS is never added twice.
    assert_eq!(tok.encode("<s>", true).unwrap(), vec![1, 1]);
    assert_eq!(tok.encode("hi", true).unwrap().iter().filter(|&&i| i == 1).count(), 1);
}

#[test]
fn mistral_decode_matches_sentencepiece() {
    let tok = mistral();
    for case in mistral_cases() {
        let decoded = case["decoded"].as_str().unwrap();
        assert_eq!(tok.decode(&ids(&case["ids"]), true).unwrap(), decoded);
        assert_eq!(tok.decode(&ids(&case["ids_with_bos"]), true).unwrap(), decoded);
        let with_special = tok.decode(&ids(&case["ids_with_bos"]), false).unwrap();
        assert!(with_special.starts_with("<s>"), "{with_special:?}");
    }
    assert_eq!(tok.decode(&[1, 22557, 2], true).unwrap(), "Hello");
}

#[test]
fn mistral_streaming_equals_full_decode() {
    let tok = mistral();
    let mut byte_fallback_seen = false;
    for case in mistral_cases() {
        let decoded = case["decoded"].as_str().unwrap();
        let gen = ids(&case["ids"]);
        byte_fallback_seen |= strings(&case["pieces"]).iter().any(|p| p.starts_with("<0x"));
        // Alone, after BOS, and followed by EOS.
        assert_eq!(stream(&tok, &[], &gen, decoded), decoded);
        assert_eq!(stream(&tok, &[1], &gen, decoded), decoded);
        let mut with_eos = gen.clone();
        with_eos.push(2);
        assert_eq!(stream(&tok, &[1], &with_eos, decoded), decoded);
    }
    assert!(byte_fallback_seen, "encodings.json should exercise byte fallback");
}

#[test]
fn mistral_streaming_after_a_prompt_continues_its_text() {
    let tok = mistral();
    for case in mistral_cases() {
        let all = ids(&case["ids_with_bos"]);
        let full = tok.decode(&all, true).unwrap();
        for split in 1..all.len() {
            let (prompt, gen) = all.split_at(split);
            let prompt_text = tok.decode(prompt, true).unwrap();
            // A prompt cut inside a character: that character is still to come.
            let prompt_text = prompt_text.trim_end_matches(REPLACEMENT);
            assert!(full.starts_with(prompt_text), "{full:?} / {prompt_text:?}");
            let want = &full[prompt_text.len()..];
            assert_eq!(stream(&tok, prompt, gen, &full), want, "{full:?} split at {split}");
        }
    }
}

#[test]
fn mistral_chat_reply_keeps_its_leading_space() {
    let tok = mistral();
    let prompt = tok
        .encode("[INST] What is the capital of France? [/INST]", true)
        .unwrap();
    let reply = tok.encode("Paris is.", false).unwrap();
    assert_eq!(stream(&tok, &prompt, &reply, ""), " Paris is.");
    assert_eq!(stream(&tok, &[1], &reply, ""), "Paris is.");
}

#[test]
fn mistral_streaming_of_a_character_split_across_byte_tokens() {
    let tok = mistral();
    // '叠' is <0xE5><0x8F><0xA0> (ids 232, 146, 163) in encodings.json.
    let mut dec = StreamDecoder::new(&tok, &[1]);
    assert_eq!(dec.push(232).unwrap(), "");
    assert_eq!(dec.push(146).unwrap(), "");
    assert_eq!(dec.push(163).unwrap(), "叠");
    // An incomplete character at the end is flushed lossily by finish().
    assert_eq!(dec.push(232).unwrap(), "");
    assert_eq!(dec.finish().unwrap(), "\u{FFFD}");
    assert_eq!(dec.finish().unwrap(), "");
    // A stray continuation byte spoils only itself, not the character emitted before it
    // (Hugging Face's full decode would turn all four bytes into U+FFFD).
    let mut dec = StreamDecoder::new(&tok, &[1]);
    let out: Vec<String> = [232, 146, 163, 146, 272]
        .iter()
        .map(|&id| dec.push(id).unwrap())
        .collect();
    assert_eq!(out, ["", "", "叠", "", "\u{FFFD} the"]);
}

#[test]
fn unknown_ids_decode_to_nothing_and_garbage_never_panics() {
    let tok = mistral();
    // Ids of a padded vocabulary past the tokenizer: no text, as transformers decodes them.
    let mut dec = StreamDecoder::new(&tok, &[1, 40000]);
    assert_eq!(dec.push(32000).unwrap(), "");
    assert_eq!(dec.push(22557).unwrap(), "Hello");
    assert_eq!(tok.decode(&[1, 99999, 22557], true).unwrap(), "Hello");

    // Arbitrary ids, byte tokens included, never panic.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut dec = StreamDecoder::new(&tok, &[]);
    for i in 0..3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half the ids are byte-fallback tokens, to hit incomplete and invalid characters.
        let id = if i % 2 == 0 { 3 + (x % 256) } else { x % 32000 } as u32;
        dec.push(id).unwrap();
    }
    dec.finish().unwrap();
}

#[test]
fn reference_tokenizers_match_their_encode_refs() {
    for model in ["tiny", "odd"] {
        let tok = Tokenizer::from_file(&shared(&format!("refs/{model}/tokenizer.json"))).unwrap();
        let refs = read_json(&format!("refs/{model}/tokenizer_refs.json"));
        assert_eq!(tok.vocab_size() as u64, refs["actual_vocab_size"].as_u64().unwrap());
        assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
        let cases = refs["encode_refs"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["ids"]);
            assert_eq!(tok.encode(text, true).unwrap(), want, "{model}: {text:?}");
            let pieces: Vec<String> = want.iter().map(|&id| tok.id_to_piece(id).unwrap()).collect();
            assert_eq!(pieces, strings(&case["tokens"]), "{model}: {text:?}");
            let decoded = case["decoded"].as_str().unwrap();
            assert_eq!(tok.decode(&want, true).unwrap(), decoded, "{model}");
            assert_eq!(stream(&tok, &want[..1], &want[1..], decoded), decoded);
        }
    }
}

#[test]
fn missing_or_garbled_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope/tokenizer.json");
    let err = format!("{:#}", Tokenizer::from_file(&missing).unwrap_err());
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let garbled = dir.path().join("tokenizer.json");
    std::fs::write(&garbled, "{\"model\": [1, 2").unwrap();
    let err = format!("{:#}", Tokenizer::from_file(&garbled).unwrap_err());
    assert!(err.contains(&garbled.display().to_string()), "{err}");
    assert!(err.contains("invalid tokenizer.json"), "{err}");

    assert!(Tokenizer::from_json_str("{}").is_err());
}

const ROUND_TRIP: &[&str] = &[
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "emoji: 🌬️🔥 👩‍👩‍👧 🇫🇷",
    "滑动窗口注意力利用转换器的堆叠层 日本語 한국어",
    "control \u{0}\u{1}\u{7}\u{1b}[0m\u{7f}\u{85}\u{2028} chars",
    "accents: café naïve Ångström, \u{FEFF}bom, a\u{301}",
    "def f(x):\n    return x ** 2\n",
    "[INST] <<SYS>> literal <s> and </s> [/INST]",
];

#[test]
fn builtin_layout() {
    let tok = Tokenizer::builtin();
    assert_eq!(tok.vocab_size(), BUILTIN_VOCAB_SIZE);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    for (id, piece) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        assert_eq!(tok.id_to_piece(id as u32).as_deref(), Some(*piece));
    }
    // Byte b is id 3 + b.
    assert_eq!(tok.id_to_piece(3 + u32::from(b'a')).as_deref(), Some("a"));
    assert_eq!(tok.id_to_piece(3 + u32::from(b' ')).as_deref(), Some("Ġ"));
    assert_eq!(tok.id_to_piece(258).as_deref(), Some("ÿ"));
    assert_eq!(tok.encode("\u{0}", false).unwrap(), vec![3]);
    assert_eq!(tok.id_to_piece(BUILTIN_VOCAB_SIZE as u32), None);
    // Built deterministically: pin a few learnt merges so the demo vocabulary cannot drift.
    let pieces: Vec<String> = (259..264).map(|id| tok.id_to_piece(id).unwrap()).collect();
    assert_eq!(pieces, BUILTIN_FIRST_MERGES);
    assert_eq!(tok.encode(" the", false).unwrap().len(), 1);
}

/// The first five merged tokens of the built-in tokenizer (ids 259..264).
const BUILTIN_FIRST_MERGES: [&str; 5] = ["Ġt", "he", "Ġa", "Ġw", "Ġo"];

#[test]
fn builtin_round_trips_any_text() {
    let tok = Tokenizer::builtin();
    for text in ROUND_TRIP {
        let plain = tok.encode(text, false).unwrap();
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!(with_bos[0], 1);
        // Literal "<s>" in the text is a special token, so only look at the added one.
        assert_eq!(&with_bos[1..], &plain[..], "{text:?}");
        assert!(plain.iter().all(|&id| (id as usize) < BUILTIN_VOCAB_SIZE));
        assert_eq!(tok.decode(&plain, false).unwrap(), *text);
        assert_eq!(tok.decode(&with_bos, false).unwrap(), format!("<s>{text}"));
        if !text.contains("<s>") {
            assert_eq!(tok.decode(&with_bos, true).unwrap(), *text);
            assert_eq!(stream(&tok, &[1], &plain, text), *text);
        }
    }
}

#[test]
fn builtin_compresses_english() {
    let tok = Tokenizer::builtin();
    let text = "The people of the world should know that there is more to life than work. \
                When you find the time, read a good book about the history of your country, \
                or go out and see the mountains and the sea with your family and friends.";
    let n = tok.encode(text, false).unwrap().len();
    assert!(n * 2 < text.len(), "{n} tokens for {} bytes of English", text.len());
}

#[test]
fn builtin_streaming_of_random_ids_equals_full_decode() {
    // Byte-level decoding is lossy UTF-8 over all bytes, so even invalid sequences stream
    // exactly like the full decode.
    let tok = Tokenizer::builtin();
    let mut x: u64 = 12345;
    for _ in 0..50 {
        let gen: Vec<u32> = (0..40)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) % BUILTIN_VOCAB_SIZE as u64) as u32
            })
            .collect();
        let full = tok.decode(&gen, true).unwrap();
        assert_eq!(stream(&tok, &[], &gen, &full), full);
    }
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Tokenizer>();
    fn send<T: Send>() {}
    send::<StreamDecoder>();
}

#[test]
fn model_dir_configs_decide_bos_eos_and_whether_bos_is_added() {
    let dir = tempfile::tempdir().unwrap();
    let src = shared("tokenizers/mistral-7b-v0.1/tokenizer.json");
    std::fs::copy(&src, dir.path().join("tokenizer.json")).unwrap();
    // Without configs: <s> and </s>, BOS added.
    let t = Tokenizer::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!((t.bos_id(), t.eos_ids()), (Some(1), &[2][..]));
    assert_eq!(t.encode("Hello", true).unwrap()[0], 1);
    // tokenizer_config.json names the tokens (as text or as an object) and turns BOS off;
    // generation_config.json adds a list of EOS ids.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "</s>"}, "eos_token": "<unk>", "add_bos_token": false}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [0, 7]}"#).unwrap();
    let t = Tokenizer::from_model_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.bos_id(), Some(2));
    assert_eq!(t.eos_ids(), &[0, 7][..]);
    let ids = t.encode("Hello", true).unwrap();
    assert_ne!(ids[0], 2, "add_bos_token false still added BOS: {ids:?}");
    // A token the configs name that the tokenizer lacks is an error naming it.
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": "<|nope|>"}"#).unwrap();
    let err = format!("{:#}", Tokenizer::from_model_dir(dir.path()).unwrap_err());
    assert!(err.contains("<|nope|>"), "{err}");
    // No tokenizer.json: none.
    assert!(Tokenizer::from_model_dir(tempfile::tempdir().unwrap().path())
        .unwrap()
        .is_none());
}

#[test]
fn a_tokenizer_larger_than_the_model_is_refused_a_smaller_one_fits() {
    let t = mistral();
    t.check_fits(32000).unwrap();
    t.check_fits(32768).unwrap();
    let err = t.check_fits(31999).unwrap_err().to_string();
    assert!(err.contains("32000") && err.contains("31999"), "{err}");
}
