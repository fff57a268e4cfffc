//! Checkpoints as they come: a vocabulary padded past the tokenizer, BOS and EOS as
//! the checkpoint's configs say, and a tokenizer that does not belong to the model.

mod support;

use candle_core::{Device, Tensor};
use sirocco_model::MistralConfig;
use sirocco_proto::v1 as pb;
use std::path::Path;
use support::cluster::{Cluster, ClusterSpec};
use support::requests::*;
use support::*;

/// The padded id the model below always generates.
const PADDED: u32 = 32100;

fn config(vocab: usize) -> MistralConfig {
    MistralConfig {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        sliding_window: None,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        torch_dtype: None,
    }
}

/// A model of vocabulary `vocab` with Mistral's tokenizer (32000 tokens) beside it.
/// Its layers add nothing and every token embeds alike, so the last hidden state is
/// the same whatever the input, and lm_head's row `PADDED` (an id the tokenizer does
/// not have) is the one aligned with it: greedy decoding generates `PADDED` forever.
fn padded_model(dir: &Path, vocab: usize) {
    let cfg = config(vocab);
    let tensors: Vec<(String, Tensor)> = sirocco_model::generated_tensors(&cfg, 5)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let dims = t.dims().to_vec();
            let t = if name == "model.embed_tokens.weight" || name.ends_with("norm.weight") {
                Tensor::ones(dims, t.dtype(), &Device::Cpu).unwrap()
            } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                Tensor::zeros(dims, t.dtype(), &Device::Cpu).unwrap()
            } else if name == "lm_head.weight" {
                let mut rows = t.to_vec2::<f32>().unwrap();
                rows[PADDED as usize].iter_mut().for_each(|x| *x = 10.0);
                Tensor::new(rows, &Device::Cpu).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    sirocco_model::weights::write_checkpoint(dir, &tensors, 1).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg.to_hf_json()).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        shared_dir().join("tokenizers/mistral-7b-v0.1/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
}

fn generate_cli(model: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(sirocco_bin())
        .args(["generate", "--model", model.to_str().unwrap(), "--json"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn ids_of_a_padded_vocabulary_are_served_with_empty_text() {
    let dir = tempfile::tempdir().unwrap();
    padded_model(dir.path(), 32768);
    // Offline: the padded id comes out, with no text, and no error.
    let out = generate_cli(dir.path(), &["--prompt", "Hello", "--max-new-tokens", "4", "--greedy"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"], serde_json::json!(vec![PADDED; 4]));
    assert_eq!(v["text"], "");

    // Served: prompt ids up to the model's vocabulary are accepted, tokens past the
    // tokenizer stream with empty text.
    let cluster = Cluster::start(ClusterSpec {
        model: Some(dir.path()),
        tp: 1,
        ..Default::default()
    });
    rt().block_on(async {
        let c = cluster.client().await;
        let (ids, fin) = stream_all(c, ids_request(&[1, 32500, 22557], 3)).await.unwrap();
        assert_eq!(ids, vec![PADDED; 3]);
        assert_eq!(fin.generated_tokens, 3);
        let mut c = cluster.client().await;
        let text = pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Text("Hello".into())),
            parameters: Some(pb::SamplingParameters {
                max_new_tokens: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = c.generate(text).await.unwrap().into_inner();
        assert_eq!(r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), vec![PADDED; 3]);
        assert_eq!(r.text, "");
        let e = stream_all(cluster.client().await, ids_request(&[1, 32768], 3))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    });
}

#[test]
fn generation_config_eos_list_stops_generation() {
    let dir = tempfile::tempdir().unwrap();
    padded_model(dir.path(), 32768);
    std::fs::write(
        dir.path().join("generation_config.json"),
        format!(r#"{{"bos_token_id": 1, "eos_token_id": [2, {PADDED}]}}"#),
    )
    .unwrap();
    let out = generate_cli(dir.path(), &["--prompt", "Hello", "--max-new-tokens", "4", "--greedy"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"], serde_json::json!([PADDED]));
    assert_eq!(v["finish_reason"], "eos");
}

#[test]
fn a_tokenizer_larger_than_the_model_is_refused() {
    // Mistral's tokenizer (32000 tokens) beside a model of 31000 rows.
    let small = tempfile::tempdir().unwrap();
    let cfg = config(31000);
    let tensors = sirocco_model::generated_tensors(&cfg, 5).unwrap();
    sirocco_model::weights::write_checkpoint(small.path(), &tensors, 1).unwrap();
    std::fs::write(
        small.path().join("config.json"),
        serde_json::to_string(&cfg.to_hf_json()).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        shared_dir().join("tokenizers/mistral-7b-v0.1/tokenizer.json"),
        small.path().join("tokenizer.json"),
    )
    .unwrap();
    let out = generate_cli(small.path(), &["--prompt", "Hello", "--max-new-tokens", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("32000") && err.contains("31000"), "{err}");
}
