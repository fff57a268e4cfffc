//! `sirocco bench` against a real cluster: its report is self-consistent and agrees
//! with the router's own metrics (tokens generated, prompt tokens, successes), over
//! gRPC at a fixed concurrency, with Poisson arrivals, and over the OpenAI API.

mod support;

use serde_json::Value;
use std::collections::HashMap;
use support::cluster::{Cluster, ClusterSpec};
use support::*;

use support::http::get as http_get;

/// The router's metric samples, by series (name plus labels as printed).
fn router_metrics(cluster: &Cluster) -> HashMap<String, f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, text) = rt.block_on(http_get(&cluster.http_addr, "/metrics"));
    assert_eq!(status, 200, "{text}");
    support::http::samples(&text)
}

/// Sum of every series of metric `name` whose labels contain all of `with`.
fn sum(s: &HashMap<String, f64>, name: &str, with: &[&str]) -> usize {
    support::http::sum(s, name, with) as usize
}

/// The router's (successes, generated tokens, prompt tokens) so far.
fn router_totals(cluster: &Cluster) -> (usize, usize, usize) {
    let m = router_metrics(cluster);
    (
        sum(&m, "sirocco_requests_total", &["outcome=\"success\""]),
        sum(&m, "sirocco_generated_tokens_total", &[]),
        sum(&m, "sirocco_prompt_tokens_total", &[]),
    )
}

fn bench(cluster: &Cluster, args: &[&str]) -> Value {
    let out = std::process::Command::new(sirocco_bin())
        .args([
            "bench",
            "--addr",
            &cluster.router_addr,
            "--http-addr",
            &cluster.http_addr,
        ])
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sirocco bench failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing or not a number in {v:#}"))
}

/// A report of `n` requests of `input` prompt and `output` generated tokens each, all
/// completed, whose numbers agree with each other.
fn check_report(r: &Value, n: usize, input: usize, output: usize) {
    assert_eq!(num(r, "completed") as usize, n, "{r:#}");
    assert_eq!(num(r, "failed") as usize, 0, "{r:#}");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r:#}");
    assert_eq!(num(r, "total_input_tokens") as usize, n * input, "{r:#}");
    assert_eq!(num(r, "total_output_tokens") as usize, n * output, "{r:#}");
    let d = num(r, "duration_s");
    assert!(d > 0.0, "{r:#}");
    let close = |got: f64, want: f64| (got - want).abs() <= 1e-6 * want.abs().max(1.0);
    assert!(close(num(r, "request_throughput"), n as f64 / d), "{r:#}");
    assert!(close(num(r, "output_throughput"), (n * output) as f64 / d), "{r:#}");
    assert!(
        close(num(r, "total_token_throughput"), (n * (input + output)) as f64 / d),
        "{r:#}"
    );
    for key in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        let dist = &r[key];
        let (mean, median, p90, p99) = (
            num(dist, "mean"),
            num(dist, "median"),
            num(dist, "p90"),
            num(dist, "p99"),
        );
        assert!(
            mean >= 0.0 && 0.0 <= median && median <= p90 && p90 <= p99,
            "{key}: {r:#}"
        );
    }
    let (ttft, e2e) = (&r["ttft_ms"], &r["e2e_ms"]);
    for q in ["mean", "median", "p90", "p99"] {
        assert!(num(ttft, q) <= num(e2e, q), "TTFT {q} over E2E {q}: {r:#}");
    }
    // Every request's gaps add up to its decode time, so no gap exceeds the slowest request.
    assert!(num(&r["itl_ms"], "mean") <= num(e2e, "p99") + 1e-9, "{r:#}");
    // No request can take longer than the whole run.
    assert!(num(e2e, "p99") <= d * 1000.0 + 1e-6, "{r:#}");
}

/// The router counted exactly what the bench received, beyond `before`.
fn check_router_agrees(cluster: &Cluster, before: (usize, usize, usize), r: &Value) {
    let warm = &r["warmup"];
    let (ok, generated, prompt) = router_totals(cluster);
    assert_eq!(
        ok - before.0,
        num(r, "completed") as usize + num(warm, "completed") as usize,
        "{r:#}"
    );
    assert_eq!(
        generated - before.1,
        num(r, "total_output_tokens") as usize + num(warm, "output_tokens") as usize,
        "{r:#}"
    );
    assert_eq!(
        prompt - before.2,
        num(r, "total_input_tokens") as usize + num(warm, "input_tokens") as usize,
        "{r:#}"
    );
}

