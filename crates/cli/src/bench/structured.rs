//! `--structured json-schema`: what constraining outputs costs decoding. Against one
//! server, for each number of streams (1 and 16, or --concurrency), a closed loop runs
//! three phases, each on fresh prompts of its own:
//!
//! 1. constrained: every request's output must match a JSON Schema (the built-in one
//!    or --schema), at most --output-len tokens; it ends when its JSON is complete;
//! 2. unconstrained: no constraint, ignore_eos, and each request's max_new_tokens the
//!    output length of the constrained request of the same number, so both phases
//!    decode as many tokens and their requests end as staggered (requests of one
//!    length would end together, and the next ones' prefills would then not share
//!    steps with decoding ones as they do under a constraint: TPOT would differ for
//!    that alone);
//! 3. mixed: the two kinds of request alternate in one batch, to show what the
//!    unconstrained half pays for its neighbours' masks.
//!
//! Every request opts out of the prefix cache, so each phase prefills whole prompts
//! between its decode steps alike. The report compares the phases' TPOT and checks
//! the constrained outputs (JSON, ended by completion rather than at max_new_tokens);
//! where the router's /metrics (--http-addr) has `sirocco_structured_mask_seconds`,
//! it adds the time spent computing masks per constrained token.
//!
//! In structured/: schema.rs is the built-in schema, report.rs sums up and prints.

mod report;
mod schema;

use super::driver::{drive, Batch, Load, Run};
use super::target::{Ask, Server, Target};
use super::workload::{self, Prompt, Source};
use super::{warm_up, BenchArgs, Setup, WorkloadKind};
use anyhow::{bail, Result};
use clap::ValueEnum;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use report::{MaskTime, StreamsRun, StructuredReport};
use schema::Schema;
use std::sync::Arc;
use std::time::Duration;

/// What constrains the outputs of `--structured`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Structured {
    /// A JSON Schema: the built-in one (a customer record), or --schema FILE.
    JsonSchema,
}

impl Structured {
    fn name(self) -> &'static str {
        match self {
            Structured::JsonSchema => "json-schema",
        }
    }
}

/// Streams run without --concurrency: one alone, and a batch.
const DEFAULT_STREAMS: [usize; 2] = [1, 16];

/// --output-len with --structured: the most a constrained output may take, room
/// enough for the built-in schema's longest JSON.
pub const DEFAULT_OUTPUT_LEN: u32 = 256;

/// The random stream of the warmup's prompts; a phase's is after it (the independent
/// workload's is 0, the prefix-cache phases' 1 and 2).
const WARMUP_STREAM: u64 = 16;

/// The router's histogram of the time it spends computing masks.
const MASK_METRIC: &str = "sirocco_structured_mask_seconds";

/// A phase at one number of streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Constrained,
    Unconstrained,
    Mixed,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Constrained, Phase::Unconstrained, Phase::Mixed];

    fn name(self) -> &'static str {
        match self {
            Phase::Constrained => "constrained",
            Phase::Unconstrained => "unconstrained",
            Phase::Mixed => "mixed",
        }
    }

    /// What its requests ask: request i the `constrained` one, the `free[i]` one, or
    /// each in turn.
    fn asks(self, constrained: &Ask, free: &[Ask]) -> Vec<Ask> {
        match self {
            Phase::Constrained => vec![constrained.clone()],
            Phase::Unconstrained => free.to_vec(),
            Phase::Mixed => free
                .iter()
                .enumerate()
                .map(|(i, f)| if i % 2 == 0 { constrained } else { f }.clone())
                .collect(),
        }
    }

    /// The random stream of its prompts in round `round` of `rounds` at the `k`th number
    /// of streams.
    fn stream(self, k: usize, round: usize, rounds: usize) -> u64 {
        let i = Phase::ALL.iter().position(|&p| p == self).unwrap_or(0);
        WARMUP_STREAM + 1 + ((k * rounds + round) * Phase::ALL.len() + i) as u64
    }
}

