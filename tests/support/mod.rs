//! Shared helpers for the end-to-end tests: where the shared reference material is,
//! and how to read the reference outputs.
#![allow(dead_code)]

pub mod cluster;
pub mod etcd;
pub mod http;
#[path = "../../crates/cli/src/ports.rs"]
pub mod ports;
pub mod procs;
pub mod requests;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use sirocco_testkit::{python, ref_model, repo_root, shared_dir};

use serde_json::Value;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct RefPrompt {
    pub name: String,
    pub input_ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy: Vec<u32>,
}

pub fn ref_prompts(model: &str) -> Vec<RefPrompt> {
    let path = ref_model(model).join("refs.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| RefPrompt {
            name: p["name"].as_str().unwrap().to_string(),
            input_ids: ids(&p["input_ids"]),
            last_logits: p["last_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
            greedy: ids(&p["greedy_use_cache_true"]),
        })
        .collect()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// max |a - b| / max |b|: the relative error in the max norm.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "logit vectors differ in length");
    let num = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let den = want.iter().map(|b| b.abs()).fold(0f32, f32::max);
    num / den
}

/// Runs `f` to completion on a runtime of its own.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    rt().block_on(f)
}

/// A small runtime for the tests' own gRPC calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn sirocco_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sirocco"))
}

/// A model the project fetches by name (`sirocco model fetch`: pip, pinned, cached):
/// its path.
pub fn fetched_model(name: &str) -> PathBuf {
    let out = std::process::Command::new(sirocco_bin())
        .args(["model", "fetch", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cannot fetch the model: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // stdout is the path alone (pip's progress goes to stderr).
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(path.is_file(), "`model fetch` printed {path:?}, not a file");
    path
}
