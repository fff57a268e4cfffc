//! The prefix-cache workloads (`--workload shared-prefix` and `multi-turn`): their
//! flags' checks and the procedure, which runs the workload twice against the same
//! server, every request opting out of the prefix cache and then leaving it to the
//! server (on), and reports the two side by side. Each phase draws its prompts from a
//! stream of its own, so neither can warm the other's cache.
//!
//! In prefix/: script.rs draws what the requests send, conversation.rs drives the
//! multi-turn conversations (shared-prefix requests go through driver.rs),
//! report.rs sums up and compares the phases.

mod conversation;
mod report;
mod script;

use super::driver::{drive, Batch, Load};
use super::target::{Ask, Server, Target};
use super::{check_fits_router, warm_up, Api, BenchArgs, WorkloadKind};
use anyhow::{bail, Result};
use conversation::converse;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use report::{CacheReport, Phase};
use script::Shape;
use std::sync::Arc;
use std::time::Duration;

/// Shared-prefix clients in flight when neither --concurrency nor --request-rate is
/// given: all requests at once would all miss the cache together.
const DEFAULT_CLIENTS: usize = 16;

/// A phase: the prefix cache off or on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cache {
    Off,
    On,
}

impl Cache {
    fn name(self) -> &'static str {
        match self {
            Cache::Off => "off",
            Cache::On => "on",
        }
    }

    /// What its requests send as prefix_cache: an opt-out, or nothing (the server's
    /// default).
    fn prefix_cache(self) -> Option<bool> {
        match self {
            Cache::Off => Some(false),
            Cache::On => None,
        }
    }

    /// Its prompts' random stream: the run's seed, a stream per phase (the
    /// independent workload's is 0).
    fn rng(self, seed: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(match self {
            Cache::Off => 1,
            Cache::On => 2,
        });
        rng
    }
}

