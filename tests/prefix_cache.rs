//! Prefix caching changes nothing but the work done: with the cache on, logits and
//! greedy tokens equal those with it off (and transformers' references), for the
//! refs models at every tensor-parallel degree, prefill chunks of 1, 3 and W, block
//! sizes that divide the window and ones that do not, prompts shorter and longer
//! than W sharing prefixes of several lengths (some longer than W), one at a time
//! and batched with identical prompts admitted together.

mod support;

use sirocco_engine::{
    generate_batch, EngineOptions, GenerateRequest, Generation, SchedulerConfig, StepExecutor, TpGroup,
};
use sirocco_model::{allowed_degrees, MistralConfig, ModelSource};
use support::*;

const NEW_TOKENS: usize = 8;

fn group(model: &str, tp: usize, block: usize) -> TpGroup {
    let opts = EngineOptions {
        tp,
        kv_block_size: block,
        ..EngineOptions::default()
    };
    TpGroup::load(&ModelSource::Dir(ref_model(model)), &opts).unwrap()
}

fn request(prompt: &[u32], prefix_cache: bool) -> GenerateRequest {
    GenerateRequest {
        prefix_cache,
        ..GenerateRequest::greedy(prompt.to_vec(), NEW_TOKENS)
    }
}

fn run(g: &mut TpGroup, reqs: &[GenerateRequest], config: &SchedulerConfig, first_seq: u64) -> Vec<Generation> {
    generate_batch(g, reqs, config, first_seq, &mut |_, _| {}).unwrap()
}

fn same(got: &Generation, want: &Generation, what: &str) {
    let err = rel_err(&got.prompt_last_logits, &want.prompt_last_logits);
    assert!(err < 1e-5, "{what}: logits rel err {err} with the cache on");
    assert_eq!(got.generated_ids, want.generated_ids, "{what}: tokens");
}

fn check_model(model: &str, blocks: &[usize]) {
    let cfg = MistralConfig::from_file(&ref_model(model).join("config.json")).unwrap();
    let w = cfg.sliding_window.unwrap();
    let refs = ref_prompts(model);
    let long = refs
        .iter()
        .find(|p| p.name == "long_40")
        .expect("a prompt longer than the window");
    assert!(long.input_ids.len() > 2 * w + 2);
    // Prompts sharing the long prompt's first `p` tokens, then going their own way;
    // and the long prompt cut short (a hit that ends mid-block).
    let other = &refs.iter().find(|p| p.name == "text_fox").unwrap().input_ids;
    let mut family: Vec<(String, Vec<u32>)> = [3, w - 1, w + 2, 2 * w + 1, long.input_ids.len() - 1]
        .iter()
        .map(|&p| {
            let mut prompt = long.input_ids[..p].to_vec();
            prompt.extend_from_slice(&other[..w + 3]);
            (format!("shares {p}"), prompt)
        })
        .collect();
    family.push(("cut short".into(), long.input_ids[..2 * w + 3].to_vec()));
    family.push(("the same".into(), long.input_ids.clone()));
    for tp in allowed_degrees(&cfg) {
        for &block in blocks {
            let mut g = group(model, tp, block);
            for chunk in [1, 3, w] {
                let config = SchedulerConfig {
                    prefill_chunk: chunk,
                    prefill_budget: usize::MAX,
                    ..Default::default()
                };
                let what = |name: &str| format!("{model} tp{tp} block{block} chunk{chunk} {name}");
                let cached = |g: &mut TpGroup| {
                    g.kv_stats()
                        .unwrap()
                        .iter()
                        .map(|s| s.cached_blocks)
                        .collect::<Vec<_>>()
                };
                let before = cached(&mut g);
                let off: Vec<Generation> = family
                    .iter()
                    .map(|(_, p)| run(&mut g, &[request(p, false)], &config, 1).remove(0))
                    .collect();
                assert_eq!(cached(&mut g), before, "opted-out requests cache nothing");

                // The long prompt first, alone: it fills the cache, and still matches
                // transformers.
                let first = run(&mut g, &[request(&long.input_ids, true)], &config, 1).remove(0);
                assert!(
                    rel_err(&first.prompt_last_logits, &long.last_logits) < 1e-4,
                    "{}",
                    what("long")
                );
                assert_eq!(first.generated_ids, long.greedy[..NEW_TOKENS], "{}", what("long"));

                // Then each relative alone, starting from its cached prefix.
                let mut hits = Vec::new();
                for ((name, p), want) in family.iter().zip(&off) {
                    let got = run(&mut g, &[request(p, true)], &config, 10).remove(0);
                    same(&got, want, &what(name));
                    hits.push(got.cached_prompt_tokens);
                }
                assert!(hits.iter().any(|&h| h > 0), "{}: no prompt hit the cache", what(""));
                if w.is_multiple_of(block) {
                    // A prefix longer than the window is reused.
                    assert!(hits[3] > w, "{}: {hits:?}", what("shares 2W+1"));
                } else {
                    // Only blocks within the first window can be shared.
                    assert!(hits.iter().all(|&h| h <= w), "{}: {hits:?}", what(""));
                }

                // All together, each twice: identical new prompts in one admission.
                let mut reqs = Vec::new();
                for (_, p) in &family {
                    reqs.push(request(p, true));
                    reqs.push(request(p, true));
                }
                let together = run(&mut g, &reqs, &config, 100);
                for (i, got) in together.iter().enumerate() {
                    same(got, &off[i / 2], &what(&format!("batched {}", family[i / 2].0)));
                }
                for s in g.kv_stats().unwrap() {
                    assert_eq!((s.sequences, s.allocated_tokens), (0, 0), "{}", what("after"));
                    assert!(s.cached_blocks > 0);
                }
            }
        }
    }
}

