//! `sirocco bench` against a real cluster: its report is self-consistent and agrees
//! with the router's own metrics (tokens generated, prompt tokens, successes), over
//! gRPC at a fixed concurrency, with Poisson arrivals, and over the OpenAI API; and
//! against a stub OpenAI-compatible server without our extensions, whose chunks and
//! delays are known: token counts by `usage`, a tokenizer or chunks, chat requests,
//! the API key and model sent, fresh prompts per seed, and `--compare`. And
//! `--structured json-schema`: its phases against a real router, and its
//! `response_format` against the stub.

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
    // Our server returns token ids, so they count, not `usage`.
    assert_eq!(r["output_token_count"], "token_ids", "{r:#}");
    assert_eq!(r["input_token_count"], "token_ids", "{r:#}");
    check_router_agrees(&cluster, before, &r);

    // One multiplexed Session stream carries every request; the router's CPU over
    // the run is reported.
    let before = router_totals(&cluster);
    let r = bench(
        &cluster,
        &[
            "--api",
            "session",
            "--num-requests",
            "16",
            "--concurrency",
            "8",
            "--input-len",
            "20",
            "--output-len",
            "7",
        ],
    );
    check_report(&r, 16, 20, 7);
    assert_eq!(r["api"], "session");
    // Measured in clock ticks: a run this small may take none.
    let cpu = num(&r, "router_cpu_seconds");
    assert!(cpu >= 0.0, "{r:#}");
    let per_1k = num(&r, "router_cpu_seconds_per_1k_tokens");
    assert!((per_1k - cpu * 1000.0 / (16.0 * 7.0)).abs() < 1e-9, "{r:#}");
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

/// What the stub server was sent.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
    body: Value,
}

/// A minimal OpenAI-compatible server: GET /v1/models, and every POST answered with
/// `STUB_CHUNKS` streamed as SSE (completions `text` or chat `delta.content`), the first
/// after `STUB_FIRST_MS`, then every `STUB_GAP_MS`; with `usage`, a final usage chunk.
/// No token ids, as any server but ours.
struct Stub {
    addr: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
}

const STUB_CHUNKS: &[&str] = &["The", " quick", " brown fox", " jumps over", " the lazy dog", "."];
const STUB_FIRST_MS: u64 = 80;
const STUB_GAP_MS: u64 = 10;
const STUB_PROMPT_TOKENS: usize = 11;
const STUB_COMPLETION_TOKENS: usize = 9;

impl Stub {
    fn start(usage: bool) -> Stub {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = rt();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        rt.spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let header = |name: &str| {
                        head.lines()
                            .filter_map(|l| l.split_once(':'))
                            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.trim().to_string())
                    };
                    let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                    while buf.len() < head_end + len {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                    if head.starts_with("GET") {
                        let body = r#"{"object":"list","data":[{"id":"stub-model","object":"model"}]}"#;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(resp.as_bytes()).await;
                        return;
                    }
                    let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
                    let chat = path.contains("/chat/");
                    log.lock().unwrap().push(Seen {
                        path,
                        authorization: header("authorization"),
                        body,
                    });
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for (i, c) in STUB_CHUNKS.iter().enumerate() {
                        let ms = if i == 0 { STUB_FIRST_MS } else { STUB_GAP_MS };
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                        let choice = if chat {
                            serde_json::json!({"index": 0, "delta": {"content": c}})
                        } else {
                            serde_json::json!({"index": 0, "text": c})
                        };
                        let ev = format!("data: {}\n\n", serde_json::json!({"choices": [choice]}));
                        if s.write_all(ev.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let mut tail = String::new();
                    if usage {
                        let u = serde_json::json!({"choices": [], "usage": {
                            "prompt_tokens": STUB_PROMPT_TOKENS,
                            "completion_tokens": STUB_COMPLETION_TOKENS,
                        }});
                        tail.push_str(&format!("data: {u}\n\n"));
                    }
                    tail.push_str("data: [DONE]\n\n");
                    let _ = s.write_all(tail.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Stub { addr, seen, _rt: rt }
    }

    /// The requests seen since the last call.
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut self.seen.lock().unwrap())
    }

    /// `sirocco bench` against the stub; its JSON report.
    fn bench(&self, args: &[&str]) -> Value {
        let out = std::process::Command::new(sirocco_bin())
            .args([
                "bench",
                "--http-addr",
                &self.addr,
                "--num-requests",
                "3",
                "--concurrency",
                "2",
            ])
            .args(["--input-len", "30", "--output-len", "16", "--request-timeout", "20"])
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sirocco bench failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
    }
}

/// The prompt texts of the requests seen.
fn prompts_of(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| {
            let p = &s.body["prompt"];
            let p = if p.is_null() {
                &s.body["messages"][0]["content"]
            } else {
                p
            };
            p.as_str()
                .unwrap_or_else(|| panic!("no text prompt in {:#}", s.body))
                .to_string()
        })
        .collect()
}

