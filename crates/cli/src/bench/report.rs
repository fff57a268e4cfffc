//! Statistics and the report: a run's records summed into throughput, goodput under
//! the SLOs given, the prefix cache's hit rate and the TTFT, TPOT, ITL and end-to-end
//! distributions (`Stats`), headed by what was asked (`Report`), printed as a table or
//! one JSON object (what `--compare` reads back).

use super::driver::{Load, Run};
use super::record::{methods, Record};
use super::target::Target;
use super::workload::Source;
use super::BenchArgs;
use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;

/// Error messages kept for the report; the rest are only counted.
const MAX_ERRORS_SHOWN: usize = 5;

#[derive(Serialize, Debug, Clone, Copy)]
pub(super) struct Dist {
    pub(super) mean: f64,
    pub(super) median: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
}

/// Linear-interpolated percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Mean and percentiles, in ms, of durations in seconds.
pub(super) fn dist(secs: impl IntoIterator<Item = f64>) -> Option<Dist> {
    let mut v: Vec<f64> = secs.into_iter().map(|s| s * 1000.0).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(Dist {
        mean: v.iter().sum::<f64>() / v.len() as f64,
        median: percentile(&v, 50.0),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
    })
}

/// (e2e - ttft) / (tokens - 1): decode time per token after the first.
fn tpot(r: &Record) -> Option<f64> {
    let ttft = r.ttft?;
    (r.output_tokens > 1).then(|| (r.e2e - ttft).as_secs_f64() / (r.output_tokens - 1) as f64)
}

#[derive(Serialize, Debug)]
pub(super) struct Slo {
    ttft_ms: Option<f64>,
    tpot_ms: Option<f64>,
    e2e_ms: Option<f64>,
}

impl Slo {
    fn of(a: &BenchArgs) -> Slo {
        Slo {
            ttft_ms: a.slo_ttft_ms,
            tpot_ms: a.slo_tpot_ms,
            e2e_ms: a.slo_e2e_ms,
        }
    }

    fn any(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2e_ms.is_some()
    }

    /// A request with one token has no TPOT, so it cannot miss that SLO.
    fn met(&self, r: &Record) -> bool {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        self.ttft_ms.is_none_or(|s| r.ttft.is_some_and(|t| ms(t) <= s))
            && self.tpot_ms.is_none_or(|s| tpot(r).is_none_or(|t| t * 1000.0 <= s))
            && self.e2e_ms.is_none_or(|s| ms(r.e2e) <= s)
    }
}

/// A run's records, split into the successful and the failed, with token totals of
/// the successful.
pub struct Summary<'a> {
    pub ok: Vec<&'a Record>,
    failed: usize,
    /// The first few errors.
    pub errors: Vec<String>,
    input_tokens: usize,
    output_tokens: usize,
}