/// Refuses the flags that do not fit the workload asked for.
pub fn check_args(a: &BenchArgs) -> Result<()> {
    let name = a.workload.name();
    let multi_turn_only = [
        ("--conversations", a.conversations.is_some()),
        ("--turns", a.turns.is_some()),
    ];
    let cache_only = [
        ("--prefix-groups", a.prefix_groups.is_some()),
        ("--group-order", a.group_order.is_some()),
    ];
    if a.workload != WorkloadKind::MultiTurn {
        if let Some((flag, _)) = multi_turn_only.iter().find(|(_, given)| *given) {
            bail!("{flag} is for --workload multi-turn");
        }
    }
    if a.workload == WorkloadKind::Independent {
        if let Some((flag, _)) = cache_only.iter().find(|(_, given)| *given) {
            bail!("{flag} is for --workload shared-prefix or multi-turn");
        }
        return Ok(());
    }
    if a.api != Api::Grpc {
        bail!(
            "--workload {name} sends token ids over gRPC: drop --api {}",
            a.api.name()
        );
    }
    if a.prompt.is_some() || a.dataset.is_some() || a.corpus {
        bail!("--workload {name} draws random token ids: drop --prompt, --dataset and --corpus");
    }
    if a.workload == WorkloadKind::MultiTurn {
        if a.num_requests.is_some() {
            bail!("--workload multi-turn sends --conversations times --turns requests: drop --num-requests");
        }
        if a.request_rate.is_some() {
            bail!("--workload multi-turn runs --concurrency conversations at once: drop --request-rate");
        }
    }
    let shape = Shape::of(a);
    if shape.prefix_len == 0 && a.workload == WorkloadKind::SharedPrefix {
        bail!("--shared-prefix must be at least 1 with --workload shared-prefix");
    }
    for (flag, n) in [
        ("--prefix-groups", shape.groups),
        ("--conversations", shape.conversations),
        ("--turns", shape.turns),
    ] {
        if n == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    Ok(())
}

/// The load of the run: shared-prefix requests as --concurrency and --request-rate
/// say (DEFAULT_CLIENTS in flight without either), multi-turn conversations
/// --concurrency at once (all without it).
fn load(a: &BenchArgs, shape: &Shape) -> Load {
    match (a.workload, a.concurrency, a.request_rate) {
        (WorkloadKind::MultiTurn, c, _) => Load::Closed(c.unwrap_or(shape.conversations)),
        (_, None, None) => Load::Closed(DEFAULT_CLIENTS),
        _ => Load::of(a),
    }
}

/// The procedure: ask the router for its model and check the longest prompt fits it,
/// connect, then for the cache off and on: draw the phase's prompts, warm up, run,
/// sum up; report both.
pub async fn bench(a: BenchArgs, timeout: Option<Duration>) -> Result<()> {
    let shape = Shape::of(&a);
    let load = load(&a, &shape);
    let server = Server::new(&a)?;
    let seed = a.seed.unwrap_or_else(rand::random);
    let router = server.ask_model(Api::Grpc).await?;
    check_fits_router(&a, Some(shape.longest_prompt()), &router.info)?;
    let vocab = a.vocab_size.unwrap_or(router.info.vocab_size);
    let sliding_window = router.info.sliding_window;
    let in_flight = load.in_flight(shape.conversations).max(shape.warmup);
    let target = Arc::new(server.open(&a, Some(router), in_flight, None, timeout).await?);
    let mut phases = Vec::new();
    for cache in [Cache::Off, Cache::On] {
        phases.push(phase(&a, &shape, load, seed, vocab, &target, cache).await?);
    }
    let Ok(phases) = <[Phase; 2]>::try_from(phases) else {
        bail!("a phase is missing");
    };
    let report = CacheReport::new(&a, &shape, load, seed, &target, sliding_window, phases);
    report.print(a.json)?;
    if let Some(cache) = report.empty_phase() {
        bail!("no request succeeded with the cache {cache}");
    }
    Ok(())
}

/// One phase: its prompts drawn, the warmup sent, the workload run and summed up.
async fn phase(
    a: &BenchArgs,
    shape: &Shape,
    load: Load,
    seed: u64,
    vocab: u32,
    target: &Arc<Target>,
    cache: Cache,
) -> Result<Phase> {
    let (warmup, scripts) = script::draw(&mut cache.rng(seed), shape, vocab)?;
    let name = cache.name();
    let ask = Ask {
        prefix_cache: cache.prefix_cache(),
        ..Default::default()
    };
    let batch = |tag: String, label: String| Batch::asking(&tag, &label, vec![ask.clone()]);
    let b = batch(format!("warmup-{name}"), format!("warmup (cache {name})"));
    let warmup = warm_up(target, warmup, load, seed, b).await?;
    let b = batch(name.to_string(), format!("cache {name}"));
    Ok(match shape.kind {
        WorkloadKind::MultiTurn => {
            let turns = converse(target.clone(), scripts, load.in_flight(shape.conversations), b).await;
            Phase::new(a, cache.prefix_cache(), warmup, &turns.run, &turns.turn)
        }
        _ => {
            let prompts = scripts.iter().map(|s| s.first_prompt()).collect();
            let run = drive(target.clone(), prompts, load, seed, b).await;
            Phase::new(a, cache.prefix_cache(), warmup, &run, &[])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stub;
    use crate::bench::tests::{args, refused};
    use sirocco_proto::v1::{generate_request::Input, GenerateRequest};

    #[test]
    fn flags_that_do_not_fit_the_workload_are_refused() {
        assert!(refused(&["--turns", "3"]).contains("--turns is for --workload multi-turn"));
        assert!(refused(&["--prefix-groups", "2"]).contains("shared-prefix or multi-turn"));
        assert!(refused(&["--workload", "shared-prefix", "--conversations", "2"]).contains("--conversations"));
        assert!(refused(&["--workload", "shared-prefix", "--api", "openai"]).contains("gRPC"));
        assert!(refused(&["--workload", "shared-prefix", "--corpus"]).contains("random token ids"));
        assert!(refused(&["--workload", "shared-prefix", "--shared-prefix", "0"]).contains("at least 1"));
        assert!(refused(&["--workload", "shared-prefix", "--prefix-groups", "0"]).contains("--prefix-groups"));
        assert!(refused(&["--workload", "multi-turn", "--turns", "0"]).contains("--turns must be"));
        assert!(refused(&["--workload", "multi-turn", "--num-requests", "5"]).contains("--conversations"));
        assert!(refused(&["--workload", "multi-turn", "--request-rate", "2"]).contains("--request-rate"));
        for ok in [
            &["--workload", "multi-turn", "--shared-prefix", "0", "--turns", "2"][..],
            &[
                "--workload",
                "shared-prefix",
                "--prefix-groups",
                "4",
                "--group-order",
                "random",
            ],
            &["--shared-prefix", "64"],
        ] {
            crate::bench::check_args(&args(ok)).unwrap();
        }
    }

    #[test]
    fn loads_default_to_clients_or_every_conversation() {
        let of = |flags: &[&str]| {
            let a = args(flags);
            load(&a, &Shape::of(&a)).in_flight(1000)
        };
        assert_eq!(of(&["--workload", "shared-prefix"]), DEFAULT_CLIENTS);
        assert_eq!(of(&["--workload", "shared-prefix", "--concurrency", "3"]), 3);
        assert_eq!(of(&["--workload", "shared-prefix", "--request-rate", "5"]), 1000);
        assert_eq!(of(&["--workload", "multi-turn", "--conversations", "5"]), 5);
        assert_eq!(of(&["--workload", "multi-turn", "--concurrency", "2"]), 2);
    }

    #[test]
    fn phases_send_an_opt_out_or_nothing_from_streams_of_their_own() {
        use rand::Rng;
        assert_eq!(
            (Cache::Off.prefix_cache(), Cache::On.prefix_cache()),
            (Some(false), None)
        );
        let first = |c: Cache| c.rng(5).random::<u64>();
        assert_ne!(first(Cache::Off), first(Cache::On));
        assert_ne!(first(Cache::On), ChaCha8Rng::seed_from_u64(5).random::<u64>());
        assert_eq!(first(Cache::On), first(Cache::On));
    }

    fn ids(r: &GenerateRequest) -> &[u32] {
        match &r.input {
            Some(Input::TokenIds(t)) => &t.ids,
            _ => panic!("token ids expected"),
        }
    }

    /// Runs `cache`'s phase of `flags` against `stub`: its requests and its JSON.
    async fn run_phase(stub: &stub::Stub, flags: &str, cache: Cache) -> (Vec<GenerateRequest>, serde_json::Value) {
        let addr = stub.start().await;
        let flags = format!("--addr {addr} --seed 5 {flags}");
        let a = args(&flags.split_whitespace().collect::<Vec<_>>());
        let shape = Shape::of(&a);
        let server = Server::new(&a).unwrap();
        let router = server.ask_model(Api::Grpc).await.unwrap();
        let target = Arc::new(server.open(&a, Some(router), 4, None, None).await.unwrap());
        let p = phase(&a, &shape, load(&a, &shape), 5, 1000, &target, cache)
            .await
            .unwrap();
        (stub.take(), serde_json::to_value(&p).unwrap())
    }

    #[tokio::test]
    async fn multi_turn_resends_each_answer_and_opts_out_only_with_the_cache_off() {
        let flags = "--workload multi-turn --conversations 2 --turns 3 --shared-prefix 8 --input-len 4 --output-len 3 --warmup 1";
        let stub = stub::Stub::default();
        let (off, off_json) = run_phase(&stub, flags, Cache::Off).await;
        let (on, on_json) = run_phase(&stub, flags, Cache::On).await;
        for (seen, want) in [(&off, Some(false)), (&on, None)] {
            assert_eq!(seen.len(), 1 + 2 * 3);
            assert!(seen.iter().all(|r| r.prefix_cache == want), "{seen:?}");
            assert!(
                seen[0].request_id.starts_with("bench-warmup-"),
                "{:?}",
                seen[0].request_id
            );
            for c in 0..2 {
                let turn = |t: usize| {
                    let id = format!("bench-{}-c{c}-t{t}", if want.is_some() { "off" } else { "on" });
                    ids(seen
                        .iter()
                        .find(|r| r.request_id == id)
                        .unwrap_or_else(|| panic!("no {id}")))
                    .to_vec()
                };
                let answer: Vec<u32> = (0..3).map(|i| stub::FIRST_ANSWER_ID + i).collect();
                assert_eq!(turn(1).len(), 8 + 4);
                for t in 2..=3 {
                    let (before, now) = (turn(t - 1), turn(t));
                    assert_eq!(now.len(), before.len() + 3 + 4);
                    assert_eq!(now[..before.len()], before[..]);
                    assert_eq!(now[before.len()..before.len() + 3], answer[..]);
                }
            }
        }
        // Fresh prompts per phase: not even the system prompt is shared.
        assert_ne!(ids(&off[1])[..8], ids(&on[1])[..8]);
        assert_eq!(off_json["prefix_cache_hit_rate"], 0.0);
        // The stub cached half of each prompt, rounded down; the warmup does not count.
        let measured = || on.iter().skip(1).map(|r| ids(r).len());
        let want = measured().map(|n| n / 2).sum::<usize>() as f64 / measured().sum::<usize>() as f64;
        assert_eq!(on_json["prefix_cache_hit_rate"].as_f64(), Some(want));
        assert_eq!(on_json["completed"], 6);
        assert_eq!(on_json["warmup"]["completed"], 1);
        assert_eq!(on_json["by_turn"].as_array().map(Vec::len), Some(3));
    }

    #[tokio::test]
    async fn shared_prefix_requests_opt_out_only_with_the_cache_off() {
        let flags = "--workload shared-prefix --num-requests 6 --shared-prefix 16 --prefix-groups 2 --input-len 4 --output-len 2";
        let stub = stub::Stub::default();
        let (off, _) = run_phase(&stub, flags, Cache::Off).await;
        let (on, on_json) = run_phase(&stub, flags, Cache::On).await;
        assert_eq!((off.len(), on.len()), (2 + 6, 2 + 6));
        assert!(off.iter().all(|r| r.prefix_cache == Some(false)) && on.iter().all(|r| r.prefix_cache.is_none()));
        let measured: Vec<&[u32]> = on
            .iter()
            .filter(|r| r.request_id.starts_with("bench-on-"))
            .map(ids)
            .collect();
        let systems: std::collections::HashSet<&[u32]> = measured.iter().map(|p| &p[..16]).collect();
        assert_eq!((measured.len(), systems.len()), (6, 2));
        assert_eq!(on_json["total_output_tokens"], 12);
        assert!(on_json.get("by_turn").is_none());
    }
}
