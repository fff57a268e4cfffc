//! `sirocco batch` against a running cluster (real router and shard processes): every
//! input line gets exactly one result or error line, bad lines are reported with
//! their numbers while the rest run, and a run interrupted with SIGINT and started
//! again finishes without redoing a line, with the answers an undisturbed run gives.
//! The router's own Batch API (`/v1/files`, `/v1/batches`) resumes a batch after the
//! router is killed, and a cancel ends it keeping what finished.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterSpec, LogsOnPanic};
use support::*;

/// `n` requests (greedy completions and chats of varied lengths) with bad lines
/// among them; returns the file's text and the numbers of its bad lines.
fn input(n: usize) -> (String, Vec<usize>) {
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    for i in 0..n {
        let body = if i % 3 == 0 {
            json!({"model": "sirocco-builtin", "messages": [{"role": "user", "content": format!("Tell me about {i}.")}],
                   "max_tokens": 6 + i % 11, "temperature": 0})
        } else {
            json!({"model": "sirocco-builtin", "prompt": format!("Story number {i}:"), "max_tokens": 6 + i % 13,
                   "temperature": 0, "ignore_eos": true})
        };
        let url = if i % 3 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        lines.push(json!({"custom_id": format!("req-{i}"), "method": "POST", "url": url, "body": body}).to_string());
        match i {
            10 => lines.push("{\"custom_id\": \"cut".into()),
            20 => lines.push(
                json!({"custom_id": "req-3", "method": "POST", "url": "/v1/completions", "body": {}}).to_string(),
            ),
            30 => {
                lines.push(json!({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}).to_string())
            }
            _ => continue,
        }
        bad.push(lines.len());
    }
    (lines.join("\n") + "\n", bad)
}

fn batch_cmd(cluster: &Cluster, input: &Path, output: &Path) -> Command {
    let mut c = Command::new(sirocco_bin());
    c.args(["batch", "--concurrency", "16", "--url"])
        .arg(format!("http://{}", cluster.http_addr))
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// The output's lines by input line number; panics on a line written twice.
fn results(output: &Path) -> BTreeMap<u64, Value> {
    let mut m = BTreeMap::new();
    for l in std::fs::read_to_string(output).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let n = v["line"].as_u64().unwrap();
        assert!(m.insert(n, v).is_none(), "line {n} written twice");
    }
    m
}

