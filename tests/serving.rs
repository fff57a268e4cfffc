//! End to end: router and shard processes on 127.0.0.1, continuous batching,
//! cancellation and a shard failure.

mod support;

use sirocco_proto::shard::v1 as spb;
use sirocco_proto::v1 as pb;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterSpec};
use support::requests::*;
use support::*;
use tonic::Code;

#[test]
fn concurrent_streams_match_generate_alone() {
    let model = ref_model("odd");
    const N: usize = 64;
    const NEW: usize = 12;
    let prompts = prompts(N, 1000);
    // Expected: each prompt alone through `sirocco generate` (distinct lengths only
    // differ by content, so compute all of them).
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| generate_alone(&model, p, NEW)).collect();

    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        router_args: vec![
            "--prefill-chunk".into(),
            "5".into(),
            "--prefill-budget".into(),
            "16".into(),
        ],
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let results = rt.block_on(async {
        let mut handles = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let client = cluster.client().await;
            let req = ids_request(p, NEW as u32);
            handles.push(tokio::spawn(async move {
                // Stagger arrivals so requests join while others decode.
                tokio::time::sleep(Duration::from_millis((i as u64 % 16) * 15)).await;
                stream_all(client, req).await
            }));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    });
    for (i, r) in results.into_iter().enumerate() {
        let (ids, fin) = r.unwrap_or_else(|e| panic!("request {i} failed: {e}\n{}", cluster.logs()));
        assert_eq!(ids, expected[i], "request {i} (prompt of {} tokens)", prompts[i].len());
        assert_eq!(fin.reason, pb::FinishReason::Length as i32);
        assert_eq!(fin.generated_tokens as usize, NEW);
        assert_eq!(fin.prompt_tokens as usize, prompts[i].len());
    }
}

async fn rank0_kv(cluster: &Cluster) -> spb::KvStats {
    let mut c = spb::shard_client::ShardClient::connect(format!("http://{}", cluster.shard_addrs[0][0]))
        .await
        .unwrap();
    c.health(spb::HealthRequest {}).await.unwrap().into_inner().kv.unwrap()
}

#[test]
fn cancelled_stream_frees_its_kv_and_others_continue() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        ..Default::default()
    });
    let long = prompts(3, 1000);
    let expected: Vec<Vec<u32>> = long.iter().map(|p| generate_alone(&model, p, 300)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut keep = Vec::new();
        for p in &long[1..] {
            let c = cluster.client().await;
            let req = ids_request(p, 300);
            keep.push(tokio::spawn(async move { stream_all(c, req).await }));
        }
        // The one to cancel: read a few tokens, then drop the stream.
        let mut c = cluster.client().await;
        let mut s = c
            .generate_stream(ids_request(&long[0], 300))
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while got.len() < 5 {
            if let Some(pb::generate_stream_response::Event::Token(t)) = s.message().await.unwrap().unwrap().event {
                got.push(t.id);
            }
        }
        assert_eq!(got, expected[0][..5]);
        let before = rank0_kv(&cluster).await;
        assert_eq!(before.sequences, 3, "three sequences hold KV while running");
        drop(s);
        // The cancelled sequence's KV is released within a few steps.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let kv = rank0_kv(&cluster).await;
            if kv.sequences <= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "cancelled sequence still holds KV: {kv:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (i, h) in keep.into_iter().enumerate() {
            let (ids, _) = h.await.unwrap().unwrap();
            assert_eq!(ids, expected[i + 1], "an uncancelled stream was disturbed");
        }
        // Finished sequences are released with the router's next (idle) step.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let kv = rank0_kv(&cluster).await;
            if (kv.sequences, kv.used_tokens, kv.allocated_tokens) == (0, 0, 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "KV still held after every stream ended: {kv:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn killed_shard_ends_streams_with_unavailable_and_router_stays_up() {
    let model = ref_model("odd");
    let mut cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        router_args: vec!["--failover-timeout".into(), "1".into()],
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let streams: Vec<_> = rt.block_on(async {
        let mut v = Vec::new();
        for p in prompts(4, 1000) {
            let mut c = cluster.client().await;
            let mut s = c.generate_stream(ids_request(&p, 1500)).await.unwrap().into_inner();
            // Each stream is running before the kill.
            loop {
                if let Some(pb::generate_stream_response::Event::Token(_)) = s.message().await.unwrap().unwrap().event {
                    break;
                }
            }
            v.push(s);
        }
        v
    });
    cluster.kill_shard(0, 1);
    let killed_at = Instant::now();
    rt.block_on(async {
        for mut s in streams {
            let err = loop {
                match tokio::time::timeout(Duration::from_secs(20), s.message()).await {
                    Ok(Ok(Some(_))) => continue,
                    Ok(Ok(None)) => panic!("stream ended without an error"),
                    Ok(Err(e)) => break e,
                    Err(_) => panic!("stream hung after the shard died"),
                }
            };
            assert_eq!(err.code(), Code::Unavailable, "{err:?}");
            assert!(err.message().contains("replica 0 failed"), "{}", err.message());
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "took {:?}",
            killed_at.elapsed()
        );
        // The router is still up and says clearly that nothing serves.
        let mut c = cluster.client().await;
        let info = c.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.replicas, 0);
        let err = c.generate(ids_request(&[1, 5], 4)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    });
}

#[test]
fn killed_replica_loses_no_request() {
    let model = ref_model("odd");
    const N: usize = 32;
    const NEW: usize = 60;
    let prompts = prompts(N, 1000);
    // Half greedy, half seeded sampling: both must continue exactly after failover.
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i % 2 == 0 {
                generate_alone(&model, p, NEW)
            } else {
                sample_alone(&model, p, NEW, i as u64)
            }
        })
        .collect();
    let mut cluster = Cluster::start(ClusterSpec {
        model: Some(&model),
        replicas: 2,
        router_args: vec!["--failover-timeout".into(), "30".into()],
        ..Default::default()
    });
    let reqs = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut req = ids_request(p, NEW as u32);
            if i % 2 == 1 {
                let params = req.parameters.as_mut().unwrap();
                params.temperature = Some(0.9);
                params.top_p = Some(0.95);
                params.seed = Some(i as u64);
            }
            req
        })
        .collect();
    // Kill a shard once a third of the streams are well under way.
    let out = cluster.run_streams(reqs, N / 3, |c| c.kill_shard(1, 0));
    for (i, (ids, fin)) in out.into_iter().enumerate() {
        assert_eq!(ids, expected[i], "request {i} differs from an undisturbed run");
        assert_eq!(fin.generated_tokens as usize, NEW);
    }
    assert!(
        cluster.router_log().contains("re-queued after replica failure"),
        "the kill hit no request"
    );
}