impl<'a> Summary<'a> {
    pub fn of(records: &'a [Record]) -> Summary<'a> {
        let ok: Vec<&Record> = records.iter().filter(|r| r.error.is_none()).collect();
        let errors = records
            .iter()
            .filter_map(|r| r.error.clone())
            .take(MAX_ERRORS_SHOWN)
            .collect();
        Summary {
            failed: records.len() - ok.len(),
            input_tokens: ok.iter().map(|r| r.input_tokens).sum(),
            output_tokens: ok.iter().map(|r| r.output_tokens).sum(),
            ok,
            errors,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct WarmupReport {
    pub(super) requests: usize,
    completed: usize,
    failed: usize,
    input_tokens: usize,
    output_tokens: usize,
}

impl WarmupReport {
    /// `requests` warmup requests that went as `s` says.
    pub fn of(requests: usize, s: &Summary) -> WarmupReport {
        WarmupReport {
            requests,
            completed: s.ok.len(),
            failed: s.failed,
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
        }
    }

    /// No warmup.
    pub fn none() -> WarmupReport {
        WarmupReport {
            requests: 0,
            completed: 0,
            failed: 0,
            input_tokens: 0,
            output_tokens: 0,
        }
    }
}

/// What a run's requests saw, summed up: everything of a report but what was asked.
/// A prefix-cache run has one per phase.
#[derive(Serialize, Debug)]
pub struct Stats {
    /// How output and input tokens were counted (see `Count`).
    pub(super) output_token_count: String,
    pub(super) input_token_count: String,
    pub(super) warmup: WarmupReport,
    pub completed: usize,
    pub(super) failed: usize,
    pub(super) errors: Vec<String>,
    pub(super) duration_s: f64,
    pub(super) total_input_tokens: usize,
    pub(super) total_output_tokens: usize,
    /// Prompt tokens the server served from its prefix cache; null when it did not say.
    pub(super) cached_prompt_tokens: Option<usize>,
    /// cached_prompt_tokens over the prompt tokens of the requests that said.
    pub(super) prefix_cache_hit_rate: Option<f64>,
    /// Completed requests/s.
    pub(super) request_throughput: f64,
    /// Output tokens/s.
    pub(super) output_throughput: f64,
    /// Input plus output tokens/s.
    pub(super) total_token_throughput: f64,
    pub(super) slo: Slo,
    /// Completed requests meeting every SLO given, per second; null without SLOs.
    pub(super) goodput: Option<f64>,
    pub(super) goodput_requests: Option<usize>,
    pub(super) ttft_ms: Option<Dist>,
    pub(super) tpot_ms: Option<Dist>,
    pub(super) itl_ms: Option<Dist>,
    pub(super) e2e_ms: Option<Dist>,
}

/// The prompt tokens served from the prefix cache and their share of all prompt
/// tokens, over the requests whose server said; (None, None) when none did.
pub(super) fn cache_hits<'a>(records: impl IntoIterator<Item = &'a Record>) -> (Option<usize>, Option<f64>) {
    let (mut cached, mut prompt, mut said) = (0, 0, false);
    for r in records {
        if let Some(c) = r.cached_prompt_tokens {
            (cached, prompt, said) = (cached + c, prompt + r.input_tokens, true);
        }
    }
    if !said {
        return (None, None);
    }
    (
        Some(cached),
        Some(if prompt == 0 {
            0.0
        } else {
            cached as f64 / prompt as f64
        }),
    )
}

impl Stats {
    /// The figures of the measured `run`, after `warmup`, against the SLOs of `a`.
    pub fn new(a: &BenchArgs, warmup: WarmupReport, run: &Run) -> Stats {
        let Summary {
            ok,
            failed,
            errors,
            input_tokens,
            output_tokens,
        } = Summary::of(&run.records);
        let duration = run.elapsed.as_secs_f64();
        let slo = Slo::of(a);
        let goodput_requests = slo.any().then(|| ok.iter().filter(|r| slo.met(r)).count());
        let (cached_prompt_tokens, prefix_cache_hit_rate) = cache_hits(ok.iter().copied());
        Stats {
            output_token_count: methods(ok.iter().map(|r| r.output_count)),
            input_token_count: methods(ok.iter().map(|r| r.input_count)),
            warmup,
            completed: ok.len(),
            failed,
            errors,
            duration_s: duration,
            total_input_tokens: input_tokens,
            total_output_tokens: output_tokens,
            cached_prompt_tokens,
            prefix_cache_hit_rate,
            request_throughput: ok.len() as f64 / duration,
            output_throughput: output_tokens as f64 / duration,
            total_token_throughput: (input_tokens + output_tokens) as f64 / duration,
            goodput: goodput_requests.map(|g| g as f64 / duration),
            goodput_requests,
            slo,
            ttft_ms: dist(ok.iter().filter_map(|r| r.ttft).map(|t| t.as_secs_f64())),
            tpot_ms: dist(ok.iter().filter_map(|r| tpot(r))),
            itl_ms: dist(ok.iter().flat_map(|r| r.itl.iter().map(Duration::as_secs_f64))),
            e2e_ms: dist(ok.iter().map(|r| r.e2e.as_secs_f64())),
        }
    }

    /// Its lines of the table, from the token counts on.
    fn print_table(&self) {
        let r = self;
        let f2 = |x: f64| format!("{x:.2}");
        line(
            "Token counts (output / input):",
            format!("{} / {}", r.output_token_count, r.input_token_count),
        );
        if r.warmup.requests > 0 {
            line(
                "Warmup requests (not counted):",
                format!("{} ({} failed)", r.warmup.requests, r.warmup.failed),
            );
        }
        line("Successful requests:", r.completed.to_string());
        line("Failed requests:", r.failed.to_string());
        for e in &r.errors {
            println!("  error: {e}");
        }
        line("Benchmark duration (s):", f2(r.duration_s));
        line("Total input tokens:", r.total_input_tokens.to_string());
        line("Total output tokens:", r.total_output_tokens.to_string());
        if let (Some(c), Some(rate)) = (r.cached_prompt_tokens, r.prefix_cache_hit_rate) {
            line(
                "Prefix cache hit rate:",
                format!("{} ({c} prompt tokens)", percent(rate)),
            );
        }
        line("Request throughput (req/s):", f2(r.request_throughput));
        if let Some(g) = r.goodput {
            line("Request goodput (req/s):", f2(g));
        }
        line("Output token throughput (tok/s):", f2(r.output_throughput));
        line("Total token throughput (tok/s):", f2(r.total_token_throughput));
        for (title, short, d) in [
            ("Time to First Token", "TTFT", r.ttft_ms),
            ("Time per Output Token (excl. 1st token)", "TPOT", r.tpot_ms),
            ("Inter-token Latency", "ITL", r.itl_ms),
            ("End-to-end Latency", "E2E", r.e2e_ms),
        ] {
            println!("{:-^60}", format!(" {title} "));
            match d {
                Some(d) => {
                    line(&format!("Mean {short} (ms):"), f2(d.mean));
                    line(&format!("Median {short} (ms):"), f2(d.median));
                    line(&format!("P90 {short} (ms):"), f2(d.p90));
                    line(&format!("P99 {short} (ms):"), f2(d.p99));
                }
                None => line(&format!("{short} (ms):"), "n/a".into()),
            }
        }
    }
}

/// Prints `report`: as one JSON object with `json`, else its `table`, a line each.
pub(super) fn print_report<T: Serialize>(report: &T, json: bool, table: impl FnOnce() -> Vec<String>) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        for l in table() {
            println!("{l}");
        }
    }
    Ok(())
}

/// `num / den`, where both are known and `den` is not zero.
pub(super) fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 && n.is_finite() => Some(n / d),
        _ => None,
    }
}