/// What must not depend on the run: the answer's status, choices and usage, or the error.
fn answer(v: &Value) -> Value {
    let b = &v["response"]["body"];
    json!([
        v["custom_id"],
        v["response"]["status_code"],
        b["choices"],
        b["usage"],
        b["error"],
        v["error"]
    ])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_batch_file_runs_whole_and_resumes_after_sigint_without_redoing_lines() {
    let cluster = Cluster::start(ClusterSpec {
        tp: 1,
        ..Default::default()
    });
    let _logs = LogsOnPanic(&cluster);
    let dir = tempfile::tempdir().unwrap();
    let n = 1200;
    let (text, bad) = input(n);
    let inp = dir.path().join("in.jsonl");
    std::fs::write(&inp, &text).unwrap();
    let total = text.lines().count() as u64;

    // Undisturbed.
    let whole = dir.path().join("whole.jsonl");
    let o = batch_cmd(&cluster, &inp, &whole).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let want = results(&whole);
    assert_eq!(
        want.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    for (n, v) in &want {
        if bad.contains(&(*n as usize)) {
            assert_eq!(v["response"], Value::Null, "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("line {n}: ")),
                "{v}"
            );
        } else {
            assert_eq!(v["response"]["status_code"], 200, "{v}");
            assert!(
                v["response"]["body"]["usage"]["completion_tokens"].as_u64().unwrap() > 0,
                "{v}"
            );
        }
    }
    assert!(want[&12]["error"]["message"].as_str().unwrap().contains("not JSON"));
    assert!(want[&23]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already names line 4"));
    assert!(want[&34]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/embeddings"));

    // Interrupted once a sixth is done, then run again.
    let resumed = dir.path().join("resumed.jsonl");
    let mut child = batch_cmd(&cluster, &inp, &resumed).spawn().unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(&resumed).map_or(0, |t| t.lines().count()) < n / 6 {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        assert!(child.try_wait().unwrap().is_none(), "finished before the interruption");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("run the same command again"), "{}", stderr(&o));
    let part = results(&resumed);
    assert!(
        (part.len() as u64) < total,
        "{} of {total} lines before the resume",
        part.len()
    );

    let o = batch_cmd(&cluster, &inp, &resumed).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("resuming: {} of {total} lines", part.len())),
        "{}",
        stderr(&o)
    );
    let got = results(&resumed);
    assert_eq!(got.len() as u64, total);
    for (n, v) in &got {
        assert_eq!(answer(v), answer(&want[n]), "line {n}");
        if let Some(before) = part.get(n) {
            assert_eq!(v, before, "line {n} was run again");
        }
    }

    // Run again once finished: nothing left to do.
    let o = batch_cmd(&cluster, &inp, &resumed).output().unwrap();
    assert!(o.status.success() && stderr(&o).contains("0 run now"), "{}", stderr(&o));
    assert_eq!(results(&resumed), got);
}

#[test]
fn inputs_and_outputs_that_are_not_batch_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = |input: &str, output: Option<&str>| {
        let inp = dir.path().join("in");
        std::fs::write(&inp, input).unwrap();
        let out = dir.path().join("out");
        let _ = std::fs::remove_file(&out);
        if let Some(o) = output {
            std::fs::write(&out, o).unwrap();
        }
        // No router: these fail before any request.
        let o = Command::new(sirocco_bin())
            .args(["batch", "--url", "http://127.0.0.1:9", "--input"])
            .arg(&inp)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(!o.status.success());
        stderr(&o)
    };
    let e = run("[{\"custom_id\": \"a\"},\n{\"custom_id\": \"b\"}]\n", None);
    assert!(e.contains("is not JSONL") && e.contains("line 1: not JSON"), "{e}");
    let line = json!({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}).to_string();
    let e = run(&format!("{line}\n"), Some("{\"line\": 1, \"custom_id\": \"zzz\"}\n"));
    assert!(
        e.contains("holds results of another input") && e.contains("line 1"),
        "{e}"
    );
    let e = run(&format!("{line}\n"), Some("some log\n"));
    assert!(e.contains("line 1 is not a batch result"), "{e}");
}

/// A batch over the router's own Batch API: `lines` completions of `max_tokens`
/// each, uploaded and created; the batch's id.
async fn create_api_batch(addr: &str, prompts: &[Vec<u32>], max_tokens: u32) -> String {
    let input: String = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({"custom_id": format!("p{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
                            "return_token_ids": true}})
            .to_string()
                + "\n"
        })
        .collect();
    let (status, file) = support::http::upload_batch_file(addr, &input).await;
    assert_eq!(status, 200, "{file}");
    let file: Value = serde_json::from_str(&file).unwrap();
    let body = json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h"});
    let (status, batch) = support::http::post_json(addr, "/v1/batches", &[], &body).await;
    assert_eq!(status, 200, "{batch}");
    serde_json::from_str::<Value>(&batch).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn api_batch(addr: &str, id: &str) -> Value {
    let (status, b) = support::http::get(addr, &format!("/v1/batches/{id}")).await;
    assert_eq!(status, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

async fn wait_api_batch(addr: &str, id: &str, until: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let b = api_batch(addr, id).await;
        if until(&b) {
            return b;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "batch stuck: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn done(b: &Value) -> u64 {
    b["request_counts"]["completed"].as_u64().unwrap() + b["request_counts"]["failed"].as_u64().unwrap()
}

#[test]
fn an_api_batch_resumes_after_the_router_is_killed_and_a_cancel_keeps_what_finished() {
    let model = ref_model("odd");
    let data = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(ClusterSpec {
        router_args: vec!["--data-dir".into(), data.path().display().to_string()],
        ..ClusterSpec::one(&model)
    });
    let prompts = support::requests::prompts(400, 1000);
    let rt = rt();
    let addr = cluster.http_addr.clone();
    let id = rt.block_on(async {
        let id = create_api_batch(&addr, &prompts, 24).await;
        let b = wait_api_batch(&addr, &id, |b| done(b) >= 40).await;
        assert!(done(&b) < 300, "the batch is well under way, not done: {b}");
        id
    });
    // Killed mid-batch: the new router finds the batch in the data directory and
    // runs only the lines without a result.
    cluster.stop_router();
    cluster.start_router();
    let _logs = LogsOnPanic(&cluster);
    rt.block_on(async {
        let b = wait_api_batch(&addr, &id, |b| b["status"] == "completed").await;
        assert_eq!(
            b["request_counts"],
            json!({"total": 400, "completed": 400, "failed": 0}),
            "{b}"
        );
        let out = b["output_file_id"].as_str().unwrap();
        let (status, text) = support::http::get(&addr, &format!("/v1/files/{out}/content")).await;
        assert_eq!(status, 200);
        let mut seen = BTreeMap::new();
        for l in text.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            let i: usize = v["custom_id"].as_str().unwrap()[1..].parse().unwrap();
            assert!(
                seen.insert(i, ids(&v["response"]["body"]["choices"][0]["token_ids"]))
                    .is_none(),
                "line {i} twice"
            );
        }
        assert_eq!(seen.len(), 400, "every line once");
        for i in [0, 7, 399] {
            assert_eq!(
                seen[&i],
                support::requests::generate_alone(&model, &prompts[i], 24),
                "line {i}"
            );
        }
        assert!(b["error_file_id"].is_null(), "{b}");

        // Cancelled: the lines in flight stop (their KV freed); those done stay.
        let long: Vec<Vec<u32>> = prompts[..64].to_vec();
        let id = create_api_batch(&addr, &long, 1500).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, b) = support::http::post_json(&addr, &format!("/v1/batches/{id}/cancel"), &[], &json!({})).await;
        assert_eq!(status, 200, "{b}");
        let b = wait_api_batch(&addr, &id, |b| b["status"] == "cancelled").await;
        assert!(done(&b) < 64, "{b}");
        assert!(b["output_file_id"].is_string(), "{b}");
        cluster.wait_kv_free().await;
        let (status, again) =
            support::http::post_json(&addr, &format!("/v1/batches/{id}/cancel"), &[], &json!({})).await;
        assert_eq!(status, 409, "{again}");
        let (status, missing) = support::http::get(&addr, "/v1/batches/batch_nope").await;
        assert_eq!(status, 404, "{missing}");

        // An input that is not JSONL fails the batch, saying why; a batch of an
        // unknown file, or for another endpoint, is refused naming the field.
        let (_, file) = support::http::upload_batch_file(&addr, "[\n1,\n2\n]\n").await;
        let file: Value = serde_json::from_str(&file).unwrap();
        let body = json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h"});
        let (_, b) = support::http::post_json(&addr, "/v1/batches", &[], &body).await;
        let id = serde_json::from_str::<Value>(&b).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let b = wait_api_batch(&addr, &id, |b| b["status"] == "failed").await;
        let why = b["errors"]["data"][0]["message"].as_str().unwrap();
        assert!(why.contains("is not JSONL") && why.contains("line 1"), "{b}");
        for (bad, field) in [
            (
                json!({"input_file_id": "file-nope", "endpoint": "/v1/completions"}),
                "input_file_id",
            ),
            (
                json!({"input_file_id": file["id"], "endpoint": "/v1/embeddings"}),
                "endpoint",
            ),
            (
                json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "1h"}),
                "completion_window",
            ),
        ] {
            let (status, e) = support::http::post_json(&addr, "/v1/batches", &[], &bad).await;
            assert!(status == 400 || status == 404, "{e}");
            assert_eq!(
                serde_json::from_str::<Value>(&e).unwrap()["error"]["param"],
                field,
                "{e}"
            );
        }
    });
}
