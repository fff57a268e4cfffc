//! Whatever a model picks among the allowed tokens, the output obeys the constraint:
//! random walks over the allowed sets (a stand-in for any weights) with the built-in
//! byte-level tokenizer and Mistral's SentencePiece one, checked by a JSON Schema
//! validator, a regex engine and the choice list; and bad constraints are refused
//! with a reason.

use crate::{allows, CompileError, Constraint, Grammars};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sirocco_tokenizer::Tokenizer;
use std::path::PathBuf;

fn mistral() -> Tokenizer {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tokenizers/mistral-7b-v0.1/tokenizer.json");
    Tokenizer::from_file(&p).unwrap()
}

fn tokenizers() -> Vec<(&'static str, Tokenizer)> {
    vec![("builtin", Tokenizer::builtin()), ("mistral", mistral())]
}

/// A random walk through the grammar: each token drawn uniformly from the allowed
/// ids, the end of sequence taken only when the sentence is complete. Returns the
/// text, or None if `budget` tokens did not finish it.
fn walk(g: &Grammars, tok: &Tokenizer, c: &Constraint, seed: u64, budget: usize) -> Option<String> {
    let compiled = g.compile(c).unwrap();
    let mut f = compiled.follow();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let eos = tok.eos_id().unwrap();
    let mut ids = Vec::new();
    for _ in 0..budget {
        if f.is_finished() {
            break;
        }
        let allowed = f.allowed().unwrap();
        let ids_allowed: Vec<u32> = (0..allowed.len() as u32 * 32)
            .filter(|&t| allows(&allowed, t))
            .collect();
        // Half the time prefer to end when that is allowed, so that walks finish
        // within the budget; otherwise any allowed token, the end included.
        let t = if ids_allowed.contains(&eos) && rng.random_bool(0.5) {
            eos
        } else {
            ids_allowed[rng.random_range(0..ids_allowed.len())]
        };
        f.commit(t).unwrap();
        if t == eos {
            break;
        }
        ids.push(t);
    }
    f.is_finished().then(|| tok.decode(&ids, true).unwrap())
}

/// The schemas the tests hold every output to: the repository's
/// tests/data/structured/schemas.json, which the end-to-end tests use too.
pub(crate) fn schemas() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/structured/schemas.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_walk_through_a_schema_validates() {
    for (name, tok) in tokenizers() {
        let g = Grammars::new(&tok, tok.vocab_size()).unwrap();
        for schema in schemas() {
            let validator = jsonschema::validator_for(&schema).unwrap();
            let c = Constraint::JsonSchema(schema.clone());
            for seed in 0..50 {
                let text = walk(&g, &tok, &c, seed, 400)
                    .unwrap_or_else(|| panic!("{name}: seed {seed} did not finish {schema}"));
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{name}: seed {seed}: {text:?} is not JSON ({e}) for {schema}"));
                assert!(
                    validator.is_valid(&v),
                    "{name}: seed {seed}: {text} does not validate against {schema}"
                );
            }
        }
    }
}

#[test]
fn choices_and_regexes_hold_for_every_walk() {
    for (name, tok) in tokenizers() {
        let g = Grammars::new(&tok, tok.vocab_size()).unwrap();
        let choices = vec!["yes".to_string(), "no".into(), "maybe not".into(), "ünïcode ✓".into()];
        for seed in 0..50 {
            let text = walk(&g, &tok, &Constraint::Choice(choices.clone()), seed, 100).unwrap();
            assert!(choices.contains(&text), "{name}: {text:?}");
        }
        let rx = r"[a-c]{2,4}-[0-9]{1,3}(\.[0-9])?";
        for seed in 0..50 {
            let text = walk(&g, &tok, &Constraint::Regex(rx.into()), seed, 100).unwrap();
            let (head, tail) = text.split_once('-').unwrap_or_else(|| panic!("{name}: {text:?}"));
            assert!(
                (2..=4).contains(&head.len()) && head.chars().all(|c| ('a'..='c').contains(&c)),
                "{text:?}"
            );
            let (int, frac) = tail.split_once('.').unwrap_or((tail, "0"));
            assert!(
                (1..=3).contains(&int.len()) && int.chars().all(|c| c.is_ascii_digit()),
                "{text:?}"
            );
            assert!(frac.len() == 1 && frac.chars().all(|c| c.is_ascii_digit()), "{text:?}");
        }
        let lark = r#"start: "The answer is " ANSWER "."
ANSWER: /[0-9]{1,2}/"#;
        for seed in 0..20 {
            let text = walk(&g, &tok, &Constraint::Lark(lark.into()), seed, 100).unwrap();
            let n = text
                .strip_prefix("The answer is ")
                .and_then(|t| t.strip_suffix('.'))
                .unwrap();
            assert!(
                (1..=2).contains(&n.len()) && n.chars().all(|c| c.is_ascii_digit()),
                "{text:?}"
            );
        }
    }
}

#[test]
fn bad_constraints_are_refused_with_a_reason() {
    let tok = Tokenizer::builtin();
    let g = Grammars::new(&tok, tok.vocab_size()).unwrap();
    let refused = |c: Constraint| g.compile(&c).map(|_| ()).unwrap_err().0;
    assert!(refused(Constraint::JsonSchema(json!(3))).contains("object"));
    assert!(!refused(Constraint::JsonSchema(json!({"type": "no-such-type"}))).is_empty());
    assert!(!refused(Constraint::JsonSchema(
        json!({"type": "integer", "minimum": 5, "maximum": 1})
    ))
    .is_empty());
    assert!(refused(Constraint::Regex("a(b".into())).contains("regular expression: unclosed group"));
    assert!(!refused(Constraint::Lark("start: undefined_rule".into())).is_empty());
    assert!(refused(Constraint::Choice(vec![])).contains("empty"));
    let big = "x".repeat(crate::MAX_CONSTRAINT_BYTES + 1);
    assert!(refused(Constraint::Regex(big)).contains("bytes"));
    let e: CompileError = g
        .compile(&Constraint::Lark("start: x\nx: x".into()))
        .map(|_| ())
        .unwrap_err();
    assert!(!e.0.is_empty());
}

#[test]
fn a_padded_model_vocabulary_never_allows_ids_past_the_tokenizer() {
    let tok = Tokenizer::builtin();
    let g = Grammars::new(&tok, tok.vocab_size() + 64).unwrap();
    let mut f = g.compile(&Constraint::JsonSchema(json!({}))).unwrap().follow();
    let allowed = f.allowed().unwrap();
    for t in tok.vocab_size() as u32..tok.vocab_size() as u32 + 64 {
        assert!(!allows(&allowed, t));
    }
}
