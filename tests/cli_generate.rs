//! `sirocco generate` as other tooling runs it: `--json` output against the
//! references, checkpoints in other layouts (sharded, bf16, legacy config, no
//! sliding window, GGUF files), and clear errors for bad input.

mod support;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use support::*;

struct Run {
    ok: bool,
    json: Option<Value>,
    stderr: String,
}

fn generate(args: &[&str]) -> Run {
    let out = Command::new(sirocco_bin()).arg("generate").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    Run {
        ok: out.status.success(),
        json: serde_json::from_str(stdout.trim()).ok(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Runs every reference prompt of `model` through the CLI on checkpoint `dir` and
/// checks logits (within `tol`) and, when `tokens`, the greedy continuation.
fn check_refs(model: &str, dir: &Path, extra: &[&str], tol: f32, tokens: bool) {
    for p in ref_prompts(model) {
        let ids = ids_arg(&p.input_ids);
        let mut args = vec![
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &ids,
            "--max-new-tokens",
            "24",
            "--greedy",
            "--ignore-eos",
            "--json",
        ];
        args.extend_from_slice(extra);
        let r = generate(&args);
        assert!(r.ok, "{model} {} {extra:?} failed: {}", p.name, r.stderr);
        let j = r.json.expect("stdout is one JSON object");
        assert_eq!(u32s(&j["prompt_ids"]), p.input_ids);
        let err = rel_err(&floats(&j["prompt_last_logits"]), &p.last_logits);
        assert!(err < tol, "{model} {} {extra:?}: logits rel err {err}", p.name);
        if tokens {
            assert_eq!(u32s(&j["generated_ids"]), p.greedy, "{model} {} {extra:?}", p.name);
        }
        assert!(j["text"].is_string());
    }
}

#[test]
fn json_output_matches_references_with_tp_and_chunks() {
    check_refs(
        "tiny",
        &ref_model("tiny"),
        &["--tp", "8", "--prefill-chunk", "3"],
        1e-4,
        true,
    );
    check_refs(
        "odd",
        &ref_model("odd"),
        &["--tp", "12", "--prefill-chunk", "7"],
        1e-4,
        true,
    );
    check_refs(
        "odd",
        &ref_model("odd"),
        &["--tp", "2", "--prefill-chunk", "1"],
        1e-4,
        true,
    );
}

fn read_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn copy_side_files(from: &Path, to: &Path) {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
    ] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn sharded_checkpoint_with_legacy_config_matches() {
    let src = ref_model("odd");
    let tmp = tempfile::tempdir().unwrap();
    sirocco_model::weights::write_checkpoint(tmp.path(), &read_tensors(&src), 3).unwrap();
    copy_side_files(&src, tmp.path());
    // As transformers 4.x wrote it: no head_dim, no rope_parameters, torch_dtype.
    edit_config(tmp.path(), |c| {
        c.remove("head_dim");
        c.remove("rope_parameters");
        let d = c.remove("dtype").unwrap();
        c.insert("torch_dtype".into(), d);
    });
    assert!(tmp.path().join("model.safetensors.index.json").exists());
    assert!(!tmp.path().join("model.safetensors").exists());
    check_refs("odd", tmp.path(), &["--tp", "4", "--prefill-chunk", "3"], 1e-4, true);
}

#[test]
fn bf16_and_f16_checkpoints_load_and_stay_close() {
    let src = ref_model("tiny");
    for dtype in [DType::BF16, DType::F16] {
        let tmp = tempfile::tempdir().unwrap();
        let tensors: Vec<_> = read_tensors(&src)
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(dtype).unwrap()))
            .collect();
        sirocco_model::weights::write_checkpoint(tmp.path(), &tensors, 1).unwrap();
        copy_side_files(&src, tmp.path());
        // Rounded weights move the logits a little; computing in f32 keeps them close.
        check_refs("tiny", tmp.path(), &["--tp", "2"], 2e-2, false);
    }
    // Computing in bf16 runs end to end and stays near the reference.
    check_refs("tiny", &src, &["--dtype", "bf16", "--tp", "2"], 5e-2, false);
}

#[test]
fn no_sliding_window_is_plain_causal_attention() {
    let src = ref_model("tiny");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    edit_config(tmp.path(), |c| {
        c.insert("sliding_window".into(), Value::Null);
    });
    for p in ref_prompts("tiny") {
        let ids = ids_arg(&p.input_ids);
        let r = generate(&[
            "--model",
            tmp.path().to_str().unwrap(),
            "--prompt-ids",
            &ids,
            "--max-new-tokens",
            "0",
            "--json",
        ]);
        assert!(r.ok, "{}", r.stderr);
        let err = rel_err(&floats(&r.json.unwrap()["prompt_last_logits"]), &p.last_logits);
        // Up to the window the two are the same model; past it they must differ.
        if p.input_ids.len() <= 16 {
            assert!(err < 1e-4, "{}: {err}", p.name);
        } else {
            assert!(
                err > 1e-3,
                "{}: a prompt longer than the window must see more keys ({err})",
                p.name
            );
        }
    }
}

#[test]
fn disallowed_degree_names_the_allowed_ones() {
    let r = generate(&[
        "--model",
        ref_model("odd").to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--tp",
        "3",
    ]);
    assert!(!r.ok);
    assert!(r.stderr.contains("allowed degrees: 1, 2, 4, 12"), "{}", r.stderr);
    let r = generate(&[
        "--model",
        ref_model("tiny").to_str().unwrap(),
        "--prompt-ids",
        "1",
        "--tp",
        "16",
    ]);
    assert!(!r.ok);
    assert!(r.stderr.contains("allowed degrees: 1, 2, 4, 8"), "{}", r.stderr);
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    let src = ref_model("tiny");
    let model_arg = |d: &Path| d.to_str().unwrap().to_string();

    let r = generate(&["--model", "/nonexistent/model", "--prompt-ids", "1"]);
    assert!(!r.ok && r.stderr.contains("does not exist"), "{}", r.stderr);

    // A missing tensor is named.
    let tmp = tempfile::tempdir().unwrap();
    let tensors: Vec<_> = read_tensors(&src)
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .collect();
    sirocco_model::weights::write_checkpoint(tmp.path(), &tensors, 1).unwrap();
    copy_side_files(&src, tmp.path());
    let r = generate(&["--model", &model_arg(tmp.path()), "--prompt-ids", "1"]);
    assert!(
        !r.ok && r.stderr.contains("model.layers.1.mlp.up_proj.weight"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);

    // A tensor of the wrong shape is named with both shapes.
    let tmp = tempfile::tempdir().unwrap();
    let tensors: HashMap<_, _> = read_tensors(&src).into_iter().collect();
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    for (n, t) in tensors.iter_mut() {
        if n == "model.norm.weight" {
            *t = Tensor::ones(65, DType::F32, &Device::Cpu).unwrap();
        }
    }
    sirocco_model::weights::write_checkpoint(tmp.path(), &tensors, 1).unwrap();
    copy_side_files(&src, tmp.path());
    let r = generate(&["--model", &model_arg(tmp.path()), "--prompt-ids", "1"]);
    assert!(
        !r.ok && r.stderr.contains("model.norm.weight") && r.stderr.contains("[65]"),
        "{}",
        r.stderr
    );

    // An unsupported architecture is refused by name.
    edit_config(tmp.path(), |c| {
        c.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
    });
    let r = generate(&["--model", &model_arg(tmp.path()), "--prompt-ids", "1"]);
    assert!(!r.ok && r.stderr.contains("GPT2LMHeadModel"), "{}", r.stderr);

    // Token ids outside the vocabulary, and an empty prompt.
    let r = generate(&["--model", &model_arg(&src), "--prompt-ids", "1,512"]);
    assert!(
        !r.ok && r.stderr.contains("512") && r.stderr.contains("vocabulary"),
        "{}",
        r.stderr
    );
    let r = generate(&["--model", &model_arg(&src), "--prompt", ""]);
    assert!(!r.ok && r.stderr.contains("empty"), "{}", r.stderr);
}

#[test]
fn builtin_model_runs_with_text_and_is_the_same_at_every_degree() {
    assert_eq!(
        sirocco_tokenizer::Tokenizer::builtin().vocab_size(),
        sirocco_model::BUILTIN_VOCAB_SIZE,
        "the built-in tokenizer and model must agree on the vocabulary"
    );
    let mut outs = Vec::new();
    for tp in ["1", "2", "4"] {
        let r = generate(&[
            "--prompt",
            "Hello, sirocco! 🌬️ 风",
            "--tp",
            tp,
            "--max-new-tokens",
            "12",
            "--greedy",
            "--ignore-eos",
            "--json",
        ]);
        assert!(r.ok, "{}", r.stderr);
        let j = r.json.unwrap();
        assert_eq!(u32s(&j["prompt_ids"])[0], 1, "text prompts start with BOS");
        assert_eq!(u32s(&j["generated_ids"]).len(), 12);
        assert_eq!(
            floats(&j["prompt_last_logits"]).len(),
            sirocco_model::BUILTIN_VOCAB_SIZE
        );
        outs.push(u32s(&j["generated_ids"]));
    }
    assert!(outs.windows(2).all(|w| w[0] == w[1]), "{outs:?}");

    // Seeded sampling is reproducible; different seeds usually differ.
    let sample = |seed: &str| {
        let r = generate(&[
            "--prompt",
            "abc",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--json",
        ]);
        assert!(r.ok, "{}", r.stderr);
        u32s(&r.json.unwrap()["generated_ids"])
    };
    assert_eq!(sample("7"), sample("7"));
    assert_ne!(sample("7"), sample("8"));
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let out = Command::new(sirocco_bin())
        .args([
            "--log-format",
            "json",
            "generate",
            "--model",
            ref_model("tiny").to_str().unwrap(),
        ])
        .args(["--prompt-ids", "1", "--max-new-tokens", "2", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
}

/// A byte-level BPE `tokenizer.json` as llama.cpp's converter writes it into GGUF
/// metadata (`gpt2` model, special added tokens as control tokens).
fn gguf_tokenizer_metadata(tokenizer_json: &Path) -> Vec<(String, sirocco_model::gguf::Value)> {
    use sirocco_model::gguf::Value as G;
    let j: Value = serde_json::from_str(&std::fs::read_to_string(tokenizer_json).unwrap()).unwrap();
    let mut tokens: Vec<(u64, String, i32)> = j["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (id.as_u64().unwrap(), t.clone(), 1))
        .collect();
    for a in j["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap();
        tokens.retain(|t| t.0 != id);
        tokens.push((id, a["content"].as_str().unwrap().into(), 3));
    }
    tokens.sort();
    assert!(tokens.iter().enumerate().all(|(i, t)| t.0 == i as u64), "ids are dense");
    let merges = j["model"]["merges"].as_array().unwrap().iter().map(|m| match m {
        Value::Array(pair) => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        other => other.as_str().unwrap().to_string(),
    });
    vec![
        ("tokenizer.ggml.model".into(), G::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), G::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            G::Array(tokens.iter().map(|t| G::String(t.1.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            G::Array(tokens.iter().map(|t| G::I32(t.2)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            G::Array(merges.map(G::String).collect()),
        ),
        ("tokenizer.ggml.add_bos_token".into(), G::Bool(true)),
    ]
}

#[test]
fn gguf_files_match_references() {
    use sirocco_model::gguf::{write_gguf, GgmlDType};
    let src = ref_model("odd");
    let cfg = sirocco_model::MistralConfig::from_file(&src.join("config.json")).unwrap();
    let tokenizer = gguf_tokenizer_metadata(&src.join("tokenizer.json"));
    let tmp = tempfile::tempdir().unwrap();
    // f32 (q/k permuted as llama.cpp stores them): transformers' logits and tokens.
    let f32_path = tmp.path().join("odd.gguf");
    write_gguf(&f32_path, &cfg, &read_tensors(&src), |_| GgmlDType::F32, &tokenizer).unwrap();
    check_refs("odd", &f32_path, &["--tp", "4", "--prefill-chunk", "3"], 1e-4, true);
    // Q8_0 matrices: close to them (8-bit blocks round about as bf16 does).
    let q8_path = tmp.path().join("odd-q8.gguf");
    let q8 = |n: &str| {
        if n.ends_with("norm.weight") {
            GgmlDType::F32
        } else {
            GgmlDType::Q8_0
        }
    };
    write_gguf(&q8_path, &cfg, &read_tensors(&src), q8, &tokenizer).unwrap();
    check_refs("odd", &q8_path, &["--tp", "2"], 5e-2, false);
    // A text prompt is tokenized by the file's vocabulary as by the directory's.
    let text = |model: &Path| {
        let r = generate(&[
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The wind, 123 times!",
            "--max-new-tokens",
            "4",
            "--greedy",
            "--json",
        ]);
        assert!(r.ok, "{}", r.stderr);
        r.json.unwrap()
    };
    let (dir, gguf) = (text(&src), text(&f32_path));
    assert_eq!(dir["prompt_ids"], gguf["prompt_ids"]);
    assert_eq!(dir["generated_ids"], gguf["generated_ids"]);
    assert_eq!(dir["text"], gguf["text"]);
    // Without tokenizer metadata the file still serves ids, and text is refused clearly.
    let bare = tmp.path().join("bare.gguf");
    write_gguf(&bare, &cfg, &read_tensors(&src), |_| GgmlDType::F32, &[]).unwrap();
    check_refs("odd", &bare, &[], 1e-4, true);
    let r = generate(&["--model", bare.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!r.ok && r.stderr.contains("has no tokenizer"), "{}", r.stderr);
}