/// A report of 3 completed requests whose latencies reflect the stub's delays.
fn check_stub_report(r: &Value, output: usize, input: usize, count: &str, input_count: &str) {
    assert_eq!((num(r, "completed"), num(r, "failed")), (3.0, 0.0), "{r:#}");
    assert_eq!(num(r, "total_output_tokens") as usize, output, "{r:#}");
    assert_eq!(num(r, "total_input_tokens") as usize, input, "{r:#}");
    assert_eq!(r["output_token_count"], count, "{r:#}");
    assert_eq!(r["input_token_count"], input_count, "{r:#}");
    // TTFT is the first chunk with content, which the stub holds back STUB_FIRST_MS.
    assert!(num(&r["ttft_ms"], "median") >= STUB_FIRST_MS as f64, "{r:#}");
    // The chunk gaps: at least the stub's, never more than a whole request.
    assert!(num(&r["itl_ms"], "median") >= STUB_GAP_MS as f64 * 0.9, "{r:#}");
    assert!(num(&r["itl_ms"], "p99") <= num(&r["e2e_ms"], "p99"), "{r:#}");
    assert!(num(&r["tpot_ms"], "mean") > 0.0, "{r:#}");
}

#[test]
fn bench_measures_an_openai_server_without_extensions() {
    // Usage counts, sent as the server reports them; the key and model reach the server.
    let stub = Stub::start(true);
    let r = stub.bench(&[
        "--api",
        "openai",
        "--corpus",
        "--api-key",
        "sekrit",
        "--model",
        "served-name",
    ]);
    check_stub_report(&r, 3 * STUB_COMPLETION_TOKENS, 3 * STUB_PROMPT_TOKENS, "usage", "usage");
    assert_eq!(r["prompts"], "corpus", "{r:#}");
    let seen = stub.take();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.path, "/v1/completions");
        assert_eq!(s.authorization.as_deref(), Some("Bearer sekrit"));
        assert_eq!(s.body["model"], "served-name");
        assert_eq!(s.body["stream_options"]["include_usage"], true);
    }

    // Chat: /v1/chat/completions with the prompt as one user turn (text by default), and
    // the model named by GET /v1/models when --model is absent.
    let r = stub.bench(&["--api", "openai-chat"]);
    check_stub_report(&r, 3 * STUB_COMPLETION_TOKENS, 3 * STUB_PROMPT_TOKENS, "usage", "usage");
    for s in stub.take() {
        assert_eq!(s.path, "/v1/chat/completions");
        assert_eq!(s.body["messages"][0]["role"], "user", "{:#}", s.body);
        assert!(s.body["messages"][0]["content"].as_str().is_some_and(|t| t.len() > 40));
        assert_eq!(s.body["model"], "stub-model");
        assert!(s.authorization.is_none());
    }

    // No usage and no tokenizer: one token per chunk with content; the prompt uncounted.
    let stub = Stub::start(false);
    let r = stub.bench(&["--api", "openai", "--corpus"]);
    check_stub_report(&r, 3 * STUB_CHUNKS.len(), 0, "chunks", "unknown");
    stub.take();

    // A tokenizer: the streamed text and the prompts counted as that tokenizer does.
    let path = shared_dir().join("tokenizers/mistral-7b-v0.1/tokenizer.json");
    let tok = sirocco_tokenizer::Tokenizer::from_file(&path).unwrap();
    let r = stub.bench(&["--api", "openai", "--corpus", "--tokenizer", path.to_str().unwrap()]);
    let per_request = tok.encode(&STUB_CHUNKS.concat(), false).unwrap().len();
    let input: usize = prompts_of(&stub.take())
        .iter()
        .map(|p| tok.encode(p, true).unwrap().len())
        .sum();
    check_stub_report(&r, 3 * per_request, input, "tokenizer", "tokenizer");
    assert_ne!(
        per_request,
        STUB_CHUNKS.len(),
        "the test should tell tokens from chunks"
    );
}

