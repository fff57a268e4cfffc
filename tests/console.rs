//! The web console and the API it reads, against real processes: `/v1/cluster`,
//! `/v1/traffic` and `/v1/replicas/{id}/drain` as an API (with etcd and without),
//! and the console itself in headless Chromium, driven by Playwright
//! (`tests/browser/console.mjs`), which writes a screenshot of each page.

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterSpec, LogsOnPanic};
use support::etcd::EtcdServer;
use support::http::{get, post_json, request};
use support::requests::*;
use support::*;

const KEY: &str = "console-test-key";

fn auth() -> (&'static str, String) {
    ("Authorization", format!("Bearer {KEY}"))
}

async fn cluster_view(addr: &str) -> Value {
    let (k, v) = auth();
    let (status, body) = request(addr, "GET", "/v1/cluster", &[(k, &v)], "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `/v1/cluster` until `done` holds (or panics after `limit`).
fn wait_view(cluster: &Cluster, limit: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let rt = rt();
    let deadline = Instant::now() + limit;
    loop {
        let v = rt.block_on(cluster_view(&cluster.http_addr));
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {limit:?}; last view: {v:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ready(v: &Value) -> Vec<&Value> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "ready")
        .collect()
}

/// A cluster of `odd`, behind the API key when `key` (gRPC streams of the tests'
/// helpers carry none).
fn spec<'a>(
    model: &'a std::path::Path,
    etcd: Option<&EtcdServer>,
    replicas: usize,
    tp: usize,
    key: bool,
) -> ClusterSpec<'a> {
    let mut router_args: Vec<String> = vec!["--failover-timeout".into(), "30".into()];
    if key {
        router_args.extend(["--api-key".into(), KEY.into()]);
    }
    ClusterSpec {
        model: Some(model),
        replicas,
        tp,
        etcd: etcd.map(|e| e.client_url.clone()),
        router_args,
        ..Default::default()
    }
}

#[test]
fn cluster_api_shows_replicas_ranks_etcd_and_traffic() {
    let mut etcd = EtcdServer::start();
    let model = ref_model("odd");
    let cluster = Cluster::start(spec(&model, Some(&etcd), 2, 2, true));
    let _logs = LogsOnPanic(&cluster);
    cluster.wait_joined(2);
    let addr = cluster.http_addr.clone();
    let rt = rt();

    // The key is needed, and no other origin is served.
    let (status, body) = rt.block_on(get(&addr, "/v1/cluster"));
    assert_eq!(status, 401, "{body}");
    let (k, key) = auth();
    let (status, body) = rt.block_on(request(
        &addr,
        "GET",
        "/v1/cluster",
        &[(k, &key), ("Origin", "http://evil.example")],
        "",
    ));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("cross-origin"), "{body}");
    let (status, body) = rt.block_on(post_json(&addr, "/v1/replicas/0/drain", &[], &json!({})));
    assert_eq!(status, 401, "draining needs the key: {body}");

    let v = wait_view(&cluster, Duration::from_secs(30), "both replicas ready", |v| {
        ready(v).len() == 2
    });
    assert_eq!(v["discovery"], "etcd");
    assert_eq!(v["etcd"]["reachable"], true, "{v:#}");
    assert_eq!(v["model"]["tp"], 2);
    let mut names: Vec<&str> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["r0", "r1"]);
    for r in v["replicas"].as_array().unwrap() {
        let index: usize = r["name"].as_str().unwrap()[1..].parse().unwrap();
        let addrs: Vec<&str> = r["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["addr"].as_str().unwrap())
            .collect();
        assert_eq!(addrs, cluster.shard_addrs[index], "{r:#}");
        assert_eq!(r["fingerprint"], v["model"]["fingerprint"]);
        assert!(r["kv_capacity_tokens"].as_u64().unwrap() > 0, "{r:#}");
        // The canary steps have run.
        assert!(r["steps"].as_u64().unwrap() > 0, "{r:#}");
        assert!(
            r["last_step_ms_ago"].is_u64() && r["last_step_duration_ms"].is_f64(),
            "{r:#}"
        );
        assert!(r["ranks"].as_array().unwrap().iter().all(|k| k["state"] == "ready"));
    }

    // Traffic: what a few requests did shows in the next sample.
    rt.block_on(async {
        for i in 0..3 {
            let body = json!({"prompt": [1, 5, 9 + i], "max_tokens": 8, "temperature": 0});
            let (status, text) = post_json(&addr, "/v1/completions", &[(k, &key)], &body).await;
            assert_eq!(status, 200, "{text}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let sample = loop {
        let (status, body) = rt.block_on(request(&addr, "GET", "/v1/traffic", &[(k, &key)], ""));
        assert_eq!(status, 200, "{body}");
        let t: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((t["interval_s"].as_u64(), t["window_s"].as_u64()), (Some(5), Some(900)));
        let busy = t["samples"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["output_tokens_per_s"].as_f64().unwrap() > 0.0)
            .cloned();
        if let Some(s) = busy {
            break s;
        }
        assert!(Instant::now() < deadline, "no sample shows the requests: {t:#}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(sample["requests_per_s"].as_f64().unwrap() > 0.0, "{sample:#}");
    assert!(sample["ttft_ms"]["p50"].as_f64().unwrap() > 0.0, "{sample:#}");
    assert!(sample["itl_ms"]["p99"].as_f64().is_some(), "{sample:#}");
    assert!(sample["prefix_cache_hit_rate"].is_f64(), "{sample:#}");

    // etcd's reachability is shown as it changes.
    etcd.stop();
    let v = wait_view(&cluster, Duration::from_secs(20), "etcd shown unreachable", |v| {
        v["etcd"]["reachable"] == false
    });
    assert!(v["etcd"]["error"].is_string(), "{v:#}");
    // The replicas keep serving meanwhile.
    assert_eq!(ready(&v).len(), 2, "{v:#}");
    etcd.resume();
    wait_view(&cluster, Duration::from_secs(30), "etcd shown reachable again", |v| {
        v["etcd"]["reachable"] == true
    });
}

#[test]
fn drain_over_http_finishes_running_streams_then_the_replica_leaves() {
    for with_etcd in [true, false] {
        let etcd = with_etcd.then(EtcdServer::start);
        let model = ref_model("odd");
        let mut cluster = Cluster::start(spec(&model, etcd.as_ref(), 2, 1, false));
        cluster.wait_joined(2);
        let v = wait_view(&cluster, Duration::from_secs(30), "both replicas ready", |v| {
            ready(v).len() == 2
        });
        assert_eq!(v["discovery"], if with_etcd { "etcd" } else { "static" });
        // The replica whose shards are `cluster.shards[1]`.
        let target = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["ranks"][0]["addr"] == cluster.shard_addrs[1][0].as_str())
            .unwrap()["id"]
            .as_u64()
            .unwrap();
        let addr = cluster.http_addr.clone();
        let (k, key) = auth();
        let runtime = rt();
        for (path, want) in [("/v1/replicas/x/drain", 404), ("/v1/replicas/99/drain", 404)] {
            let (status, body) = runtime.block_on(post_json(&addr, path, &[(k, &key)], &json!({})));
            assert_eq!(status, want, "{path}: {body}");
            assert!(serde_json::from_str::<Value>(&body).unwrap()["error"]["message"].is_string());
        }

        let prompts = prompts(6, 1000);
        let expected: Vec<Vec<u32>> = prompts.iter().map(|p| generate_alone(&model, p, 60)).collect();
        let reqs = prompts.iter().map(|p| ids_request(p, 60)).collect();
        let out = cluster.run_streams(reqs, 6, |c| {
            let rt = rt();
            let path = format!("/v1/replicas/{target}/drain");
            let (status, body) = rt.block_on(post_json(&c.http_addr, &path, &[(k, &key)], &json!({})));
            assert_eq!(status, 202, "{body}");
            assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["state"], "draining");
            // Asking again is refused: it is draining (or already gone).
            let (status, body) = rt.block_on(post_json(&c.http_addr, &path, &[(k, &key)], &json!({})));
            assert!(status == 409 || status == 404, "{status} {body}");
        });
        for (i, (ids, _)) in out.into_iter().enumerate() {
            assert_eq!(ids, expected[i], "etcd {with_etcd}: stream {i} changed by the drain");
        }
        let log = cluster.router_log();
        assert!(log.contains("replica draining"), "{log}");
        assert!(!log.contains("re-queued"), "a drain must not need failover:\n{log}");
        // Its shards were told to leave once done, and the replica is no longer listed.
        cluster.wait_shard_exit(1, 0, Duration::from_secs(30));
        let v = wait_view(&cluster, Duration::from_secs(30), "the drained replica gone", |v| {
            v["replicas"].as_array().unwrap().len() == 1
        });
        assert_eq!(v["replicas"][0]["ranks"][0]["addr"], cluster.shard_addrs[0][0].as_str());
        // The other replica serves on.
        let out = cluster.run_streams(vec![ids_request(&prompts[0], 20)], 0, |_| {});
        assert_eq!(out[0].0, expected[0][..20]);
    }
}

/// Where the browser test writes its screenshots (a CI artefact path: see the README).
fn screenshot_dir() -> PathBuf {
    std::env::var_os("SIROCCO_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots"))
}

#[test]
fn console_in_headless_chromium() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/browser-env.sh (Debian's chromium), or set CHROMIUM"
    );
    assert!(
        repo.join("tests/browser/node_modules/playwright-core").exists(),
        "Playwright is missing: run scripts/browser-env.sh (npm ci in tests/browser)"
    );
    let etcd = EtcdServer::start();
    let model = ref_model("odd");
    let mut cluster = Cluster::start(spec(&model, Some(&etcd), 2, 2, true));
    cluster.wait_joined(2);
    wait_view(&cluster, Duration::from_secs(30), "both replicas ready", |v| {
        ready(v).len() == 2
    });
    let shots = screenshot_dir();
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();

    let mut driver = Command::new("node")
        .arg("tests/browser/console.mjs")
        .current_dir(&repo)
        .env("CONSOLE_URL", format!("http://{}/", cluster.http_addr))
        .env("CONSOLE_API_KEY", KEY)
        .env("SCREENSHOT_DIR", &shots)
        .env("EXPECT_REPLICAS", "2")
        .env("EXPECT_EMPTY", "1")
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot run node (Node.js 18 or newer)");
    let mut to_driver = driver.stdin.take().unwrap();
    let from_driver = BufReader::new(driver.stdout.take().unwrap());
    // The driver bounds its own waits; this bounds the whole run.
    let pid = driver.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(420)).is_err() {
            eprintln!("the browser test ran past 7 minutes; stopping it");
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    });
    let mut transcript = Vec::new();
    for line in from_driver.lines() {
        let line = line.unwrap();
        eprintln!("browser: {line}");
        transcript.push(line.clone());
        let Some(action) = line.strip_prefix("ACTION ") else {
            continue;
        };
        match action.trim() {
            "kill-shard" => {
                // A rank of the replica with the highest id, as the driver expects.
                let v = rt().block_on(cluster_view(&cluster.http_addr));
                let last = v["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["id"].is_u64())
                    .max_by_key(|r| r["id"].as_u64())
                    .unwrap();
                let index: usize = last["name"].as_str().unwrap()[1..].parse().unwrap();
                cluster.kill_shard(index, 1);
                // Its other rank too (it would wait for a step to notice): the
                // replica's keys then expire, and the drain at the end empties the
                // cluster.
                cluster.kill_shard(index, 0);
            }
            "stop-router" => cluster.stop_router(),
            "start-router" => cluster.start_router(),
            other => panic!("the driver asked for an unknown action {other:?}"),
        }
        writeln!(to_driver, "done").unwrap();
        to_driver.flush().unwrap();
    }
    let status = driver.wait().unwrap();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    assert!(
        status.success(),
        "the browser test failed ({status}):\n{}\n{}",
        transcript.join("\n"),
        cluster.logs()
    );
    for page in ["cluster.png", "playground.png", "traffic.png", "cluster-empty.png"] {
        let len = std::fs::metadata(shots.join(page)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 1000, "no screenshot {page} in {}", shots.display());
    }
}
