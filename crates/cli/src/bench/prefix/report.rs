//! A prefix-cache run's report: what was asked, each phase's figures (the cache off,
//! then on; by turn too for multi-turn) and how the two compare, printed as a table
//! of the phases side by side or as one JSON object, whose `cache_off` and
//! `cache_on` `--compare` shows as a column each.

use super::script::Shape;
use crate::bench::driver::{Load, Run};
use crate::bench::record::Record;
use crate::bench::report::{
    cache_hits, dist, load_fields, load_text, percent, print_report, ratio, Dist, Stats, WarmupReport,
};
use crate::bench::target::Target;
use crate::bench::{BenchArgs, WorkloadKind};
use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

/// TTFT and hit rate of the turns of one bucket.
#[derive(Serialize, Debug)]
struct TurnStats {
    /// "1", "2" or "3+".
    turns: &'static str,
    completed: usize,
    ttft_ms: Option<Dist>,
    prefix_cache_hit_rate: Option<f64>,
}

/// The buckets turns are reported in: the first turn has only the system prompt to
/// reuse, the second the first exchange, later ones all before them.
const TURN_BUCKETS: [&str; 3] = ["1", "2", "3+"];

/// The bucket of turn `t` (from 1); None for a request of no known turn.
fn bucket(t: usize) -> Option<usize> {
    (t > 0).then(|| t.min(TURN_BUCKETS.len()) - 1)
}

/// One phase: the cache off or on.
#[derive(Serialize, Debug)]
pub struct Phase {
    /// What every request sent as prefix_cache: false, or null for the server's
    /// default (on).
    prefix_cache: Option<bool>,
    #[serde(flatten)]
    pub stats: Stats,
    /// Multi-turn: TTFT and hit rate of turn 1, turn 2 and turns 3 and later.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    by_turn: Vec<TurnStats>,
}

