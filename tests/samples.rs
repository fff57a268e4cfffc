//! `n` samples of one prompt against real processes: the prompt is prefilled once
//! and forked (the router's metrics count one prefill), and with a seed, sample i
//! is exactly what the request alone gives with seed + i, on every API: gRPC
//! (unary, stream, session), OpenAI `n` (whole and streamed) and `best_of`, which
//! returns the samples of highest log-probability.

mod support;

use serde_json::{json, Value};
use sirocco_proto::v1 as pb;
use std::collections::HashMap;
use support::cluster::{Cluster, ClusterSpec, LogsOnPanic};
use support::http::{get, post_json, samples, sum};
use support::requests::*;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const SEED: u64 = 11;
const TOKENS: u32 = 12;

/// `n` seeded samples (as `sample_alone` draws) of `prompt`.
fn sampled(prompt: &[u32], n: u32) -> pb::GenerateRequest {
    let mut req = ids_request(prompt, TOKENS);
    let p = req.parameters.as_mut().unwrap();
    p.temperature = Some(0.9);
    p.top_p = Some(0.95);
    p.seed = Some(SEED);
    req.num_samples = Some(n);
    req
}

async fn counters(addr: &str) -> (f64, f64, f64) {
    let (_, text) = get(addr, "/metrics").await;
    let m = samples(&text);
    (
        sum(&m, "sirocco_prefill_tokens_total", &[]),
        sum(&m, "sirocco_forked_samples_total", &[]),
        sum(&m, "sirocco_forked_prompt_tokens_total", &[]),
    )
}

#[test]
fn samples_share_one_prefill_and_each_is_its_seeded_request_alone() {
    let model = ref_model("odd");
    // No prefix cache: what the samples share, only the fork gives them.
    let cluster = Cluster::start(ClusterSpec {
        router_args: vec!["--prefix-cache".into(), "off".into()],
        ..ClusterSpec::one(&model)
    });
    let _logs = LogsOnPanic(&cluster);
    // 90 tokens: far past the window of 7, so the fork shares a rolling buffer.
    let prompt = prompts(8, 1000)[7].clone();
    let n = 4u32;
    let want: Vec<Vec<u32>> = (0..n as u64)
        .map(|i| sample_alone(&model, &prompt, TOKENS as usize, SEED + i))
        .collect();
    assert!(
        want.windows(2).any(|w| w[0] != w[1]),
        "the seeds draw different samples"
    );
    let addr = format!("http://{}", cluster.router_addr);
    rt().block_on(async {
        let mut client = connect(&addr).await.unwrap();
        let before = counters(&cluster.http_addr).await;
        let resp = client.generate(sampled(&prompt, n)).await.unwrap().into_inner();
        let after = counters(&cluster.http_addr).await;
        let got: Vec<Vec<u32>> = resp
            .samples
            .iter()
            .map(|s| s.tokens.iter().map(|t| t.id).collect())
            .collect();
        assert_eq!(got, want);
        assert_eq!(resp.tokens, resp.samples[0].tokens, "the top level is sample 0");
        for s in &resp.samples {
            assert_eq!(s.finished.as_ref().unwrap().generated_tokens, TOKENS);
        }
        // One prefill: all of the prompt but its last token once, then that token
        // by each sample (n samples alone would read n x 90).
        let l = prompt.len() as f64;
        assert_eq!(after.0 - before.0, l - 1.0 + f64::from(n), "prefilled tokens");
        assert_eq!(after.1 - before.1, f64::from(n - 1), "forked samples");
        assert_eq!(after.2 - before.2, f64::from(n - 1) * (l - 1.0), "shared tokens");

        // Streamed: every event tagged with its sample; the same samples.
        let mut s = client.generate_stream(sampled(&prompt, n)).await.unwrap().into_inner();
        let mut streamed = vec![Vec::new(); n as usize];
        let mut finished = 0;
        while let Some(ev) = s.message().await.unwrap() {
            match ev.event.unwrap() {
                pb::generate_stream_response::Event::Token(t) => streamed[ev.sample as usize].push(t.id),
                pb::generate_stream_response::Event::Finished(_) => finished += 1,
            }
        }
        assert_eq!((streamed, finished), (want.clone(), n));

        // One sample is the request alone; a single-token prompt has nothing to
        // fork and is still sampled right.
        let one = client.generate(sampled(&prompt, 1)).await.unwrap().into_inner();
        assert!(one.samples.is_empty());
        assert_eq!(one.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), want[0]);
        let short = client.generate(sampled(&[1], 3)).await.unwrap().into_inner();
        for (i, s) in short.samples.iter().enumerate() {
            let alone = sample_alone(&model, &[1], TOKENS as usize, SEED + i as u64);
            assert_eq!(s.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), alone);
        }

        // Out of range: refused, naming the field.
        for bad in [0, 129] {
            let err = client.generate(sampled(&prompt, bad)).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("num_samples"), "{}", err.message());
        }

        // In a session: each sample's events carry its index; a cancel ends every
        // sample of the request; the session's other requests go on.
        let (tx, rx) = mpsc::channel(8);
        let mut events = client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let start = |id: &str, req| pb::SessionRequest {
            kind: Some(pb::session_request::Kind::Start(pb::SessionStart {
                id: id.into(),
                request: Some(req),
            })),
        };
        tx.send(start("s", sampled(&prompt, n))).await.unwrap();
        let mut long = sampled(&prompt, 3);
        long.parameters.as_mut().unwrap().max_new_tokens = Some(1500);
        tx.send(start("long", long)).await.unwrap();
        let mut seen: HashMap<(String, u32), Vec<u32>> = HashMap::new();
        let mut ended: HashMap<String, Vec<pb::Finished>> = HashMap::new();
        let mut tx = Some(tx);
        while let Some(batch) = events.message().await.unwrap() {
            for ev in batch.events {
                match ev.event.unwrap() {
                    pb::session_event::Event::Token(t) => seen.entry((ev.id, ev.sample)).or_default().push(t.id),
                    pb::session_event::Event::Finished(f) => ended.entry(ev.id).or_default().push(f),
                    pb::session_event::Event::Error(e) => panic!("{}: {}", ev.id, e.message),
                }
            }
            let long_going = (0..3).all(|i| seen.get(&("long".into(), i)).is_some_and(|t| t.len() >= 3));
            if long_going && !ended.contains_key("long") {
                if let Some(tx) = &tx {
                    tx.send(pb::SessionRequest {
                        kind: Some(pb::session_request::Kind::Cancel(pb::SessionCancel {
                            id: "long".into(),
                        })),
                    })
                    .await
                    .unwrap();
                }
            }
            if ended.get("s").is_some_and(|f| f.len() == n as usize) && ended.contains_key("long") {
                tx = None;
            }
        }
        for i in 0..n {
            assert_eq!(seen[&("s".to_string(), i)], want[i as usize], "session sample {i}");
        }
        let long_ends = &ended["long"];
        assert_eq!(long_ends.len(), 3, "one cancelled finish per sample");
        assert!(long_ends
            .iter()
            .all(|f| f.reason == pb::FinishReason::Cancelled as i32 && f.generated_tokens < 1500));
        cluster.wait_kv_free().await;
    });
}

