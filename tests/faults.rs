//! Faults that once corrupted, stalled or leaked, each reproduced with real processes
//! (and a real etcd where membership matters) and checked token by token against
//! undisturbed greedy runs: a replica that rejoins after pauses, a hung shard, a
//! cluster restarted on the keys of a dead run, and serve's supervision of its
//! shards (stops, restarts, a crashed router's sequences).

mod support;

use sirocco_proto::shard::v1 as spb;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterSpec};
use support::etcd::EtcdServer;
use support::procs::{alive, signal, state, wait_until, Serve};
use support::requests::*;
use support::*;

const NEW: usize = 120;

/// Sequences a shard holds KV for.
fn held_sequences(addr: &str) -> Option<u64> {
    rt().block_on(async {
        let mut c = spb::shard_client::ShardClient::connect(format!("http://{addr}"))
            .await
            .ok()?;
        let h = c.health(spb::HealthRequest {}).await.ok()?.into_inner();
        Some(h.kv?.sequences)
    })
}

fn requeued(log: &str) -> usize {
    log.matches("re-queued after replica failure").count()
}

fn expected_for(model: &std::path::Path, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    prompts.iter().map(|p| generate_alone(model, p, NEW)).collect()
}

fn check(out: Vec<(Vec<u32>, sirocco_proto::v1::Finished)>, expected: &[Vec<u32>], what: &str) {
    for (i, (ids, fin)) in out.into_iter().enumerate() {
        assert_eq!(ids, expected[i], "{what}: request {i} differs from an undisturbed run");
        assert_eq!(fin.generated_tokens as usize, NEW, "{what}: request {i}");
    }
}

fn etcd_spec<'a>(model: &'a std::path::Path, etcd: &EtcdServer, router_args: &[&str]) -> ClusterSpec<'a> {
    ClusterSpec {
        model: Some(model),
        replicas: 2,
        etcd: Some(etcd.client_url.clone()),
        shard_args: vec!["--lease-ttl".into(), "1".into()],
        router_args: ["--failover-timeout", "30"]
            .iter()
            .chain(router_args)
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    }
}

/// Item 1: a shard paused past its lease leaves the rotation; when it comes back its
/// replica rejoins. Before, the router numbered sequences from 1 again while the
/// shards still held the old ones, and new requests got wrong tokens.
#[test]
fn replica_rejoining_after_pauses_starts_clean_and_serves_exact_tokens() {
    let etcd = EtcdServer::start();
    let model = ref_model("odd");
    let prompts = prompts(24, 1000);
    let expected = expected_for(&model, &prompts);
    let mut cluster = Cluster::start(etcd_spec(&model, &etcd, &[]));
    cluster.wait_joined(2);
    for cycle in 0..4 {
        let (joined, hit) = (cluster.joins(), requeued(&cluster.router_log()));
        let reqs = prompts.iter().map(|p| ids_request(p, NEW as u32)).collect();
        let out = cluster.run_streams(reqs, 6, |c| {
            let pid = c.shards[0][1].child.id();
            signal(pid, "STOP");
            std::thread::sleep(Duration::from_millis(3500));
            signal(pid, "CONT");
        });
        check(out, &expected, &format!("cycle {cycle}"));
        assert!(
            requeued(&cluster.router_log()) > hit,
            "cycle {cycle}: the pause hit no request"
        );
        wait_until(
            Duration::from_secs(30),
            "the paused replica rejoined",
            || cluster.logs(),
            || cluster.joins() > joined,
        );
        // Idle again, no shard may hold a sequence (stale ones were dropped).
        let addrs: Vec<String> = cluster.shard_addrs.iter().flatten().cloned().collect();
        wait_until(
            Duration::from_secs(10),
            "every shard idle with no sequence",
            || cluster.logs(),
            || addrs.iter().all(|a| held_sequences(a) == Some(0)),
        );
    }
    // And the rejoined replica serves exactly.
    let reqs = prompts.iter().map(|p| ids_request(p, NEW as u32)).collect();
    let out = cluster.run_streams(reqs, 0, |_| {});
    check(out, &expected, "after the pauses");
}