#[test]
fn bench_prompts_are_fresh_per_seed_and_runs_compare() {
    let stub = Stub::start(true);
    let dir = tempfile::tempdir().unwrap();
    let mut saved = Vec::new();
    let mut run = |name: &str, args: &[&str]| {
        let r = stub.bench(args);
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, r.to_string()).unwrap();
        saved.push(path);
        (r, prompts_of(&stub.take()))
    };
    let (a, pa) = run("seed-one", &["--api", "openai", "--corpus", "--seed", "1"]);
    let (_, pa2) = run("seed-one-again", &["--api", "openai", "--corpus", "--seed", "1"]);
    let (_, pb) = run("seed-two", &["--api", "openai", "--corpus", "--seed", "2"]);
    assert_eq!(num(&a, "seed"), 1.0);
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(sorted(pa.clone()), sorted(pa2), "the same seed draws the same prompts");
    assert!(pb.iter().all(|p| !pa.contains(p)), "{pa:#?}\n{pb:#?}");
    // Prompts within a run differ too.
    assert!(pa.iter().enumerate().all(|(i, p)| !pa[..i].contains(p)), "{pa:#?}");
    // Without --seed, each run draws its own, and reports it.
    let (c, pc) = run("no-seed", &["--api", "openai-chat", "--slo-ttft-ms", "60000"]);
    let (d, pd) = run("no-seed-again", &["--api", "openai-chat"]);
    assert_ne!(c["seed"], d["seed"]);
    assert!(pd.iter().all(|p| !pc.contains(p)));
    assert_eq!(num(&c, "goodput_requests"), 3.0, "{c:#}");

    // A ShareGPT-style dataset: the first human turn of each record.
    let data = dir.path().join("sharegpt.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"conversations": [{"from": "human", "value": "Why is the sky blue?"}, {"from": "gpt", "value": "Rayleigh."}]}"#,
            "\n",
            r#"{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a river."}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let (r, p) = run("dataset", &["--api", "openai", "--dataset", data.to_str().unwrap()]);
    assert_eq!(r["prompts"], "dataset");
    let mut p = p;
    p.sort();
    p.dedup();
    assert_eq!(p, ["Name a river.", "Why is the sky blue?"]);

    // --compare: one table with a column for every saved run.
    let out = std::process::Command::new(sirocco_bin())
        .args(["bench", "--compare"])
        .args(&saved)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().next().unwrap_or_default();
    for name in [
        "seed-one",
        "seed-one-again",
        "seed-two",
        "no-seed",
        "no-seed-again",
        "dataset",
    ] {
        assert!(header.split_whitespace().any(|h| h == name), "{name} missing:\n{table}");
    }
    for row in [
        "Request throughput",
        "Output token throughput",
        "P99 TTFT",
        "P90 TPOT",
        "P50 ITL",
        "goodput",
    ] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
    // Something that is no report is refused with its name.
    let out = std::process::Command::new(sirocco_bin())
        .args(["bench", "--compare"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sharegpt.jsonl") && !err.contains("panicked"), "{err}");
}

#[test]
fn shared_prefix_prompts_share_exactly_the_prefix_and_extensions_can_be_left_out() {
    // No usage: the stub's fixed prompt count would not match what is sent.
    let stub = Stub::start(false);
    // Random ids: every prompt starts with the same 40 ids, then 30 of its own.
    let r = stub.bench(&[
        "--api",
        "openai",
        "--vocab-size",
        "1000",
        "--shared-prefix",
        "40",
        "--seed",
        "5",
    ]);
    assert_eq!(r["shared_prefix"], 40, "{r:#}");
    let seen = stub.take();
    let ids: Vec<Vec<u64>> = seen
        .iter()
        .map(|s| {
            s.body["prompt"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        })
        .collect();
    assert!(ids.iter().all(|p| p.len() == 70 && p[..40] == ids[0][..40]), "{ids:?}");
    assert!(ids
        .iter()
        .enumerate()
        .all(|(i, p)| ids[..i].iter().all(|q| q[40..] != p[40..])));
    // The extensions go by default, and not with --no-extensions.
    assert!(seen
        .iter()
        .all(|s| s.body["ignore_eos"] == true && s.body["return_token_ids"] == true));
    // Text: the corpus prefix, then a blank line, then each prompt's own text.
    let r = stub.bench(&["--api", "openai-chat", "--shared-prefix", "40", "--no-extensions"]);
    assert_eq!(r["completed"], 3, "{r:#}");
    let seen = stub.take();
    let texts = prompts_of(&seen);
    let prefix = texts[0].split("\n\n").next().unwrap().to_string();
    assert!(prefix.split_whitespace().count() >= 20, "{prefix:?}");
    assert!(
        texts.iter().all(|t| t.starts_with(&format!("{prefix}\n\n"))),
        "{texts:#?}"
    );
    assert!(texts.iter().enumerate().all(|(i, t)| !texts[..i].contains(t)));
    assert!(seen
        .iter()
        .all(|s| s.body.get("ignore_eos").is_none() && s.body.get("return_token_ids").is_none()));
}

/// The sides of every run of a `--structured` report: (streams, key, side).
fn structured_sides(r: &Value) -> Vec<(u64, &'static str, &Value)> {
    let keys = [
        "constrained",
        "unconstrained",
        "mixed_constrained",
        "mixed_unconstrained",
    ];
    r["runs"]
        .as_array()
        .unwrap_or_else(|| panic!("no runs in {r:#}"))
        .iter()
        .flat_map(|run| keys.map(|k| (num(run, "streams") as u64, k, &run[k])))
        .collect()
}

/// `--structured json-schema` against a real router: at 1 and 16 streams, every phase
/// completes, each constrained output is JSON of its schema that its constraint ended
/// (over gRPC and the OpenAI API), the unconstrained requests decode as many tokens
/// as the constrained ones, the router counted what the bench received, and the table shows
/// every phase.
#[test]
fn structured_bench_runs_constrained_unconstrained_and_mixed_phases() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        tp: 1,
        ..Default::default()
    });
    // A schema with few outputs, all short: every constrained output must complete.
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("flag.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}"#,
    )
    .unwrap();
    let before = router_totals(&cluster);
    let flag = [
        "--structured",
        "json-schema",
        "--schema",
        schema.to_str().unwrap(),
        "--num-requests",
        "2",
        "--input-len",
        "8",
        "--output-len",
        "48",
    ];
    let r = bench(&cluster, &[&flag[..], &["--seed", "3"]].concat());
    assert_eq!(
        (r["workload"].as_str(), r["structured"].as_str()),
        (Some("structured"), Some("json-schema"))
    );
    let streams: Vec<u64> = r["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| num(x, "streams") as u64)
        .collect();
    assert_eq!(streams, [1, 16], "{r:#}");
    let mut generated = num(&r["warmup"], "output_tokens") as usize;
    for (s, key, side) in structured_sides(&r) {
        let want = if key.starts_with("mixed") { 1 } else { 2 };
        assert_eq!(
            (num(side, "completed") as usize, num(side, "failed") as usize),
            (want, 0),
            "{s} streams, {key}: {r:#}"
        );
        generated += num(side, "total_output_tokens") as usize;
        if key.ends_with("_constrained") || key == "constrained" {
            assert_eq!(num(side, "json_complete"), 1.0, "{s} streams, {key}: {r:#}");
            assert_eq!(num(side, "schema_valid"), 1.0, "{s} streams, {key}: {r:#}");
        } else {
            assert!(side.get("json_complete").is_none(), "{r:#}");
        }
    }
    for run in r["runs"].as_array().unwrap() {
        // Unconstrained requests ignore EOS, so each decodes exactly as many tokens as
        // the constrained request of its number.
        let tokens = |side: &str| num(&run[side], "total_output_tokens") as usize;
        assert_eq!(tokens("unconstrained"), tokens("constrained"), "{run:#}");
        assert!(run["mask_overhead"].is_number(), "{run:#}");
    }
    let (_, router_generated, _) = router_totals(&cluster);
    assert_eq!(router_generated - before.1, generated, "{r:#}");

    // The same over the OpenAI API: the schema goes as response_format.
    let r = bench(
        &cluster,
        &[&flag[..], &["--api", "openai", "--concurrency", "2"]].concat(),
    );
    for (s, key, side) in structured_sides(&r) {
        assert_eq!(num(side, "failed"), 0.0, "{s} streams, {key}: {r:#}");
        if !key.ends_with("unconstrained") {
            assert_eq!(num(side, "schema_valid"), 1.0, "{s} streams, {key}: {r:#}");
            assert_eq!(num(side, "json_complete"), 1.0, "{s} streams, {key}: {r:#}");
        }
    }

    // The built-in schema, as a table: every phase's column and the ratios.
    let out = std::process::Command::new(sirocco_bin())
        .args([
            "bench",
            "--addr",
            &cluster.router_addr,
            "--http-addr",
            &cluster.http_addr,
        ])
        .args([
            "--structured",
            "json-schema",
            "--num-requests",
            "2",
            "--concurrency",
            "2",
        ])
        .args(["--input-len", "8", "--output-len", "48", "--warmup", "1"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    for want in [
        "Structured Output Benchmark (json-schema)",
        " 2 streams ",
        "unconstr.",
        "mixed: u.",
        "Median TPOT (ms):",
        "P99 TPOT (ms):",
        "JSON and complete:",
        "Matches the schema:",
        "TPOT p50, constrained / unconstrained:",
        "TPOT p50, mixed unconstr. / unconstr.:",
    ] {
        assert!(table.contains(want), "{want:?} missing:\n{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("Schema:") && l.ends_with("built-in")),
        "{table}"
    );
}

#[test]
fn structured_bench_sends_response_format_over_the_openai_api() {
    let stub = Stub::start(true);
    let r = stub.bench(&[
        "--api",
        "openai",
        "--corpus",
        "--structured",
        "json-schema",
        "--warmup",
        "0",
    ]);
    let seen = stub.take();
    // 3 requests in each of the three phases (--concurrency 2: one number of streams).
    assert_eq!(seen.len(), 9);
    let constrained: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.body.get("response_format").is_some())
        .collect();
    assert_eq!(
        constrained.len(),
        3 + 2,
        "all of one phase, the mixed one's even requests"
    );
    for s in &constrained {
        let f = &s.body["response_format"];
        assert_eq!(f["type"], "json_schema", "{:#}", s.body);
        assert_eq!(f["json_schema"]["name"], "bench", "{:#}", s.body);
        assert_eq!(f["json_schema"]["schema"]["type"], "object", "{:#}", s.body);
        assert_eq!(
            (s.body["ignore_eos"].as_bool(), s.body["max_tokens"].as_u64()),
            (Some(false), Some(16))
        );
    }
    // The others: through EOS, as long as the constrained ones (the stub's usage).
    for s in seen.iter().filter(|s| s.body.get("response_format").is_none()) {
        assert_eq!(
            (s.body["ignore_eos"].as_bool(), s.body["max_tokens"].as_u64()),
            (Some(true), Some(STUB_COMPLETION_TOKENS as u64)),
            "{:#}",
            s.body
        );
    }
    // The stub's text is no JSON, and it says nothing of why it finished.
    let run = &r["runs"][0];
    assert_eq!(run["streams"], 2, "{r:#}");
    assert_eq!(run["constrained"]["json_complete"], 0.0, "{r:#}");
    assert_eq!(run["constrained"]["json_parsed"], 0.0, "{r:#}");
}