/// Refuses the flags that do not fit --structured, or --schema without it.
pub fn check_args(a: &BenchArgs) -> Result<()> {
    let Some(kind) = a.structured else {
        if let Some(flag) = [("--schema", a.schema.is_some()), ("--rounds", a.rounds.is_some())]
            .into_iter()
            .find_map(|(flag, given)| given.then_some(flag))
        {
            bail!("{flag} is for --structured json-schema");
        }
        return Ok(());
    };
    let name = kind.name();
    if a.workload != WorkloadKind::Independent {
        bail!(
            "--structured {name} runs independent prompts: drop --workload {}",
            a.workload.name()
        );
    }
    if a.request_rate.is_some() {
        bail!(
            "--structured {name} runs a closed loop at each number of streams: drop --request-rate (use --concurrency)"
        );
    }
    if a.rounds == Some(0) {
        bail!("--rounds must be at least 1");
    }
    if let Some(n) = a.num_requests.filter(|&n| n < 2 * rounds(a)) {
        bail!(
            "--structured {name} needs --num-requests of at least 2 per round (got {n} for {} rounds): \
             the mixed phase sends both kinds of request",
            rounds(a)
        );
    }
    Ok(())
}

/// --rounds, or its default: each phase at once.
fn rounds(a: &BenchArgs) -> usize {
    a.rounds.unwrap_or(1)
}

/// The numbers of streams to run: --concurrency, else 1 and 16.
fn streams(a: &BenchArgs) -> Vec<usize> {
    a.concurrency.map_or(DEFAULT_STREAMS.to_vec(), |c| vec![c])
}

/// Requests per phase at `streams`: --num-requests, else two per stream (at least
/// 8), so a phase is mostly full batches.
fn requests(a: &BenchArgs, streams: usize) -> usize {
    a.num_requests.unwrap_or((2 * streams).max(8))
}

/// What the run's two kinds of request share: the prompts' source and sizes, the
/// server, the schema.
struct Plan {
    source: Source,
    vocab: Option<u32>,
    target: Arc<Target>,
    seed: u64,
    schema: Schema,
    constrained: Ask,
}

impl Plan {
    fn new(source: Source, vocab: Option<u32>, target: Arc<Target>, seed: u64, schema: Schema) -> Plan {
        let constrained = Ask {
            // Whole prompts prefilled in every phase alike, whatever the source.
            prefix_cache: Some(false),
            json_schema: Some(schema.text.clone()),
            output_len: None,
        };
        Plan {
            source,
            vocab,
            target,
            seed,
            schema,
            constrained,
        }
    }

    /// `n` prompts of their own from `stream`.
    fn prompts(&self, a: &BenchArgs, stream: u64, n: usize) -> Result<Vec<Prompt>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(stream);
        workload::draw(a, &self.source, &mut rng, n, self.vocab, self.target.tokenizer.as_ref())
    }

    /// An unconstrained request of at most `output_len` tokens, through EOS unless
    /// --no-ignore-eos.
    fn free(&self, output_len: u32) -> Ask {
        Ask {
            output_len: Some(output_len),
            ..self.constrained.clone()
        }
        .unconstrained()
    }
}

impl Ask {
    /// This request without its constraint.
    fn unconstrained(self) -> Ask {
        Ask {
            json_schema: None,
            ..self
        }
    }
}

/// The procedure: load the schema, ask the router for its model and check the run
/// fits it, connect, warm up, then at each number of streams run the constrained,
/// unconstrained and mixed phases; report them.
pub async fn bench(a: BenchArgs, timeout: Option<Duration>) -> Result<()> {
    let Some(kind) = a.structured else {
        bail!("--structured is missing");
    };
    let schema = schema::load(a.schema.as_deref())?;
    let server = Server::new(&a)?;
    let setup = Setup::of(&a, &server).await?;
    let streams = streams(&a);
    let most = streams.iter().copied().max().unwrap_or(1);
    let in_flight = most.max(a.warmup());
    let target = server.open(&a, setup.router, in_flight, setup.tokenizer, timeout);
    let seed = setup.seed;
    let plan = Plan::new(setup.source, setup.vocab, Arc::new(target.await?), seed, schema);
    // One request of each kind, where two are sent: the first constrained one pays for
    // compiling the schema, which no phase should.
    let asks = vec![plan.constrained.clone(), plan.free(a.output_len())];
    let warmup_prompts = plan.prompts(&a, WARMUP_STREAM, a.warmup())?;
    let batch = Batch::asking("warmup", "warmup", asks);
    let warmup = warm_up(&plan.target, warmup_prompts, Load::Closed(most), seed, batch).await?;
    let mut runs = Vec::new();
    for (k, &s) in streams.iter().enumerate() {
        runs.push(at_streams(&a, &plan, k, s).await?);
    }
    let report = StructuredReport::new(
        &a,
        kind.name(),
        &plan.schema.name,
        &plan.source,
        &plan.target,
        seed,
        warmup,
        runs,
    );
    report.print(a.json)?;
    if let Some((streams, phase)) = report.empty_phase() {
        bail!("no request succeeded in the {phase} phase at {streams} streams");
    }
    Ok(())
}