/// One line of a table: its label, then its value.
pub(super) fn line(label: &str, value: String) {
    println!("{label:<40} {value}");
}

/// A fraction as a percentage.
pub(super) fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

#[derive(Serialize, Debug)]
pub struct Report {
    /// Always "independent" (a prefix-cache run has a report of its own).
    workload: &'static str,
    api: &'static str,
    target: String,
    model: Option<String>,
    concurrency: Option<usize>,
    /// A number, or "inf".
    request_rate: Option<Value>,
    num_requests: usize,
    input_len: Option<usize>,
    /// Tokens every prompt shares at its start (--shared-prefix).
    shared_prefix: Option<usize>,
    output_len: u32,
    ignore_eos: bool,
    seed: u64,
    /// Where prompts came from: random_ids, text (--prompt), corpus or dataset.
    prompts: &'static str,
    /// CPU seconds the router process spent over the measured run (from its
    /// metrics), and per 1,000 output tokens; null when its metrics cannot be had.
    router_cpu_seconds: Option<f64>,
    router_cpu_seconds_per_1k_tokens: Option<f64>,
    #[serde(flatten)]
    pub stats: Stats,
}

/// --concurrency and --request-rate as a report states them: the cap in flight, and
/// the rate as a number or "inf".
pub(super) fn load_fields(load: Load) -> (Option<usize>, Option<Value>) {
    match load {
        Load::Closed(c) => (Some(c), None),
        Load::Poisson { rate, cap } => (cap, Some(if rate.is_finite() { json!(rate) } else { json!("inf") })),
    }
}

/// How the table states a load.
pub(super) fn load_text(concurrency: Option<usize>, request_rate: Option<&Value>) -> String {
    let rate = request_rate.map(|v| match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    });
    match (rate, concurrency) {
        (Some(rate), Some(c)) => format!("Poisson, {rate} req/s, at most {c} in flight"),
        (Some(rate), None) => format!("Poisson, {rate} req/s"),
        (None, c) => format!("{} in flight", c.unwrap_or(1)),
    }
}

