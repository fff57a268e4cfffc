//! Metrics and health against real traffic: the router's and shards' counters add up
//! to what clients received, the scraped text passes `promtool check metrics`, and
//! `/ready` tells the truth when a shard stalls.

mod support;

use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterSpec};
use support::requests::*;
use support::*;

use support::http::get as http_get;

use support::http::{samples, sum};

fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed (Debian package prometheus; scripts/test.sh installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_add_up_after_real_traffic() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        ..Default::default()
    });
    let prompts = prompts(12, 1000);
    let rt = rt();
    let (received, prompt_tokens) = rt.block_on(async {
        let mut handles = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let c = cluster.client().await;
            handles.push(tokio::spawn(stream_all(c, ids_request(p, 5 + i as u32))));
        }
        let mut received = 0;
        for h in handles {
            received += h.await.unwrap().unwrap().0.len();
        }
        // One refused request: counted by outcome, not as success.
        let mut c = cluster.client().await;
        assert!(c.generate(ids_request(&[1, 99999], 4)).await.is_err());
        (received, prompts.iter().map(Vec::len).sum::<usize>())
    });
    // Releases of finished sequences go out with the next (idle) step.
    let deadline = Instant::now() + Duration::from_secs(10);
    let shard_text = loop {
        let text = rt.block_on(http_get(&cluster.shard_metrics[0][0], "/metrics")).1;
        if sum(&samples(&text), "sirocco_shard_kv_tokens_used", &[]) == 0.0
            && sum(&samples(&text), "sirocco_shard_sequences", &[]) == 0.0
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "KV not freed after all requests ended:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (status, router_text) = rt.block_on(http_get(&cluster.http_addr, "/metrics"));
    assert_eq!(status, 200);
    let r = samples(&router_text);
    assert_eq!(sum(&r, "sirocco_generated_tokens_total", &[]) as usize, received);
    assert_eq!(sum(&r, "sirocco_request_generated_tokens_sum", &[]) as usize, received);
    assert_eq!(sum(&r, "sirocco_prompt_tokens_total", &[]) as usize, prompt_tokens);
    assert_eq!(
        sum(&r, "sirocco_requests_total", &["outcome=\"success\""]) as usize,
        prompts.len()
    );
    assert_eq!(
        sum(
            &r,
            "sirocco_requests_total",
            &["outcome=\"success\"", "finish_reason=\"length\""]
        ) as usize,
        prompts.len()
    );
    assert_eq!(
        sum(&r, "sirocco_requests_total", &["outcome=\"invalid_argument\""]) as usize,
        1
    );
    assert_eq!(
        sum(&r, "sirocco_time_to_first_token_seconds_count", &[]) as usize,
        prompts.len()
    );
    assert_eq!(
        sum(&r, "sirocco_inter_token_latency_seconds_count", &[]) as usize,
        received - prompts.len()
    );
    assert_eq!(sum(&r, "sirocco_running_sequences", &[]), 0.0);
    assert_eq!(sum(&r, "sirocco_queue_depth", &[]), 0.0);
    assert_eq!(sum(&r, "sirocco_ready_replicas", &[]), 1.0);
    assert_eq!(sum(&r, "sirocco_build_info", &[]), 1.0);
    assert!(sum(&r, "sirocco_step_tokens_sum", &[]) as usize >= prompt_tokens + received - prompts.len());
    promtool_check(&router_text);

    let s = samples(&shard_text);
    assert!(
        sum(
            &s,
            "sirocco_shard_step_duration_seconds_count",
            &["kind=\"decode\"", "rank=\"0\""]
        ) > 0.0
    );
    assert!(sum(&s, "sirocco_shard_allreduce_duration_seconds_count", &[]) > 0.0);
    assert!(sum(&s, "sirocco_shard_kv_tokens_capacity", &[]) > 0.0);
    assert!(sum(&s, "sirocco_shard_model_load_seconds", &[]) > 0.0);
    promtool_check(&shard_text);
    let rank1 = rt.block_on(http_get(&cluster.shard_metrics[0][1], "/metrics")).1;
    assert!(rank1.contains("rank=\"1\""));
    promtool_check(&rank1);

    let (status, body) = rt.block_on(http_get(&cluster.http_addr, "/health"));
    assert_eq!((status, body.trim()), (200, "ok"));
}

fn signal(pid: u32, sig: &str) {
    std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
}

#[test]
fn stalled_collective_turns_ready_false_and_is_routed_around() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        replicas: 2,
        router_args: [
            "--canary-interval",
            "0.3",
            "--canary-timeout",
            "2",
            "--ready-window",
            "3",
            "--step-timeout",
            "5",
        ]
        .map(String::from)
        .to_vec(),
        shard_args: ["--collective-timeout", "4"].map(String::from).to_vec(),
        ..Default::default()
    });
    let rt = rt();
    let expected = generate_alone(&model, &[1, 5, 9], 8);
    let wait_ready = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = rt.block_on(http_get(&cluster.http_addr, "/ready"));
            if status == want {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/ready stayed {status} ({body}):\n{}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_ready(200);
    // Stop one rank of replica 0: its canary stalls in the collective, and the router
    // takes the replica out; requests go to replica 1.
    let stopped0 = cluster.shards[0][1].child.id();
    signal(stopped0, "-STOP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.router_log().contains("replica failed") {
        assert!(Instant::now() < deadline, "stall not detected:\n{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ready(200);
    for _ in 0..3 {
        let out = rt.block_on(async {
            let c = cluster.client().await;
            stream_all(c, ids_request(&[1, 5, 9], 8)).await
        });
        assert_eq!(out.unwrap().0, expected);
    }
    // Stop replica 1 too: nothing can serve, and /ready says so.
    let stopped1 = cluster.shards[1][1].child.id();
    signal(stopped1, "-STOP");
    let body = wait_ready(503);
    assert!(body.contains("not ready"), "{body}");
    let (status, _) = rt.block_on(http_get(&cluster.http_addr, "/health"));
    assert_eq!(status, 200, "the router process itself still answers");
    signal(stopped0, "-CONT");
    signal(stopped1, "-CONT");
}
