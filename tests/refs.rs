//! The engine against Hugging Face transformers' reference outputs, at every
//! tensor-parallel degree the heads allow, with several prefill chunk sizes, each
//! prompt alone and all prompts batched together.

mod support;

use sirocco_engine::{generate_batch, EngineOptions, GenerateRequest, SchedulerConfig, SeqStep, StepExecutor, TpGroup};
use sirocco_model::{allowed_degrees, MistralConfig, ModelSource};
use support::*;

const NEW_TOKENS: usize = 24;

fn group(model: &str, tp: usize) -> TpGroup {
    let opts = EngineOptions {
        tp,
        ..EngineOptions::default()
    };
    TpGroup::load(&ModelSource::Dir(ref_model(model)), &opts).unwrap()
}

fn check_model(model: &str, degrees: &[usize]) {
    let cfg = MistralConfig::from_file(&ref_model(model).join("config.json")).unwrap();
    assert_eq!(allowed_degrees(&cfg), degrees);
    let w = cfg.sliding_window.unwrap();
    let prompts = ref_prompts(model);
    for &tp in degrees {
        let mut g = group(model, tp);
        for chunk in [1, 3, w] {
            // Every sequence reads a chunk every step, however many there are.
            let config = SchedulerConfig {
                prefill_chunk: chunk,
                prefill_budget: usize::MAX,
                ..Default::default()
            };
            let reqs: Vec<_> = prompts
                .iter()
                .map(|p| GenerateRequest::greedy(p.input_ids.clone(), NEW_TOKENS))
                .collect();
            let alone: Vec<_> = reqs
                .iter()
                .map(|r| {
                    generate_batch(&mut g, std::slice::from_ref(r), &config, 0, &mut |_, _| {})
                        .unwrap()
                        .remove(0)
                })
                .collect();
            let batched = generate_batch(&mut g, &reqs, &config, 100, &mut |_, _| {}).unwrap();
            for (mode, outs) in [("alone", &alone), ("batched", &batched)] {
                for (p, out) in prompts.iter().zip(outs.iter()) {
                    let err = rel_err(&out.prompt_last_logits, &p.last_logits);
                    assert!(
                        err < 1e-4,
                        "{model} tp{tp} chunk{chunk} {mode} {}: logits rel err {err}",
                        p.name
                    );
                    assert_eq!(
                        out.generated_ids, p.greedy,
                        "{model} tp{tp} chunk{chunk} {mode} {}",
                        p.name
                    );
                }
            }
            // Nothing is left in the cache once generation ends.
            for s in g.kv_stats().unwrap() {
                assert_eq!((s.sequences, s.used_tokens, s.allocated_tokens), (0, 0, 0));
            }
        }
    }
}

#[test]
fn tiny_matches_transformers_at_every_degree() {
    check_model("tiny", &[1, 2, 4, 8]);
}

#[test]
fn odd_matches_transformers_at_every_degree() {
    check_model("odd", &[1, 2, 4, 12]);
}

fn last_logits(g: &mut TpGroup, seq: u64, tokens: Vec<u32>) -> Vec<f32> {
    g.step(&[SeqStep::logits(seq, tokens)])
        .unwrap()
        .remove(0)
        .logits
        .unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0 as u32
}

/// Decodes 10·W tokens and checks that every rank's cache holds exactly W positions,
/// and that decoding over the wrapped rolling buffer agrees with a fresh prefill of
/// the whole sequence.
fn long_generation(model: &str, tp: usize) {
    let cfg = MistralConfig::from_file(&ref_model(model).join("config.json")).unwrap();
    let w = cfg.sliding_window.unwrap();
    let mut g = group(model, tp);
    let mut seq_tokens = vec![1u32, 5, 9];
    let mut logits = last_logits(&mut g, 1, seq_tokens.clone());
    while seq_tokens.len() < 10 * w {
        let next = argmax(&logits);
        seq_tokens.push(next);
        logits = last_logits(&mut g, 1, vec![next]);
        let held = seq_tokens.len().min(w);
        for (rank, s) in g.kv_stats().unwrap().into_iter().enumerate() {
            assert_eq!(s.used_tokens, held, "rank {rank} after {} tokens", seq_tokens.len());
            assert!(
                s.allocated_tokens <= w,
                "rank {rank} allocated {} slots",
                s.allocated_tokens
            );
        }
    }
    let stats = g.kv_stats().unwrap();
    assert_eq!(stats.len(), tp);
    let kv_heads_per_rank = (cfg.num_key_value_heads / tp).max(1);
    for s in &stats {
        assert_eq!(s.used_tokens, w);
        assert_eq!(s.allocated_tokens, w);
        assert_eq!(s.wrapped_sequences, 1);
        assert_eq!(
            s.allocated_bytes,
            w * 2 * cfg.num_hidden_layers * kv_heads_per_rank * cfg.head_dim * 4
        );
    }
    // The same sequence prefilled in one pass (chunks of 2W) gives the same last logits.
    let fresh = seq_tokens
        .chunks(2 * w)
        .map(|c| last_logits(&mut g, 2, c.to_vec()))
        .last()
        .unwrap();
    let err = rel_err(&logits, &fresh);
    assert!(err < 1e-4, "{model} tp{tp}: decode vs prefill rel err {err}");
    g.release(&[1, 2]).unwrap();
    assert_eq!(g.kv_stats().unwrap()[0].allocated_tokens, 0);
}

#[test]
fn ten_windows_of_decode_hold_exactly_one_window() {
    long_generation("tiny", 4); // replicated KV heads
    long_generation("odd", 2);
}