/// The three phases at `streams` (the `k`th number of streams), in --rounds rounds in
/// which they take turns: constrained first, for the lengths the unconstrained
/// requests then ask for (the first round's).
async fn at_streams(a: &BenchArgs, plan: &Plan, k: usize, streams: usize) -> Result<StreamsRun> {
    let (n, rounds) = (requests(a, streams), rounds(a));
    if n < 2 * rounds {
        bail!("{n} requests per phase cannot make {rounds} rounds of at least 2: lower --rounds");
    }
    let mut lengths = vec![a.output_len()];
    let mut runs: Vec<(Run, Option<MaskTime>)> = Vec::new();
    for round in 0..rounds {
        // Rounds share the requests out, the first ones taking any left over.
        let n_round = n / rounds + usize::from(round < n % rounds);
        for (i, phase) in Phase::ALL.into_iter().enumerate() {
            let prompts = plan.prompts(a, phase.stream(k, round, rounds), n_round)?;
            let of = if rounds > 1 {
                format!(" (round {}/{rounds})", round + 1)
            } else {
                String::new()
            };
            let label = format!("{streams} streams, {}{of}", phase.name());
            let tag = format!("s{streams}-r{round}-{}", phase.name());
            let free: Vec<Ask> = lengths.iter().map(|&l| plan.free(l)).collect();
            let batch = Batch::asking(&tag, &label, phase.asks(&plan.constrained, &free));
            let before = mask_time(&plan.target).await;
            let run = drive(plan.target.clone(), prompts, Load::Closed(streams), plan.seed, batch).await;
            let mask = MaskTime::between(before, mask_time(&plan.target).await);
            if phase == Phase::Constrained && round == 0 {
                lengths = output_lengths(&run, n_round).unwrap_or(lengths);
            }
            match runs.get_mut(i) {
                Some((all, all_mask)) => {
                    all.records.extend(run.records);
                    all.elapsed += run.elapsed;
                    *all_mask = all_mask.zip(mask).map(|(m, more)| m.add(more));
                }
                None => runs.push((run, mask)),
            }
        }
    }
    let Ok(runs) = <[(Run, Option<MaskTime>); 3]>::try_from(runs) else {
        bail!("a phase is missing");
    };
    let median = median(&lengths).unwrap_or(a.output_len());
    Ok(StreamsRun::new(a, &plan.schema, streams, n, median, runs))
}

/// The output length of each of the `n` requests of `run`, by their number, at least
/// 2 tokens (one after the first, for a TPOT); a failed one's is the median of the
/// others. None when none succeeded.
fn output_lengths(run: &Run, n: usize) -> Option<Vec<u32>> {
    let ok = |i: usize| {
        run.records
            .iter()
            .find(|r| r.index == i && r.error.is_none())
            .map(|r| u32::try_from(r.output_tokens).unwrap_or(u32::MAX).max(2))
    };
    let found: Vec<Option<u32>> = (0..n).map(ok).collect();
    let median = median(&found.iter().flatten().copied().collect::<Vec<_>>())?;
    Some(found.into_iter().map(|l| l.unwrap_or(median)).collect())
}

