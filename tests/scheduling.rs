//! Priorities and deadlines against real processes: a more urgent request preempts a
//! less urgent running one, which still streams exactly what it would have alone; a
//! request past its deadline ends (DEADLINE_EXCEEDED over gRPC, 408 over HTTP) and
//! its KV is freed; out-of-range priorities and timeouts are refused naming the field.

mod support;

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterSpec, LogsOnPanic};
use support::http::{get, post_json, samples, sum};
use support::requests::*;
use support::*;

fn sampled(ids: &[u32], n: u32, seed: u64, priority: i32) -> sirocco_proto::v1::GenerateRequest {
    let mut r = ids_request(ids, n);
    let p = r.parameters.as_mut().unwrap();
    p.temperature = Some(0.9);
    p.top_p = Some(0.95);
    p.seed = Some(seed);
    r.priority = Some(priority);
    r
}

#[test]
fn a_more_urgent_request_preempts_a_running_one_which_still_streams_exactly() {
    let model = ref_model("odd");
    // One sequence per batch: the urgent request can only run in the other's place.
    let cluster = Cluster::start(ClusterSpec {
        router_args: vec!["--max-batch-size".into(), "1".into()],
        ..ClusterSpec::one(&model)
    });
    let _logs = LogsOnPanic(&cluster);
    let low_prompt = [1, 17, 400, 33];
    let high_prompt = [1, 5, 9];
    let want_low = sample_alone(&model, &low_prompt, 600, 7);
    let want_high = generate_alone(&model, &high_prompt, 20);
    let addr = format!("http://{}", cluster.router_addr);
    rt().block_on(async {
        let mut low = connect(&addr)
            .await
            .unwrap()
            .generate_stream(sampled(&low_prompt, 600, 7, 5))
            .await
            .unwrap()
            .into_inner();
        let mut got_low = Vec::new();
        while got_low.len() < 10 {
            match low.message().await.unwrap().unwrap().event {
                Some(sirocco_proto::v1::generate_stream_response::Event::Token(t)) => got_low.push(t.id),
                other => panic!("{other:?} before 10 tokens"),
            }
        }
        let mut urgent = ids_request(&high_prompt, 20);
        urgent.priority = Some(-1);
        let client = connect(&addr).await.unwrap();
        let high = tokio::spawn(async move { (stream_all(client, urgent).await, Instant::now()) });
        let mut low_done_at = None;
        while let Some(ev) = low.message().await.unwrap() {
            match ev.event {
                Some(sirocco_proto::v1::generate_stream_response::Event::Token(t)) => got_low.push(t.id),
                Some(sirocco_proto::v1::generate_stream_response::Event::Finished(_)) => {
                    low_done_at = Some(Instant::now());
                    break;
                }
                None => {}
            }
        }
        let (high, high_done_at) = high.await.unwrap();
        assert_eq!(high.unwrap().0, want_high);
        assert_eq!(
            got_low, want_low,
            "the preempted stream differs from the undisturbed one"
        );
        // The urgent request did not wait for the other to finish.
        assert!(high_done_at < low_done_at.unwrap());
        let (_, metrics) = get(&cluster.http_addr, "/metrics").await;
        let s = samples(&metrics);
        assert!(sum(&s, "sirocco_preempted_requests_total", &[]) >= 1.0, "{metrics}");
    });
}

#[test]
fn a_request_past_its_deadline_ends_and_frees_its_kv() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec::one(&model));
    let _logs = LogsOnPanic(&cluster);
    let addr = format!("http://{}", cluster.router_addr);
    rt().block_on(async {
        // The body's timeout_ms, and a grpc-timeout header (the client itself does not
        // enforce it: the router must).
        let mut by_field = ids_request(&[1, 5, 9], 2000);
        by_field.timeout_ms = Some(200);
        let mut by_header = tonic::Request::new(ids_request(&[1, 5, 9], 2000));
        by_header.metadata_mut().insert("grpc-timeout", "200m".parse().unwrap());
        for req in [tonic::Request::new(by_field), by_header] {
            let start = Instant::now();
            let mut client = connect(&addr).await.unwrap();
            let mut s = client.generate_stream(req).await.unwrap().into_inner();
            let status = loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("finished within its deadline"),
                    Err(status) => break status,
                }
            };
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert!(status.message().contains("deadline"), "{status:?}");
            assert!(start.elapsed() < Duration::from_secs(5));
            cluster.wait_kv_free().await;
        }
        // Over HTTP: 408.
        let body = json!({"model": "odd", "prompt": [1, 5, 9], "max_tokens": 2000, "ignore_eos": true, "timeout": 0.2});
        let (status, text) = post_json(&cluster.http_addr, "/v1/completions", &[], &body).await;
        assert_eq!(status, 408, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "timeout", "{v}");
        cluster.wait_kv_free().await;
        let (_, metrics) = get(&cluster.http_addr, "/metrics").await;
        let s = samples(&metrics);
        assert!(
            sum(&s, "sirocco_requests_total", &["outcome=\"deadline_exceeded\""]) >= 3.0,
            "{metrics}"
        );

        // Out of range: refused, naming the field.
        for (body, param, code) in [
            (
                json!({"model": "odd", "prompt": [1], "priority": 5000}),
                "priority",
                400,
            ),
            (json!({"model": "odd", "prompt": [1], "timeout": -1}), "timeout", 400),
            (
                json!({"model": "odd", "prompt": [1], "priority": "high"}),
                "priority",
                422,
            ),
        ] {
            let (status, text) = post_json(&cluster.http_addr, "/v1/completions", &[], &body).await;
            assert_eq!(status, code, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["param"], param, "{v}");
        }
        let mut bad = ids_request(&[1], 4);
        bad.priority = Some(-1001);
        let err = connect(&addr).await.unwrap().generate(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("priority must be in [-1000, 1000]"),
            "{err:?}"
        );
    });
}
