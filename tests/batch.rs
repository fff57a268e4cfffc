//! `sirocco batch` against a running cluster (real router and shard processes): every
//! input line gets exactly one result or error line, bad lines are reported with
//! their numbers while the rest run, and a run interrupted with SIGINT and started
//! again finishes without redoing a line, with the answers an undisturbed run gives.

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