#[test]
fn bench_reports_agree_with_the_router_metrics() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        ..Default::default()
    });

    // A closed loop, with warmup requests that the report leaves out but the router counts.
    let before = router_totals(&cluster);
    let r = bench(
        &cluster,
        &[
            "--num-requests",
            "12",
            "--concurrency",
            "4",
            "--input-len",
            "20",
            "--output-len",
            "7",
            "--warmup",
            "2",
            "--slo-ttft-ms",
            "600000",
            "--slo-e2e-ms",
            "600000",
        ],
    );
    check_report(&r, 12, 20, 7);
    assert_eq!(r["api"], "grpc");
    assert_eq!(num(&r, "concurrency") as usize, 4);
    assert_eq!(num(&r["warmup"], "completed") as usize, 2, "{r:#}");
    assert_eq!(num(&r["warmup"], "output_tokens") as usize, 2 * 7, "{r:#}");
    // Generous SLOs: every request meets them.
    assert_eq!(num(&r, "goodput_requests") as usize, 12, "{r:#}");
    assert_eq!(num(&r, "goodput"), num(&r, "request_throughput"));
    check_router_agrees(&cluster, before, &r);

    // Poisson arrivals, with varied prompt lengths: only the router knows the total.
    let before = router_totals(&cluster);
    let r = bench(
        &cluster,
        &[
            "--request-rate",
            "20",
            "--num-requests",
            "6",
            "--input-len",
            "16",
            "--input-len-range",
            "0.5",
            "--output-len",
            "5",
            "--seed",
            "3",
        ],
    );
    assert_eq!(num(&r, "completed") as usize, 6, "{r:#}");
    assert_eq!(num(&r, "failed") as usize, 0, "{r:#}");
    assert_eq!(num(&r, "total_output_tokens") as usize, 6 * 5, "{r:#}");
    assert_eq!(num(&r, "request_rate"), 20.0);
    assert!(r["goodput"].is_null(), "no SLO given: {r:#}");
    check_router_agrees(&cluster, before, &r);

    // All at once.
    let before = router_totals(&cluster);
    let r = bench(
        &cluster,
        &[
            "--request-rate",
            "inf",
            "--num-requests",
            "5",
            "--input-len",
            "9",
            "--output-len",
            "3",
        ],
    );
    check_report(&r, 5, 9, 3);
    assert_eq!(r["request_rate"], "inf");
    check_router_agrees(&cluster, before, &r);

    // The OpenAI API: POST /v1/completions, streamed, with token ids returned.
    let before = router_totals(&cluster);
    let r = bench(
        &cluster,
        &[
            "--api",
            "openai",
            "--num-requests",
            "8",
            "--concurrency",
            "4",
            "--input-len",
            "20",
            "--output-len",
            "7",
        ],
    );
    check_report(&r, 8, 20, 7);
    assert_eq!(r["api"], "openai");
    check_router_agrees(&cluster, before, &r);

    // Requests the router refuses are reported, with their errors, and fail the run.
    let out = std::process::Command::new(sirocco_bin())
        .args([
            "bench",
            "--addr",
            &cluster.router_addr,
            "--num-requests",
            "3",
            "--concurrency",
            "2",
        ])
        .args(["--input-len", "4", "--output-len", "2", "--temperature=-1", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!((num(&r, "completed"), num(&r, "failed")), (0.0, 3.0), "{r:#}");
    let first = r["errors"][0].as_str().unwrap_or_default();
    assert!(first.contains("temperature"), "{r:#}");

    // Over the router's limit: refused before any request goes out.
    let out = std::process::Command::new(sirocco_bin())
        .args(["bench", "--addr", &cluster.router_addr, "--num-requests", "2"])
        .args(["--input-len", "10", "--output-len", "100000000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--output-len"), "{err}");
}

#[test]
fn bench_without_a_router_fails_cleanly() {
    let addr = format!("127.0.0.1:{}", support::cluster::free_port());
    let out = std::process::Command::new(sirocco_bin())
        .args(["bench", "--addr", &addr, "--num-requests", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the router"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `bench-engine` on a small generated model: every figure it reports is there and
/// positive, the serving workload generated what it was asked to, and bad workload
/// flags are refused before anything loads.
#[test]
fn bench_engine_reports_prefill_decode_and_a_serving_workload() {
    let shape = [
        "--hidden",
        "64",
        "--layers",
        "2",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--intermediate",
        "128",
        "--vocab",
        "300",
    ];
    let run = |extra: &[&str]| {
        std::process::Command::new(sirocco_bin())
            .arg("bench-engine")
            .args(shape)
            .args([
                "--repeat",
                "1",
                "--decode-steps",
                "3",
                "--batches",
                "1,3",
                "--prompt-len",
                "20",
            ])
            .args(["--prefill-chunk", "8", "--no-roofline", "--json"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[
        "--streams",
        "3",
        "--requests",
        "5",
        "--input-len",
        "9",
        "--output-len",
        "4",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let batches: Vec<u64> = v["decode"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["batch"].as_u64().unwrap())
        .collect();
    assert_eq!(batches, [1, 3], "{v}");
    let w = &v["workload"];
    assert_eq!(
        (w["streams"].as_u64(), w["requests"].as_u64()),
        (Some(3), Some(5)),
        "{v}"
    );
    assert_eq!(w["generated_tokens"].as_u64(), Some(20), "5 requests × 4 tokens: {v}");
    assert!(
        w["seconds"].as_f64().unwrap() > 0.0 && w["output_tokens_per_s"].as_f64().unwrap() > 0.0,
        "{v}"
    );

    let bad = run(&["--streams", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be positive"));
}
