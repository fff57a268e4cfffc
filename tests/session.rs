//! The multiplexed `Session` RPC against real processes: many requests on one
//! stream answer exactly what each gives alone, tagged by the client's ids; a cancel
//! ends one request (and frees its KV) while the rest go on; an unknown cancel id
//! and a duplicate start id are refused for that id alone; a session whose client
//! reads slowly does not slow another client.

mod support;

use sirocco_proto::v1 as pb;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterSpec, LogsOnPanic};
use support::requests::*;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn start(id: &str, req: pb::GenerateRequest) -> pb::SessionRequest {
    pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Start(pb::SessionStart {
            id: id.into(),
            request: Some(req),
        })),
    }
}

fn cancel(id: &str) -> pb::SessionRequest {
    pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Cancel(pb::SessionCancel { id: id.into() })),
    }
}

/// What one id received: its tokens, and how it ended (a finish or an error code).
#[derive(Default, Debug)]
struct Seen {
    tokens: Vec<u32>,
    finished: Option<pb::Finished>,
    errors: Vec<i32>,
}

#[test]
fn one_session_carries_many_requests_cancels_by_id_and_refuses_bad_ids() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec::one(&model));
    let _logs = LogsOnPanic(&cluster);
    let prompts = prompts(24, 1000);
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| generate_alone(&model, p, 24)).collect();
    let addr = format!("http://{}", cluster.router_addr);
    rt().block_on(async {
        let (tx, rx) = mpsc::channel(64);
        let mut client = connect(&addr).await.unwrap();
        let mut events = client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
        for (i, p) in prompts.iter().enumerate() {
            tx.send(start(&format!("r{i}"), ids_request(p, 24))).await.unwrap();
        }
        // A long one to cancel, an unknown id, a duplicate of a running id.
        tx.send(start("long", ids_request(&[1, 2, 3], 1500))).await.unwrap();
        tx.send(cancel("nobody")).await.unwrap();
        tx.send(start("long", ids_request(&[1], 4))).await.unwrap();
        let mut seen: HashMap<String, Seen> = HashMap::new();
        let mut cancelled = false;
        let mut tx = Some(tx);
        while let Some(batch) = events.message().await.unwrap() {
            for ev in batch.events {
                let s = seen.entry(ev.id.clone()).or_default();
                match ev.event.unwrap() {
                    pb::session_event::Event::Token(t) => s.tokens.push(t.id),
                    pb::session_event::Event::Finished(f) => s.finished = Some(f),
                    pb::session_event::Event::Error(e) => s.errors.push(e.code),
                }
            }
            if !cancelled && seen.get("long").is_some_and(|s| s.tokens.len() >= 5) {
                tx.as_ref().unwrap().send(cancel("long")).await.unwrap();
                cancelled = true;
            }
            // Half-close once every short request has ended: the stream then ends
            // when the rest do.
            if cancelled && (0..prompts.len()).all(|i| seen.get(&format!("r{i}")).is_some_and(|s| s.finished.is_some()))
            {
                tx = None;
            }
        }
        assert!(tx.is_none(), "the session ended before its requests");
        for (i, w) in want.iter().enumerate() {
            let s = &seen[&format!("r{i}")];
            assert_eq!(&s.tokens, w, "r{i}");
            assert_eq!(s.finished.as_ref().unwrap().generated_tokens, 24);
        }
        let long = &seen["long"];
        let f = long
            .finished
            .as_ref()
            .expect("the cancelled request ends with a finish");
        assert_eq!(f.reason, pb::FinishReason::Cancelled as i32);
        assert!(
            long.tokens.len() < 1500 && f.generated_tokens as usize == long.tokens.len(),
            "{long:?}"
        );
        assert_eq!(
            long.errors,
            [tonic::Code::AlreadyExists as i32],
            "the duplicate start is refused"
        );
        assert_eq!(seen["nobody"].errors, [tonic::Code::NotFound as i32]);

        // The cancelled request's KV is freed.
        cluster.wait_kv_free().await;
    });
}

#[test]
fn a_slow_session_reader_slows_only_its_own_session() {
    let model = ref_model("odd");
    let cluster = Cluster::start(ClusterSpec::one(&model));
    let _logs = LogsOnPanic(&cluster);
    let addr = format!("http://{}", cluster.router_addr);
    rt().block_on(async {
        let probe = || async {
            let t = Instant::now();
            let (ids, _) = stream_all(connect(&addr).await.unwrap(), ids_request(&[1, 5, 9], 64))
                .await
                .unwrap();
            assert_eq!(ids.len(), 64);
            t.elapsed()
        };
        let alone = probe().await;

        // 32 requests of 400 tokens on one session, left unread while the other
        // client's request runs.
        let (tx, rx) = mpsc::channel(64);
        let mut client = connect(&addr).await.unwrap();
        let mut events = client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
        for i in 0..32 {
            tx.send(start(&format!("s{i}"), ids_request(&[1, 7 + i], 400)))
                .await
                .unwrap();
        }
        let first = events.message().await.unwrap().unwrap();
        assert!(!first.events.is_empty());
        let beside = probe().await;
        // The other client was not held back by the unread session...
        assert!(
            beside < alone * 3 + Duration::from_secs(2),
            "{beside:?} beside a slow session, {alone:?} alone"
        );
        // ...whose events are all still there for it, in order.
        let mut tokens: HashMap<String, usize> = HashMap::new();
        let mut finished = 0;
        for ev in first.events {
            if let Some(pb::session_event::Event::Token(_)) = ev.event {
                *tokens.entry(ev.id).or_default() += 1;
            }
        }
        drop(tx);
        while let Some(batch) = events.message().await.unwrap() {
            for ev in batch.events {
                match ev.event.unwrap() {
                    pb::session_event::Event::Token(_) => *tokens.entry(ev.id).or_default() += 1,
                    pb::session_event::Event::Finished(_) => finished += 1,
                    pb::session_event::Event::Error(e) => panic!("{e:?}"),
                }
            }
        }
        assert_eq!(finished, 32);
        assert!(tokens.values().all(|&n| n == 400), "{tokens:?}");
    });
}