/// Item 2 with etcd: a hung shard's replica fails over as soon as its lease expires,
/// not after the step timeout.
#[test]
fn hung_shard_fails_over_when_its_lease_expires() {
    let etcd = EtcdServer::start();
    let model = ref_model("odd");
    let prompts = prompts(16, 1000);
    let expected = expected_for(&model, &prompts);
    // The pace-derived deadline is kept out of it: membership alone must do it.
    let spec = etcd_spec(
        &model,
        &etcd,
        &["--step-timeout", "120", "--step-deadline-floor", "120"],
    );
    let mut cluster = Cluster::start(spec);
    cluster.wait_joined(2);
    hung_shard_streams_continue(&mut cluster, &prompts, &expected);
}

/// Item 2 without etcd: nothing tells the router that the shard hangs; the deadline
/// derived from the replica's own step times does.
#[test]
fn hung_shard_fails_over_at_the_pace_derived_deadline() {
    let model = ref_model("odd");
    let prompts = prompts(16, 1000);
    let expected = expected_for(&model, &prompts);
    let spec = ClusterSpec {
        model: Some(&model),
        replicas: 2,
        router_args: [
            "--failover-timeout",
            "30",
            "--step-timeout",
            "120",
            "--step-deadline-floor",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let mut cluster = Cluster::start(spec);
    hung_shard_streams_continue(&mut cluster, &prompts, &expected);
}

fn hung_shard_streams_continue(cluster: &mut Cluster, prompts: &[Vec<u32>], expected: &[Vec<u32>]) {
    let hit = requeued(&cluster.router_log());
    let reqs = prompts.iter().map(|p| ids_request(p, NEW as u32)).collect();
    let mut paused = None;
    let out = cluster.run_streams(reqs, 4, |c| {
        // The replica with the most sequences running: the hang must hit some.
        let busiest = (0..c.shards.len())
            .max_by_key(|&r| held_sequences(&c.shard_addrs[r][0]).unwrap_or(0))
            .unwrap();
        let pid = c.shards[busiest][1].child.id();
        signal(pid, "STOP");
        paused = Some((pid, Instant::now()));
    });
    let (pid, paused_at) = paused.unwrap();
    let took = paused_at.elapsed();
    signal(pid, "CONT");
    check(out, expected, "hung shard");
    assert!(
        requeued(&cluster.router_log()) > hit,
        "the hang hit no request\n{}",
        cluster.logs()
    );
    assert!(
        took < Duration::from_secs(20),
        "streams stalled {took:?} behind a hung shard (the step timeout is 120 s)\n{}",
        cluster.router_log()
    );
}

/// Keys `serve`'s cluster `name` has in etcd.
fn cluster_keys(etcd: &EtcdServer, name: &str) -> usize {
    rt().block_on(async {
        let e = sirocco_membership::Etcd::new(std::slice::from_ref(&etcd.client_url)).unwrap();
        e.get_prefix(&format!("sirocco/{name}/")).await.unwrap().1.len()
    })
}

/// Item 3: a cluster started again on the keys of a run that died (a rendezvous
/// pointing at a peer port that accepts and never answers, shard records of that
/// run, none of them under a lease) becomes ready, and so does one started right
/// after every process of the previous run was killed.
#[test]
fn serve_restarted_on_a_dead_runs_keys_becomes_ready() {
    let etcd = EtcdServer::start();
    let model = ref_model("odd");
    // Accepts connections (the kernel does) and never says a word.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = black_hole.local_addr().unwrap().to_string();
    rt().block_on(async {
        let e = sirocco_membership::Etcd::new(std::slice::from_ref(&etcd.client_url)).unwrap();
        let r = sirocco_membership::Rendezvous::Tcp {
            addr: dead_addr.clone(),
            run_id: "dead-run".into(),
        };
        e.put("sirocco/again/rendezvous/r0", r.to_bytes(), 0).await.unwrap();
        for rank in 0..2 {
            let rec = sirocco_membership::ShardRecord {
                replica: "r0".into(),
                rank,
                world_size: 2,
                addr: dead_addr.clone(),
                fingerprint: "stale".into(),
                kv_capacity_tokens: 1 << 20,
                state: sirocco_membership::ShardState::Ready,
                run_id: "dead-run".into(),
            };
            let key = sirocco_membership::shard_key("again", "r0", rank);
            e.put(&key, serde_json::to_vec(&rec).unwrap(), 0).await.unwrap();
        }
    });
    let etcd_args = ["--etcd", &etcd.client_url, "--cluster", "again"];
    let mut serve = Serve::start(&model, 2, 1, &etcd_args);
    serve.wait_serving(Duration::from_secs(60));
    let p = &prompts(4, 1000)[3];
    let want = generate_alone(&model, p, NEW);
    let got = rt().block_on(async {
        let c = connect(&format!("http://{}", serve.listen)).await.unwrap();
        stream_all(c, ids_request(p, NEW as u32)).await.unwrap().0
    });
    assert_eq!(got, want);
    // Every process of this run dies at once: its keys outlive it (until their lease
    // expires), and the next run starts on them.
    let shards = serve.shards();
    signal(serve.pid(), "KILL");
    for pid in &shards {
        signal(*pid, "KILL");
    }
    serve.wait_exit(Duration::from_secs(5));
    assert!(
        cluster_keys(&etcd, "again") > 0,
        "the killed run left no key to trip over"
    );
    let serve = Serve::start(&model, 2, 1, &etcd_args);
    serve.wait_serving(Duration::from_secs(60));
}

/// Item 5: SIGTERM to serve at any point of its start leaves no shard running and no
/// key in etcd.
#[test]
fn serve_stopped_while_starting_leaves_no_process_and_no_key() {
    let etcd = EtcdServer::start();
    let model = ref_model("odd");
    for (i, delay_ms) in [150u64, 400, 900, 2000].into_iter().enumerate() {
        let name = format!("early{i}");
        let mut serve = Serve::start(&model, 2, 2, &["--etcd", &etcd.client_url, "--cluster", &name]);
        let deadline = Instant::now() + Duration::from_millis(delay_ms);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            for pid in serve.shards() {
                if !seen.contains(&pid) {
                    seen.push(pid);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(serve.pid(), "TERM");
        assert!(
            serve.wait_exit(Duration::from_secs(20)),
            "serve failed to stop:\n{}",
            serve.log()
        );
        for pid in &seen {
            wait_until(
                Duration::from_secs(5),
                &format!("shard {pid} gone after serve stopped ({delay_ms} ms in)"),
                || serve.log(),
                || !alive(*pid),
            );
        }
        wait_until(
            Duration::from_secs(10),
            &format!("no key of the stopped cluster in etcd ({delay_ms} ms in)"),
            || serve.log(),
            || cluster_keys(&etcd, &name) == 0,
        );
    }
    // And a serve killed outright takes its shards with it.
    let serve = Serve::start(&model, 2, 1, &["--etcd", &etcd.client_url, "--cluster", "killed"]);
    serve.wait_serving(Duration::from_secs(60));
    let shards = serve.shards();
    assert_eq!(shards.len(), 2);
    signal(serve.pid(), "KILL");
    for pid in shards {
        wait_until(
            Duration::from_secs(10),
            "shard gone after serve was killed",
            String::new,
            || !alive(pid),
        );
    }
}

/// Item 5: a shard killed under serve is reaped at once (no zombie), its replica is
/// restarted whole, and no stream loses or changes a token meanwhile.
#[test]
fn serve_restarts_a_killed_shard_and_loses_no_request() {
    let model = ref_model("odd");
    let serve = Serve::start(&model, 2, 2, &["--failover-timeout", "30"]);
    serve.wait_serving(Duration::from_secs(60));
    let prompts = prompts(16, 1000);
    let expected = expected_for(&model, &prompts);
    let before = serve.shards();
    assert_eq!(before.len(), 4, "{}", serve.log());
    let victim = before[1];
    let rt = rt();
    let addr = format!("http://{}", serve.listen);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let handles: Vec<_> = rt.block_on(async {
        let mut v = Vec::new();
        for p in &prompts {
            let mut c = connect(&addr).await.unwrap();
            let (req, tx) = (ids_request(p, NEW as u32), tx.clone());
            v.push(tokio::spawn(async move {
                let mut s = c.generate_stream(req).await?.into_inner();
                let mut ids = Vec::new();
                while let Some(ev) = s.message().await? {
                    match ev.event {
                        Some(sirocco_proto::v1::generate_stream_response::Event::Token(t)) => {
                            ids.push(t.id);
                            if ids.len() == 10 {
                                let _ = tx.send(());
                            }
                        }
                        Some(sirocco_proto::v1::generate_stream_response::Event::Finished(_)) => break,
                        None => {}
                    }
                }
                Ok::<_, tonic::Status>(ids)
            }));
        }
        for _ in 0..4 {
            rx.recv().await;
        }
        v
    });
    signal(victim, "KILL");
    let out: Vec<Vec<u32>> = rt.block_on(async {
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap().unwrap());
        }
        out
    });
    for (i, ids) in out.iter().enumerate() {
        assert_eq!(ids, &expected[i], "request {i} differs from an undisturbed run");
    }
    // Reaped at once: no zombie left behind.
    wait_until(
        Duration::from_secs(2),
        "the killed shard reaped",
        || serve.log(),
        || state(victim).is_none(),
    );
    // The replica is whole again: four shards, the victim's two replaced.
    wait_until(
        Duration::from_secs(30),
        "the killed shard's replica restarted",
        || serve.log(),
        || {
            let now = serve.shards();
            now.len() == 4 && !now.contains(&victim)
        },
    );
    let now = serve.shards();
    assert_eq!(
        now.iter().filter(|p| before.contains(p)).count(),
        2,
        "only the victim's replica restarts"
    );
    for pid in &now {
        assert_ne!(state(*pid), Some('Z'), "a zombie among serve's children");
    }
    // It takes traffic again: the router connects to it once it answers.
    wait_until(
        Duration::from_secs(30),
        "the restarted replica rejoined the rotation",
        || serve.log(),
        || serve.log().matches("replica joins the rotation").count() >= 3,
    );
    let out: Vec<Vec<u32>> = rt.block_on(async {
        let mut out = Vec::new();
        for p in &prompts[..4] {
            let c = connect(&addr).await.unwrap();
            out.push(stream_all(c, ids_request(p, NEW as u32)).await.unwrap().0);
        }
        out
    });
    assert_eq!(out, expected[..4].to_vec());
}

/// Item 5: when the router dies, its shards free its sequences (its session closed),
/// and a shard told to drain then leaves instead of waiting for them forever.
#[test]
fn crashed_router_sequences_are_freed_and_draining_finishes() {
    let etcd = EtcdServer::start();
    let model = ref_model("odd");
    let mut spec = etcd_spec(&model, &etcd, &[]);
    spec.replicas = 1;
    let mut cluster = Cluster::start(spec);
    cluster.wait_joined(1);
    let rt = rt();
    let addr = format!("http://{}", cluster.router_addr);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let prompts = prompts(8, 1000);
    rt.block_on(async {
        for p in &prompts {
            let mut c = connect(&addr).await.unwrap();
            let (req, tx) = (ids_request(p, 1500), tx.clone());
            tokio::spawn(async move {
                let mut s = c.generate_stream(req).await?.into_inner();
                let mut n = 0;
                while s.message().await?.is_some() {
                    n += 1;
                    if n == 10 {
                        let _ = tx.send(());
                    }
                }
                Ok::<_, tonic::Status>(())
            });
        }
        for _ in 0..prompts.len() {
            rx.recv().await;
        }
    });
    let rank0 = cluster.shard_addrs[0][0].clone();
    assert!(held_sequences(&rank0).unwrap() > 0, "no sequence was running");
    let router = cluster.router.as_mut().unwrap();
    router.child.kill().unwrap();
    router.child.wait().unwrap();
    for a in cluster.shard_addrs[0].clone() {
        wait_until(
            Duration::from_secs(10),
            "the dead router's sequences freed",
            || cluster.logs(),
            || held_sequences(&a) == Some(0),
        );
    }
    cluster.terminate_shard(0, 0);
    cluster.wait_shard_exit(0, 0, Duration::from_secs(15));
}
