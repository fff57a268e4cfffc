//! The prefix cache end to end, with router and shard processes on 127.0.0.1:
//! cached prompt tokens reported in both APIs and counted in the metrics, tokens
//! unchanged (against `sirocco generate` alone), the per-request opt-out, routing
//! that prefers the replica holding a prefix within the imbalance threshold, and
//! failover of a replica holding cached blocks.

mod support;

use serde_json::{json, Value};
use sirocco_proto::v1 as pb;
use support::cluster::{Cluster, ClusterSpec};
use support::http::{get, post_json, samples, sum};
use support::requests::*;
use support::*;

const NEW: usize = 10;

/// The tiny refs model (window 16) in blocks of 4: prefixes longer than the window
/// hit. Prompts are read in chunks of 8, so that every block of a prompt is cached
/// (a chunk longer than the window skips the positions it would overwrite at once).
fn spec<'a>(model: &'a std::path::Path, replicas: usize, router_args: &[&str]) -> ClusterSpec<'a> {
    let mut args: Vec<String> = vec!["--prefill-chunk".into(), "8".into()];
    args.extend(router_args.iter().map(|s| s.to_string()));
    ClusterSpec {
        model: Some(model),
        replicas,
        shard_args: vec!["--kv-block-size".into(), "4".into()],
        router_args: args,
        ..Default::default()
    }
}

/// `n` prompts sharing their first `shared` tokens, then going their own ways.
fn family(seed: u32, shared: usize, n: usize) -> Vec<Vec<u32>> {
    let tok = |i: u32, salt: u32| 3 + (i.wrapping_mul(2654435761).wrapping_add(salt * 97 + seed * 7919) >> 7) % 500;
    let prefix: Vec<u32> = std::iter::once(1)
        .chain((1..shared as u32).map(|i| tok(i, 0)))
        .collect();
    (0..n as u32)
        .map(|k| {
            let mut p = prefix.clone();
            p.extend((0..6 + k).map(|i| tok(i, k + 1)));
            p
        })
        .collect()
}

fn one(cluster: &Cluster, req: pb::GenerateRequest) -> (Vec<u32>, pb::Finished) {
    block_on(async { stream_all(cluster.client().await, req).await })
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()))
}

fn opted_out(mut req: pb::GenerateRequest) -> pb::GenerateRequest {
    req.prefix_cache = Some(false);
    req
}

#[test]
fn cached_prefixes_change_no_token_and_are_reported() {
    let model = ref_model("tiny");
    let cluster = Cluster::start(spec(&model, 1, &[]));
    // A shared prefix longer than the window, and one shorter.
    for (seed, shared) in [(1, 37), (2, 9)] {
        let prompts = family(seed, shared, 4);
        let expected: Vec<Vec<u32>> = prompts.iter().map(|p| generate_alone(&model, p, NEW)).collect();
        // The first fills the cache; the others start from it.
        let (ids, fin) = one(&cluster, ids_request(&prompts[0], NEW as u32));
        assert_eq!(ids, expected[0]);
        assert_eq!(fin.cached_prompt_tokens, 0, "nothing was cached yet");
        for (p, want) in prompts.iter().zip(&expected).skip(1) {
            let (ids, fin) = one(&cluster, ids_request(p, NEW as u32));
            assert_eq!(&ids, want, "shared {shared}");
            let cached = fin.cached_prompt_tokens as usize;
            assert!(
                cached > 0 && cached <= shared && cached.is_multiple_of(4),
                "shared {shared}: cached {cached}\n{}",
                cluster.logs()
            );
            assert!(
                shared < 16 || cached > 16,
                "a prefix longer than the window is reused: {cached}"
            );
            // Opted out: computed in full, the same tokens.
            let (ids, fin) = one(&cluster, opted_out(ids_request(p, NEW as u32)));
            assert_eq!((&ids, fin.cached_prompt_tokens), (want, 0));
        }
    }
    // The OpenAI API reports cached tokens in usage, and takes the opt-out too.
    let prompt = family(1, 37, 5).pop().unwrap();
    let expected = generate_alone(&model, &prompt, NEW);
    let addr = cluster.http_addr.clone();
    block_on(async {
        for (opt, cached) in [(json!(null), true), (json!(false), false)] {
            let body = json!({"prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": true,
                              "return_token_ids": true, "prefix_cache": opt});
            let (status, text) = post_json(&addr, "/v1/completions", &[], &body).await;
            assert_eq!(status, 200, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["choices"][0]["token_ids"], json!(expected));
            let n = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
            assert_eq!(n > 0, cached, "{v}");
        }
        let (status, text) = post_json(
            &addr,
            "/v1/completions",
            &[],
            &json!({"prompt": [1], "prefix_cache": 3}),
        )
        .await;
        assert_eq!(status, 422, "{text}");
        // The hit and queried counters, the shards' cached blocks.
        let (_, text) = get(&addr, "/metrics").await;
        let m = samples(&text);
        let hit = sum(&m, "sirocco_prefix_cache_hit_tokens_total", &[]);
        let queried = sum(&m, "sirocco_prefix_cache_queried_tokens_total", &[]);
        assert!(hit > 0.0 && queried > hit, "hit {hit} of {queried}");
        let (_, text) = get(&cluster.shard_metrics[0][0], "/metrics").await;
        assert!(sum(&samples(&text), "sirocco_shard_prefix_cache_blocks", &[]) > 0.0);
    });
}

