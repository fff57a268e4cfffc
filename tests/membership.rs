//! Membership on a real etcd with real processes: failover that loses no request,
//! replicas added at run time, draining, and an etcd outage.

mod support;

use sirocco_proto::shard::v1 as spb;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterSpec};
use support::etcd::EtcdServer;
use support::requests::*;
use support::*;

/// Steps a shard has executed.
async fn shard_steps(addr: &str) -> u64 {
    let mut c = spb::shard_client::ShardClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.health(spb::HealthRequest {}).await.unwrap().into_inner().steps
}

fn spec<'a>(model: &'a std::path::Path, etcd: &EtcdServer, replicas: usize) -> ClusterSpec<'a> {
    ClusterSpec {
        model: Some(model),
        replicas,
        etcd: Some(etcd.client_url.clone()),
        router_args: vec!["--failover-timeout".into(), "30".into()],
        ..Default::default()
    }
}

#[test]
fn sigkill_of_a_shard_loses_no_request() {
    let etcd = EtcdServer::start();
    let model = ref_model("odd");
    const N: usize = 32;
    const NEW: usize = 60;
    let prompts = prompts(N, 1000);
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| generate_alone(&model, p, NEW)).collect();
    let mut cluster = Cluster::start(spec(&model, &etcd, 2));
    cluster.wait_joined(2);
    let reqs = prompts.iter().map(|p| ids_request(p, NEW as u32)).collect();
    let out = cluster.run_streams(reqs, N / 3, |c| c.kill_shard(0, 1));
    for (i, (ids, fin)) in out.into_iter().enumerate() {
        assert_eq!(ids, expected[i], "request {i} differs from an undisturbed run");
        assert_eq!(fin.generated_tokens as usize, NEW);
    }
    assert!(
        cluster.router_log().contains("re-queued after replica failure"),
        "the kill hit no request"
    );
}

#[test]
fn replica_added_at_run_time_gets_traffic() {
    let etcd = EtcdServer::start();
    let model = ref_model("odd");
    let s = spec(&model, &etcd, 1);
    let mut cluster = Cluster::start(s);
    cluster.wait_joined(1);
    let added = cluster.add_replica(&spec(&model, &etcd, 1));
    cluster.wait_joined(2);
    let prompts = prompts(12, 1000);
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| generate_alone(&model, p, 30)).collect();
    let reqs = prompts.iter().map(|p| ids_request(p, 30)).collect();
    let out = cluster.run_streams(reqs, 0, |_| {});
    for (i, (ids, _)) in out.into_iter().enumerate() {
        assert_eq!(ids, expected[i]);
    }
    let steps = rt().block_on(shard_steps(&cluster.shard_addrs[added][0]));
    assert!(steps > 0, "the replica added at run time served no step");
}

#[test]
fn draining_replica_finishes_its_streams_and_gets_no_new_ones() {
    let etcd = EtcdServer::start();
    let model = ref_model("odd");
    let mut cluster = Cluster::start(spec(&model, &etcd, 2));
    cluster.wait_joined(2);
    let prompts = prompts(8, 1000);
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| generate_alone(&model, p, 80)).collect();
    let reqs = prompts.iter().map(|p| ids_request(p, 80)).collect();
    let out = cluster.run_streams(reqs, 8, |c| c.terminate_shard(0, 0));
    for (i, (ids, _)) in out.into_iter().enumerate() {
        assert_eq!(ids, expected[i]);
    }
    let log = cluster.router_log();
    assert!(log.contains("replica draining"), "{log}");
    assert!(!log.contains("re-queued"), "draining must not need failover:\n{log}");
    // Its shards leave cleanly once their sequences are done.
    cluster.wait_shard_exit(0, 0, Duration::from_secs(30));
    // New requests go to the other replica and succeed.
    let before = rt().block_on(shard_steps(&cluster.shard_addrs[1][0]));
    let out = cluster.run_streams(vec![ids_request(&prompts[0], 20)], 0, |_| {});
    assert_eq!(out[0].0, expected[0][..20]);
    let after = rt().block_on(shard_steps(&cluster.shard_addrs[1][0]));
    assert!(after > before);
}

#[test]
fn etcd_outage_keeps_serving_and_changes_are_seen_after() {
    let mut etcd = EtcdServer::start();
    let model = ref_model("odd");
    let mut cluster = Cluster::start(spec(&model, &etcd, 1));
    cluster.wait_joined(1);
    let p = prompts(4, 1000);
    let expected: Vec<Vec<u32>> = p.iter().map(|x| generate_alone(&model, x, 20)).collect();
    etcd.stop();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let out = cluster.run_streams(p.iter().map(|x| ids_request(x, 20)).collect(), 0, |_| {});
        for (i, (ids, _)) in out.into_iter().enumerate() {
            assert_eq!(ids, expected[i], "served wrong tokens during the etcd outage");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    etcd.resume();
    // A replica that registers after etcd is back joins the rotation.
    let added = cluster.add_replica(&spec(&model, &etcd, 1));
    cluster.wait_joined(2);
    let out = cluster.run_streams(
        p.iter().cycle().take(8).map(|x| ids_request(x, 20)).collect(),
        0,
        |_| {},
    );
    for (i, (ids, _)) in out.into_iter().enumerate() {
        assert_eq!(ids, expected[i % 4]);
    }
    let steps = rt().block_on(shard_steps(&cluster.shard_addrs[added][0]));
    assert!(steps > 0, "the replica added after the outage served nothing");
}