/// The median of `lengths`; None when there are none.
fn median(lengths: &[u32]) -> Option<u32> {
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

/// The router's mask-time histogram now: its sum (seconds) and count over every
/// series; None when its metrics cannot be had or do not have it.
async fn mask_time(target: &Target) -> Option<(f64, f64)> {
    let text = target.scrape_metrics().await?;
    histogram_totals(&text, MASK_METRIC)
}

/// The `_sum` and `_count` of histogram `name` in Prometheus text, over every series;
/// None when it has neither.
fn histogram_totals(text: &str, name: &str) -> Option<(f64, f64)> {
    let (sum_name, count_name) = (format!("{name}_sum"), format!("{name}_count"));
    let (mut sum, mut count, mut seen) = (0.0, 0.0, false);
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = l.trim().rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let metric = series.split('{').next().unwrap_or_default();
        if metric == sum_name {
            (sum, seen) = (sum + value, true);
        } else if metric == count_name {
            (count, seen) = (count + value, true);
        }
    }
    seen.then_some((sum, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stub::Stub;
    use crate::bench::tests::{args, refused};
    use sirocco_proto::v1 as pb;

    #[test]
    fn flags_that_do_not_fit_structured_are_refused() {
        assert!(refused(&["--schema", "s.json"]).contains("--structured"));
        let s = ["--structured", "json-schema"];
        let with = |more: &[&'static str]| [&s[..], more].concat();
        assert!(refused(&with(&["--workload", "shared-prefix"])).contains("drop --workload"));
        assert!(refused(&with(&["--request-rate", "3"])).contains("--request-rate"));
        assert!(refused(&with(&["--num-requests", "1"])).contains("at least 2"));
        assert!(refused(&with(&["--num-requests", "5", "--rounds", "3"])).contains("at least 2 per round"));
        assert!(refused(&with(&["--rounds", "0"])).contains("--rounds must be"));
        assert!(refused(&["--rounds", "2"]).contains("--rounds is for --structured"));
        crate::bench::check_args(&args(&with(&["--concurrency", "4", "--schema", "s.json"]))).unwrap();
    }

    #[test]
    fn streams_requests_and_lengths_have_defaults_of_their_own() {
        let a = args(&["--structured", "json-schema"]);
        assert_eq!(streams(&a), [1, 16]);
        assert_eq!((requests(&a, 1), requests(&a, 16)), (8, 32));
        assert_eq!((a.output_len(), a.warmup()), (DEFAULT_OUTPUT_LEN, 2));
        let a = args(&[
            "--structured",
            "json-schema",
            "--concurrency",
            "4",
            "--num-requests",
            "6",
        ]);
        assert_eq!((streams(&a), requests(&a, 4)), (vec![4], 6));
        assert_eq!(args(&[]).output_len(), 64);
    }

    #[test]
    fn phases_draw_prompts_from_streams_of_their_own() {
        let mut seen: Vec<u64> = vec![WARMUP_STREAM, 0, 1, 2];
        for k in 0..3 {
            for round in 0..4 {
                for p in Phase::ALL {
                    let stream = p.stream(k, round, 4);
                    assert!(!seen.contains(&stream), "{p:?} at {k}, round {round}");
                    seen.push(stream);
                }
            }
        }
    }

    #[test]
    fn unconstrained_requests_mirror_each_constrained_length() {
        use crate::bench::record::Record;
        let rec = |index: usize, n: usize, ok: bool| Record {
            index,
            output_tokens: n,
            error: (!ok).then(|| "boom".into()),
            ..Default::default()
        };
        // In completion order, not by number; request 3 failed, request 1 had one token.
        let run = Run {
            records: vec![rec(2, 40, true), rec(0, 10, true), rec(3, 99, false), rec(1, 1, true)],
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(output_lengths(&run, 4), Some(vec![10, 2, 40, 10]));
        let failed = Run {
            records: vec![rec(0, 5, false)],
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(output_lengths(&failed, 1), None);
        assert_eq!((median(&[3, 1, 2]), median(&[])), (Some(2), None));
        // The mixed phase: the constrained request, then the free one of that number.
        let c = Ask {
            json_schema: Some("{}".into()),
            ..Default::default()
        };
        let free: Vec<Ask> = [7, 8, 9]
            .map(|l| Ask {
                output_len: Some(l),
                ..Default::default()
            })
            .to_vec();
        let lens = |asks: Vec<Ask>| {
            asks.iter()
                .map(|a| (a.json_schema.is_some(), a.output_len))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            lens(Phase::Mixed.asks(&c, &free)),
            [(true, None), (false, Some(8)), (true, None)]
        );
        assert_eq!(lens(Phase::Unconstrained.asks(&c, &free)).len(), 3);
    }

    #[test]
    fn mask_time_sums_every_series_of_the_histogram() {
        let text = "# HELP sirocco_structured_mask_seconds x\n\
            sirocco_structured_mask_seconds_bucket{le=\"0.001\"} 3\n\
            sirocco_structured_mask_seconds_sum{replica=\"r0\"} 0.5\n\
            sirocco_structured_mask_seconds_sum{replica=\"r1\"} 0.25\n\
            sirocco_structured_mask_seconds_count{replica=\"r0\"} 100\n\
            sirocco_structured_mask_seconds_count 50\n\
            sirocco_structured_mask_seconds_summary_sum 9\n";
        assert_eq!(histogram_totals(text, MASK_METRIC), Some((0.75, 150.0)));
        assert_eq!(histogram_totals("other_sum 1\n", MASK_METRIC), None);
        let m = MaskTime::between(Some((0.5, 100.0)), Some((0.75, 150.0))).unwrap();
        assert!((m.seconds - 0.25).abs() < 1e-12 && (m.computations - 50.0).abs() < 1e-12);
        assert!(MaskTime::between(None, Some((1.0, 1.0))).is_none());
    }

    /// A whole run against the stub router: the constrained requests carry the schema
    /// and no ignore_eos, the unconstrained ones ask for the constrained phase's
    /// lengths, the mixed phase alternates them, and the report splits it.
    #[tokio::test]
    async fn phases_send_the_schema_to_every_request_none_or_half() {
        let stub = Stub::default();
        let addr = stub.start().await;
        let flags = format!(
            "--addr {addr} --http-addr 127.0.0.1:1 --seed 5 --structured json-schema --concurrency 2 \
             --num-requests 4 --rounds 2 --input-len 6 --output-len 40 --warmup 2"
        );
        let a = args(&flags.split_whitespace().collect::<Vec<_>>());
        let schema = schema::load(None).unwrap();
        let server = Server::new(&a).unwrap();
        let router = server.ask_model(crate::bench::Api::Grpc).await.unwrap();
        let target = Arc::new(server.open(&a, Some(router), 2, None, None).await.unwrap());
        let plan = Plan::new(Source::RandomIds, Some(1000), target, 5, schema.clone());
        let run = at_streams(&a, &plan, 0, 2).await.unwrap();
        let seen = stub.take();
        assert_eq!(seen.len(), 3 * 4);
        let of = |r: &pb::GenerateRequest| r.parameters.clone().unwrap_or_default();
        let schema_of = |r: &pb::GenerateRequest| match of(r).constraint.and_then(|c| c.kind) {
            Some(pb::constraint::Kind::JsonSchema(s)) => Some(s),
            _ => None,
        };
        // Two rounds of two requests per phase, the phases taking turns.
        let order: Vec<&str> = seen
            .iter()
            .map(|r| r.request_id.trim_end_matches(|c: char| c.is_ascii_digit()))
            .collect();
        let turn = |r: usize, p: &str| format!("bench-s2-r{r}-{p}-");
        let want: Vec<String> = (0..2)
            .flat_map(|r| ["constrained", "unconstrained", "mixed"].map(|p| turn(r, p)))
            .flat_map(|id| [id.clone(), id])
            .collect();
        assert_eq!(order, want);
        let phase = |name: &str| -> Vec<&pb::GenerateRequest> {
            seen.iter()
                .filter(|r| (0..2).any(|round| r.request_id.starts_with(&turn(round, name))))
                .collect()
        };
        for r in phase("constrained") {
            assert_eq!(schema_of(r).as_deref(), Some(&*schema.text));
            assert_eq!((of(r).max_new_tokens, of(r).ignore_eos), (Some(40), false));
        }
        // The stub answers a constrained request with the tokens of its JSON_ANSWER.
        let want = crate::bench::stub::JSON_ANSWER.len() as u32;
        for r in phase("unconstrained") {
            assert_eq!(schema_of(r), None);
            assert_eq!((of(r).max_new_tokens, of(r).ignore_eos), (Some(want), true));
        }
        let mixed = phase("mixed");
        let kinds: Vec<bool> = (0..4)
            .map(|i| {
                let id = format!("bench-s2-r{}-mixed-{}", i / 2, i % 2);
                mixed
                    .iter()
                    .find(|r| r.request_id == id)
                    .is_some_and(|r| schema_of(r).is_some())
            })
            .collect();
        assert_eq!(kinds, [true, false, true, false]);
        assert!(seen.iter().all(|r| r.prefix_cache == Some(false)));

        let v = serde_json::to_value(&run).unwrap();
        assert_eq!(v["unconstrained_output_len"], want);
        for (side, completed) in [
            ("constrained", 4),
            ("unconstrained", 4),
            ("mixed_constrained", 2),
            ("mixed_unconstrained", 2),
        ] {
            assert_eq!(v[side]["completed"], completed, "{side}: {v:#}");
        }
        assert_eq!(v["constrained"]["json_complete"], 1.0, "{v:#}");
        assert_eq!(v["mixed_constrained"]["json_complete"], 1.0, "{v:#}");
        assert!(v["unconstrained"].get("json_complete").is_none(), "{v:#}");
        // No metrics at --http-addr: no mask time, and nothing fails for it.
        assert!(v["constrained"]["mask"].is_null(), "{v:#}");
    }
}