/// Starts a long request with `prompts[0]` and, once it is decoding on its replica,
/// sends `prompts[1]`; returns the second one's cached prompt tokens.
fn second_while_first_runs(cluster: &Cluster, prompts: &[Vec<u32>]) -> u32 {
    block_on(async {
        let mut client = cluster.client().await;
        let mut first = client
            .generate_stream(ids_request(&prompts[0], 400))
            .await
            .unwrap()
            .into_inner();
        for _ in 0..3 {
            first.message().await.unwrap().expect("the first request streams");
        }
        let (_, fin) = stream_all(cluster.client().await, ids_request(&prompts[1], NEW as u32))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
        fin.cached_prompt_tokens
    })
}

#[test]
fn routing_prefers_the_warm_replica_within_the_imbalance_threshold() {
    let model = ref_model("tiny");
    let prompts = family(3, 33, 2);
    // Warm: the second request joins the busy replica that holds its prefix.
    let warm = Cluster::start(spec(&model, 2, &[]));
    assert!(second_while_first_runs(&warm, &prompts) >= 32);
    drop(warm);
    // Imbalance 0: the busy replica is passed over for the idle, cold one.
    let strict = Cluster::start(spec(&model, 2, &["--route-imbalance", "0"]));
    assert_eq!(second_while_first_runs(&strict, &prompts), 0);
    drop(strict);
    // Without the prefix cache, nothing is cached and the least loaded takes it.
    let off = Cluster::start(spec(&model, 2, &["--prefix-cache", "off"]));
    assert_eq!(second_while_first_runs(&off, &prompts), 0);
}

#[test]
fn a_replica_holding_cached_blocks_fails_over_exactly() {
    let model = ref_model("tiny");
    const N: usize = 6;
    const LONG: usize = 60;
    let prompts = family(4, 41, N);
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| generate_alone(&model, p, LONG)).collect();
    let mut cluster = Cluster::start(spec(&model, 2, &["--failover-timeout", "30"]));
    // Warm one replica, then send the family: they all go where the prefix is.
    let (ids, _) = one(&cluster, ids_request(&prompts[0], LONG as u32));
    assert_eq!(ids, expected[0]);
    let reqs = prompts.iter().map(|p| ids_request(p, LONG as u32)).collect();
    // Kill the warm replica's rank 0 mid-stream (the idle replica has rank 0 too:
    // kill the one the router log says served).
    let out = cluster.run_streams(reqs, N / 2, |c| {
        let r = warm_replica(c);
        c.kill_shard(r, 0);
    });
    for (i, (ids, fin)) in out.into_iter().enumerate() {
        assert_eq!(ids, expected[i], "request {i} differs from an undisturbed run");
        assert_eq!(fin.generated_tokens as usize, LONG);
    }
    assert!(
        cluster.router_log().contains("re-queued after replica failure"),
        "the kill hit no request"
    );
}

/// The replica whose shard reports cached blocks.
fn warm_replica(c: &Cluster) -> usize {
    block_on(async {
        for (r, addrs) in c.shard_metrics.iter().enumerate() {
            let (_, text) = get(&addrs[0], "/metrics").await;
            if sum(&samples(&text), "sirocco_shard_prefix_cache_blocks", &[]) > 0.0 {
                return r;
            }
        }
        panic!("no replica holds cached blocks");
    })
}

#[test]
fn a_burst_with_a_new_prefix_computes_it_once() {
    let model = ref_model("tiny");
    const N: usize = 6;
    let prompts = family(5, 29, N);
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| generate_alone(&model, p, NEW)).collect();
    let mut cluster = Cluster::start(spec(&model, 1, &[]));
    let reqs = prompts.iter().map(|p| ids_request(p, NEW as u32)).collect();
    let out = cluster.run_streams(reqs, 0, |_| {});
    let mut cached: Vec<u32> = Vec::new();
    for (i, (ids, fin)) in out.into_iter().enumerate() {
        assert_eq!(ids, expected[i], "request {i}");
        cached.push(fin.cached_prompt_tokens);
    }
    // One computes the 28 shared tokens' blocks; the others wait for them.
    cached.sort();
    assert_eq!(cached, [vec![0], vec![28; N - 1]].concat());
}