impl Report {
    /// The report of the measured `run`: what was asked (`a`, `load`, `seed`, `source`),
    /// of whom (`target`), and what the requests saw.
    pub fn new(
        a: &BenchArgs,
        load: Load,
        seed: u64,
        source: &Source,
        target: &Target,
        warmup: WarmupReport,
        run: &Run,
    ) -> Report {
        let (concurrency, request_rate) = load_fields(load);
        Report {
            workload: a.workload.name(),
            api: a.api.name(),
            target: target.address().to_string(),
            model: target.model.clone(),
            concurrency,
            request_rate,
            num_requests: a.num_requests(),
            input_len: source.sized().then_some(a.input_len()),
            shared_prefix: a.shared_prefix,
            output_len: a.output_len(),
            ignore_eos: !a.no_ignore_eos,
            seed,
            prompts: source.name(),
            router_cpu_seconds: None,
            router_cpu_seconds_per_1k_tokens: None,
            stats: Stats::new(a, warmup, run),
        }
    }

    /// The report with the router's CPU seconds over the run, where measured.
    pub fn with_router_cpu(mut self, seconds: Option<f64>) -> Report {
        self.router_cpu_seconds = seconds;
        let tokens = self.stats.total_output_tokens;
        self.router_cpu_seconds_per_1k_tokens = seconds.filter(|_| tokens > 0).map(|s| s * 1000.0 / tokens as f64);
        self
    }

    /// Prints the report: one JSON object with `json`, else a table.
    pub fn print(&self, json: bool) -> Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(self)?);
        } else {
            self.print_table();
        }
        Ok(())
    }

    fn print_table(&self) {
        let r = self;
        println!("{:=^60}", " Serving Benchmark Result ");
        line("API:", format!("{} ({})", r.api, r.target));
        if let Some(m) = &r.model {
            line("Model:", m.clone());
        }
        line("Load:", load_text(r.concurrency, r.request_rate.as_ref()));
        line("Seed:", r.seed.to_string());
        line("Prompts:", r.prompts.to_string());
        if let (Some(cpu), Some(per)) = (r.router_cpu_seconds, r.router_cpu_seconds_per_1k_tokens) {
            line(
                "Router CPU:",
                format!("{cpu:.2} s ({per:.3} s per 1,000 output tokens)"),
            );
        }
        r.stats.print_table();
        println!("{}", "=".repeat(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_and_order() {
        let d = dist([0.001, 0.002, 0.003, 0.004]).unwrap();
        assert!((d.mean - 2.5).abs() < 1e-9);
        assert!((d.median - 2.5).abs() < 1e-9);
        assert!((d.p90 - 3.7).abs() < 1e-9);
        assert!(d.median <= d.p90 && d.p90 <= d.p99);
        assert!(dist([]).is_none());
    }

    #[test]
    fn p99_sits_between_the_last_two() {
        let d = dist((1..=101).map(|i| i as f64 / 1000.0)).unwrap();
        assert!((d.median - 51.0).abs() < 1e-9 && (d.p99 - 100.0).abs() < 1e-9, "{d:?}");
        let d = dist([0.010, 0.020]).unwrap();
        assert!((d.p99 - 19.9).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn hit_rate_is_cached_over_prompt_tokens_of_requests_that_said() {
        let rec = |input, cached| Record {
            input_tokens: input,
            cached_prompt_tokens: cached,
            ..Default::default()
        };
        let (cached, rate) = cache_hits(&[rec(100, Some(0)), rec(100, Some(96)), rec(200, Some(144))]);
        assert_eq!(cached, Some(240));
        assert!((rate.unwrap() - 0.6).abs() < 1e-12);
        // A request whose server did not say counts in neither sum.
        let (cached, rate) = cache_hits(&[rec(100, Some(50)), rec(300, None)]);
        assert_eq!((cached, rate), (Some(50), Some(0.5)));
        assert_eq!(cache_hits(&[rec(100, None)]), (None, None));
        assert_eq!(cache_hits(&[rec(0, Some(0))]), (Some(0), Some(0.0)));
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        let r = Record {
            output_tokens: 5,
            ttft: Some(Duration::from_millis(100)),
            e2e: Duration::from_millis(500),
            ..Default::default()
        };
        assert!((tpot(&r).unwrap() - 0.1).abs() < 1e-9);
        let slo = Slo {
            ttft_ms: Some(150.0),
            tpot_ms: Some(99.0),
            e2e_ms: None,
        };
        assert!(!slo.met(&r));
    }
}