/// The generated token ids of each choice, by index.
fn choice_ids(v: &Value) -> Vec<Vec<u32>> {
    let mut choices: Vec<&Value> = v["choices"].as_array().unwrap().iter().collect();
    choices.sort_by_key(|c| c["index"].as_u64().unwrap());
    choices.iter().map(|c| ids(&c["token_ids"])).collect()
}

#[test]
fn openai_n_and_best_of_return_the_seeded_samples_and_the_likeliest() {
    let model = ref_model("odd");
    // Two ranks: each forks its own KV slice alike.
    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        tp: 2,
        ..Default::default()
    });
    let _logs = LogsOnPanic(&cluster);
    let prompt = prompts(8, 1000)[6].clone();
    let want: Vec<Vec<u32>> = (0..3)
        .map(|i| sample_alone(&model, &prompt, TOKENS as usize, SEED + i))
        .collect();
    let addr = cluster.http_addr.clone();
    rt().block_on(async {
        let body = json!({"prompt": prompt, "max_tokens": TOKENS, "temperature": 0.9, "top_p": 0.95,
                          "seed": SEED, "ignore_eos": true, "return_token_ids": true, "n": 3, "logprobs": 0});
        let (status, text) = post_json(&addr, "/v1/completions", &[], &body).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(choice_ids(&v), want);
        assert_eq!(counters(&addr).await.1, 2.0, "two choices forked from the third");
        let l = prompt.len() as u64;
        assert_eq!(v["usage"]["prompt_tokens"], l, "the prompt counts once");
        assert_eq!(v["usage"]["completion_tokens"], 3 * u64::from(TOKENS));
        let totals: Vec<f64> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                c["logprobs"]["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .sum()
            })
            .collect();
        let best = (0..3).max_by(|&a, &b| totals[a].total_cmp(&totals[b])).unwrap();

        // best_of 3, n 1: the likeliest of the same three samples; all are billed.
        let mut b = body.clone();
        b["n"] = json!(1);
        b["best_of"] = json!(3);
        b.as_object_mut().unwrap().remove("logprobs");
        let (status, text) = post_json(&addr, "/v1/completions", &[], &b).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(choice_ids(&v), vec![want[best].clone()]);
        assert_eq!(v["choices"][0]["logprobs"], Value::Null, "logprobs were not asked for");
        assert_eq!(v["usage"]["completion_tokens"], 3 * u64::from(TOKENS));

        // Streamed n: chunks carry their choice's index; each choice as whole.
        let mut s = body.clone();
        s["stream"] = json!(true);
        s["stream_options"] = json!({"include_usage": true});
        let (status, text) = post_json(&addr, "/v1/completions", &[], &s).await;
        assert_eq!(status, 200, "{text}");
        let mut streamed = vec![Vec::new(); 3];
        let mut finishes = 0;
        let mut usage = Value::Null;
        for d in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if d == "[DONE]" {
                continue;
            }
            let c: Value = serde_json::from_str(d).unwrap();
            if !c["usage"].is_null() {
                usage = c["usage"].clone();
            }
            for choice in c["choices"].as_array().unwrap() {
                let i = choice["index"].as_u64().unwrap() as usize;
                if let Some(t) = choice.get("token_ids") {
                    streamed[i].extend(ids(t));
                }
                finishes += usize::from(!choice["finish_reason"].is_null());
            }
        }
        assert_eq!((streamed, finishes), (want.clone(), 3));
        assert_eq!(usage["completion_tokens"], 3 * u64::from(TOKENS));

        // Bad combinations name their field.
        for (bad, field) in [
            (json!({"prompt": [1, 2], "n": 2, "best_of": 1}), "best_of"),
            (json!({"prompt": [1, 2], "best_of": 2, "stream": true}), "best_of"),
            (json!({"prompt": [1, 2], "n": 500}), "n"),
            (json!({"prompt": [1, 2], "best_of": 500}), "best_of"),
        ] {
            let (status, text) = post_json(&addr, "/v1/completions", &[], &bad).await;
            assert_eq!(status, 400, "{text}");
            let e: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(e["error"]["param"], field, "{text}");
        }
    });
}