#[test]
fn tiny_gives_the_same_results_with_the_cache_on() {
    // Window 16: blocks of 4 divide it, blocks of 3 do not.
    check_model("tiny", &[4, 3]);
}

#[test]
fn odd_gives_the_same_results_with_the_cache_on() {
    // Window 7: one block of 7 fills it, blocks of 2 do not divide it.
    check_model("odd", &[7, 2]);
}

/// A Llama-shaped model (no sliding window): every prefix block counts, and a
/// shared prefix of any length is reused in full.
#[test]
fn without_a_window_every_cached_block_counts() {
    let mut cfg = sirocco_model::builtin_config();
    cfg.sliding_window = None;
    cfg.num_hidden_layers = 2;
    let dir = tempfile::tempdir().unwrap();
    let model = support::cluster::generated_model(dir.path(), &cfg, None);
    let opts = EngineOptions {
        tp: 2,
        kv_block_size: 8,
        ..EngineOptions::default()
    };
    let mut g = TpGroup::load(&ModelSource::Dir(model), &opts).unwrap();
    let base: Vec<u32> = (0..300).map(|i| 3 + (i * 37 % 400)).collect();
    let prompts: Vec<Vec<u32>> = [10, 100, 299]
        .iter()
        .map(|&p| {
            let mut prompt = base[..p].to_vec();
            prompt.extend([7, 8, 9]);
            prompt
        })
        .collect();
    let config = SchedulerConfig {
        prefill_chunk: 64,
        ..Default::default()
    };
    let off: Vec<Generation> = prompts
        .iter()
        .map(|p| run(&mut g, &[request(p, false)], &config, 1).remove(0))
        .collect();
    run(&mut g, &[request(&base, true)], &config, 1);
    for ((p, want), shared) in prompts.iter().zip(&off).zip([10, 100, 299]) {
        let got = run(&mut g, &[request(p, true)], &config, 5).remove(0);
        same(&got, want, &format!("shares {shared}"));
        assert_eq!(got.cached_prompt_tokens, shared / 8 * 8, "shares {shared}");
    }
}