impl Phase {
    /// The figures of `run`, its requests sent with `prefix_cache`; `turn`, for
    /// multi-turn, is each record's turn number.
    pub fn new(a: &BenchArgs, prefix_cache: Option<bool>, warmup: WarmupReport, run: &Run, turn: &[usize]) -> Phase {
        let mut buckets: Vec<Vec<&Record>> = vec![Vec::new(); TURN_BUCKETS.len()];
        let mut seen = [false; TURN_BUCKETS.len()];
        for (r, &t) in run.records.iter().zip(turn) {
            if let Some(b) = bucket(t) {
                seen[b] = true;
                if r.error.is_none() {
                    buckets[b].push(r);
                }
            }
        }
        let by_turn = buckets
            .into_iter()
            .zip(TURN_BUCKETS)
            .zip(seen)
            .filter(|(_, seen)| *seen)
            .map(|((ok, turns), _)| TurnStats {
                turns,
                completed: ok.len(),
                ttft_ms: dist(ok.iter().filter_map(|r| r.ttft).map(|t| t.as_secs_f64())),
                prefix_cache_hit_rate: cache_hits(ok.iter().copied()).1,
            })
            .collect();
        Phase {
            prefix_cache,
            stats: Stats::new(a, warmup, run),
            by_turn,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct CacheReport {
    /// shared-prefix or multi-turn.
    workload: &'static str,
    api: &'static str,
    target: String,
    model: Option<String>,
    /// The model's sliding window in tokens; 0 without one.
    sliding_window: u32,
    /// Requests (multi-turn: conversations) in flight at most.
    concurrency: Option<usize>,
    /// A number, or "inf"; shared-prefix only.
    request_rate: Option<Value>,
    /// Shared-prefix requests per phase.
    num_requests: Option<usize>,
    /// Multi-turn conversations per phase, and their turns.
    conversations: Option<usize>,
    turns: Option<usize>,
    /// Tokens of each system prompt, and how many distinct ones.
    shared_prefix: usize,
    prefix_groups: usize,
    group_order: &'static str,
    /// Tokens of a question (multi-turn: of a user turn).
    input_len: usize,
    output_len: u32,
    ignore_eos: bool,
    seed: u64,
    prompts: &'static str,
    cache_off: Phase,
    cache_on: Phase,
    /// Median TTFT with the cache off over with it on.
    ttft_p50_off_over_on: Option<f64>,
    /// Output tokens/s with the cache on over off.
    output_throughput_on_over_off: Option<f64>,
}

impl CacheReport {
    /// The report of a run of `shape` under `load` against `target`.
    pub fn new(
        a: &BenchArgs,
        shape: &Shape,
        load: Load,
        seed: u64,
        target: &Target,
        sliding_window: u32,
        [cache_off, cache_on]: [Phase; 2],
    ) -> CacheReport {
        let (concurrency, request_rate) = load_fields(load);
        let multi = shape.kind == WorkloadKind::MultiTurn;
        let p50 = |p: &Phase| p.stats.ttft_ms.map(|d| d.median);
        CacheReport {
            workload: shape.kind.name(),
            api: a.api.name(),
            target: target.address().to_string(),
            model: target.model.clone(),
            sliding_window,
            concurrency,
            request_rate,
            num_requests: (!multi).then_some(shape.conversations),
            conversations: multi.then_some(shape.conversations),
            turns: multi.then_some(shape.turns),
            shared_prefix: shape.prefix_len,
            prefix_groups: shape.groups,
            group_order: shape.order.name(),
            input_len: shape.turn_len,
            output_len: shape.output_len,
            ignore_eos: !a.no_ignore_eos,
            seed,
            prompts: "random_ids",
            ttft_p50_off_over_on: ratio(p50(&cache_off), p50(&cache_on)),
            output_throughput_on_over_off: ratio(
                Some(cache_on.stats.output_throughput),
                Some(cache_off.stats.output_throughput),
            ),
            cache_off,
            cache_on,
        }
    }

    /// The first phase in which no request succeeded, if any: "off" or "on".
    pub fn empty_phase(&self) -> Option<&'static str> {
        [("off", &self.cache_off), ("on", &self.cache_on)]
            .into_iter()
            .find(|(_, p)| p.stats.completed == 0)
            .map(|(name, _)| name)
    }

    /// Prints the report: one JSON object with `json`, else a table.
    pub fn print(&self, json: bool) -> Result<()> {
        print_report(self, json, || self.table())
    }

    /// What the requests were, in a line.
    fn workload_text(&self) -> String {
        let systems = match self.prefix_groups {
            1 => format!("1 system prompt of {} tokens", self.shared_prefix),
            k => format!(
                "{k} system prompts of {} tokens ({})",
                self.shared_prefix, self.group_order
            ),
        };
        match (self.conversations, self.turns) {
            (Some(c), Some(t)) => format!(
                "{c} conversations of {t} turns; {systems}, {}-token user turns, {}-token answers",
                self.input_len, self.output_len
            ),
            _ => format!(
                "{} requests; {systems}, {}-token questions, {} output tokens",
                self.num_requests.unwrap_or(0),
                self.input_len,
                self.output_len
            ),
        }
    }

    /// The table, a line each: the header, then the phases side by side.
    fn table(&self) -> Vec<String> {
        let (off, on) = (&self.cache_off, &self.cache_on);
        let line = |k: &str, v: String| format!("{k:<40} {v}").trim_end().to_string();
        let row = |k: &str, get: &dyn Fn(&Phase) -> String| line(k, format!("{:>11} {:>11}", get(off), get(on)));
        let f2 = |x: f64| format!("{x:.2}");
        let ms = |d: Option<Dist>, q: fn(&Dist) -> f64| d.as_ref().map_or("n/a".into(), |d| f2(q(d)));
        let rate = |r: Option<f64>| r.map_or("n/a".into(), percent);
        let times = |r: Option<f64>| r.map_or("n/a".into(), |r| format!("{r:.2}x"));
        let mut out = vec![format!(
            "{:=^64}",
            format!(" Prefix Cache Benchmark ({}) ", self.workload)
        )];
        out.push(line("API:", format!("{} ({})", self.api, self.target)));
        if let Some(m) = &self.model {
            let window = match self.sliding_window {
                0 => String::new(),
                w => format!(" (sliding window {w})"),
            };
            out.push(line("Model:", format!("{m}{window}")));
        }
        out.push(line("Workload:", self.workload_text()));
        out.push(line("Load:", load_text(self.concurrency, self.request_rate.as_ref())));
        out.push(line("Seed:", self.seed.to_string()));
        out.push(row("", &|p| {
            if p.prefix_cache == Some(false) {
                "cache off"
            } else {
                "cache on"
            }
            .into()
        }));
        if off.stats.warmup.requests + on.stats.warmup.requests > 0 {
            out.push(row("Warmup requests (not counted):", &|p| {
                p.stats.warmup.requests.to_string()
            }));
        }
        out.extend([
            row("Successful requests:", &|p| p.stats.completed.to_string()),
            row("Failed requests:", &|p| p.stats.failed.to_string()),
            row("Benchmark duration (s):", &|p| f2(p.stats.duration_s)),
            row("Total input tokens:", &|p| p.stats.total_input_tokens.to_string()),
            row("Cached prompt tokens:", &|p| {
                p.stats.cached_prompt_tokens.map_or("n/a".into(), |c| c.to_string())
            }),
            row("Prefix cache hit rate:", &|p| rate(p.stats.prefix_cache_hit_rate)),
            row("Total output tokens:", &|p| p.stats.total_output_tokens.to_string()),
            row("Request throughput (req/s):", &|p| f2(p.stats.request_throughput)),
            row("Output token throughput (tok/s):", &|p| f2(p.stats.output_throughput)),
            row("Median TTFT (ms):", &|p| ms(p.stats.ttft_ms, |d| d.median)),
            row("P99 TTFT (ms):", &|p| ms(p.stats.ttft_ms, |d| d.p99)),
            row("Median TPOT (ms):", &|p| ms(p.stats.tpot_ms, |d| d.median)),
            row("Median E2E (ms):", &|p| ms(p.stats.e2e_ms, |d| d.median)),
        ]);
        for (b, name) in TURN_BUCKETS.iter().enumerate() {
            let of = |p: &Phase| {
                p.by_turn
                    .iter()
                    .find(|t| t.turns == *name)
                    .map(|t| (t.ttft_ms, t.prefix_cache_hit_rate))
            };
            if of(off).is_none() && of(on).is_none() {
                continue;
            }
            let label = if b + 1 < TURN_BUCKETS.len() {
                format!("Turn {name}")
            } else {
                format!("Turns {name}")
            };
            out.extend([
                row(&format!("{label} median TTFT (ms):"), &|p| {
                    ms(of(p).and_then(|t| t.0), |d| d.median)
                }),
                row(&format!("{label} P99 TTFT (ms):"), &|p| {
                    ms(of(p).and_then(|t| t.0), |d| d.p99)
                }),
                row(&format!("{label} hit rate:"), &|p| rate(of(p).and_then(|t| t.1))),
            ]);
        }
        out.push(format!("{:-^64}", " Cache on vs off "));
        out.push(line("Median TTFT, off / on:", times(self.ttft_p50_off_over_on)));
        out.push(line(
            "Output throughput, on / off:",
            times(self.output_throughput_on_over_off),
        ));
        for (name, p) in [("cache off", off), ("cache on", on)] {
            out.extend(p.stats.errors.iter().map(|e| format!("  error ({name}): {e}")));
        }
        out.push("=".repeat(64));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tests::args;
    use std::time::Duration;

    fn rec(ttft_ms: u64, input: usize, cached: usize, ok: bool) -> Record {
        Record {
            input_tokens: input,
            output_tokens: 4,
            cached_prompt_tokens: Some(cached),
            ttft: Some(Duration::from_millis(ttft_ms)),
            e2e: Duration::from_millis(ttft_ms + 30),
            error: (!ok).then(|| "boom".into()),
            ..Default::default()
        }
    }

    /// A multi-turn phase: conversations of `turns` turns whose TTFT is `ttft(turn)`,
    /// with `cached(turn)` of 100 prompt tokens cached.
    fn phase(cache: Option<bool>, turns: usize, ttft: fn(usize) -> u64, cached: fn(usize) -> usize) -> Phase {
        let a = args(&["--workload", "multi-turn"]);
        let turn: Vec<usize> = (0..4).flat_map(|_| 1..=turns).collect();
        let records = turn.iter().map(|&t| rec(ttft(t), 100, cached(t), true)).collect();
        let run = Run {
            records,
            elapsed: Duration::from_secs(2),
        };
        Phase::new(&a, cache, WarmupReport::none(), &run, &turn)
    }

    #[test]
    fn turns_fall_in_buckets_one_two_and_later() {
        assert_eq!([0, 1, 2, 3, 9].map(bucket), [None, Some(0), Some(1), Some(2), Some(2)]);
        let p = phase(None, 5, |t| 10 * t as u64, |t| if t == 1 { 0 } else { 50 });
        let names: Vec<_> = p.by_turn.iter().map(|b| b.turns).collect();
        assert_eq!(names, ["1", "2", "3+"]);
        assert_eq!(p.by_turn.iter().map(|b| b.completed).collect::<Vec<_>>(), [4, 4, 12]);
        // Turns 3, 4 and 5: 30, 40 and 50 ms.
        assert!((p.by_turn[2].ttft_ms.unwrap().median - 40.0).abs() < 1e-9);
        assert_eq!(p.by_turn[0].prefix_cache_hit_rate, Some(0.0));
        assert_eq!(p.by_turn[1].prefix_cache_hit_rate, Some(0.5));
        // 16 of 20 requests had 50 of 100 tokens cached.
        assert!((p.stats.prefix_cache_hit_rate.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(phase(None, 2, |_| 1, |_| 0).by_turn.len(), 2);
        let shared = Phase::new(
            &args(&[]),
            None,
            WarmupReport::none(),
            &Run {
                records: vec![rec(5, 10, 0, true), rec(5, 10, 0, false)],
                elapsed: Duration::from_secs(1),
            },
            &[],
        );
        assert!(shared.by_turn.is_empty());
        assert_eq!((shared.stats.completed, shared.stats.failed), (1, 1));
    }

    #[test]
    fn ratios_need_both_sides() {
        assert_eq!(ratio(Some(6.0), Some(2.0)), Some(3.0));
        assert_eq!(ratio(Some(6.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
    }

    fn report() -> CacheReport {
        let off = phase(Some(false), 3, |t| 100 * t as u64, |_| 0);
        let on = phase(None, 3, |t| 25 * t as u64, |t| if t == 1 { 0 } else { 75 });
        CacheReport {
            workload: "multi-turn",
            api: "grpc",
            target: "http://127.0.0.1:50051".into(),
            model: Some("m229".into()),
            sliding_window: 4096,
            concurrency: Some(4),
            request_rate: None,
            num_requests: None,
            conversations: Some(4),
            turns: Some(3),
            shared_prefix: 256,
            prefix_groups: 2,
            group_order: "round-robin",
            input_len: 32,
            output_len: 64,
            ignore_eos: true,
            seed: 7,
            prompts: "random_ids",
            ttft_p50_off_over_on: ratio(off.stats.ttft_ms.map(|d| d.median), on.stats.ttft_ms.map(|d| d.median)),
            output_throughput_on_over_off: Some(1.5),
            cache_off: off,
            cache_on: on,
        }
    }

    #[test]
    fn the_table_shows_both_phases_by_turn_and_their_ratios() {
        let t = report().table();
        let row = |label: &str| {
            t.iter()
                .find(|l| l.starts_with(label))
                .unwrap_or_else(|| panic!("no {label}: {t:#?}"))
                .clone()
        };
        assert!(t[0].contains("Prefix Cache Benchmark (multi-turn)"), "{t:#?}");
        assert!(row("Model:").ends_with("m229 (sliding window 4096)"));
        assert!(row("Workload:").contains("4 conversations of 3 turns; 2 system prompts of 256 tokens (round-robin)"));
        assert!(row("Load:").ends_with("4 in flight"));
        assert!(row("  ").contains("cache off") && row("  ").ends_with("cache on"));
        assert!(row("Prefix cache hit rate:").ends_with("0.0%       50.0%"), "{t:#?}");
        assert!(row("Median TTFT (ms):").ends_with("200.00       50.00"), "{t:#?}");
        assert!(
            row("Turn 1 median TTFT (ms):").ends_with("100.00       25.00"),
            "{t:#?}"
        );
        assert!(row("Turn 2 hit rate:").ends_with("75.0%"), "{t:#?}");
        assert!(row("Turns 3+ P99 TTFT (ms):").ends_with("300.00       75.00"), "{t:#?}");
        assert!(row("Median TTFT, off / on:").ends_with("4.00x"), "{t:#?}");
        assert!(row("Output throughput, on / off:").ends_with("1.50x"), "{t:#?}");
        assert!(t.iter().all(|l| !l.contains("error")), "{t:#?}");
    }

    #[test]
    fn the_json_nests_each_phase_and_compare_reads_it() {
        let v = serde_json::to_value(report()).unwrap();
        assert_eq!(v["cache_off"]["prefix_cache"], false);
        assert!(v["cache_on"]["prefix_cache"].is_null());
        assert_eq!(v["cache_on"]["by_turn"][2]["turns"], "3+");
        assert_eq!(v["cache_on"]["prefix_cache_hit_rate"], 0.5);
        assert!(v["cache_on"]["request_throughput"].is_number());
        assert_eq!(v["ttft_p50_off_over_on"], 4.0);
        assert_eq!(report().empty_phase(), None);
    }
}
