//! Statistics and the report: a run's records summed into throughput, goodput under
//! the SLOs given and the TTFT, TPOT, ITL and end-to-end distributions, printed as a
//! table or one JSON object (what `--compare` reads back).

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
struct Dist {
    mean: f64,
    median: f64,
    p90: f64,
    p99: f64,
}

/// Linear-interpolated percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Mean and percentiles, in ms, of durations in seconds.
fn dist(secs: impl IntoIterator<Item = f64>) -> Option<Dist> {
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
struct Slo {
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
    requests: usize,
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

#[derive(Serialize, Debug)]
pub struct Report {
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
    /// How output and input tokens were counted (see `Count`).
    output_token_count: String,
    input_token_count: String,
    warmup: WarmupReport,
    pub completed: usize,
    failed: usize,
    errors: Vec<String>,
    duration_s: f64,
    total_input_tokens: usize,
    total_output_tokens: usize,
    /// Completed requests/s.
    request_throughput: f64,
    /// Output tokens/s.
    output_throughput: f64,
    /// Input plus output tokens/s.
    total_token_throughput: f64,
    slo: Slo,
    /// Completed requests meeting every SLO given, per second; null without SLOs.
    goodput: Option<f64>,
    goodput_requests: Option<usize>,
    ttft_ms: Option<Dist>,
    tpot_ms: Option<Dist>,
    itl_ms: Option<Dist>,
    e2e_ms: Option<Dist>,
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
        let (concurrency, request_rate) = match load {
            Load::Closed(c) => (Some(c), None),
            Load::Poisson { rate, cap } => (cap, Some(if rate.is_finite() { json!(rate) } else { json!("inf") })),
        };
        Report {
            api: a.api.name(),
            target: target.address().to_string(),
            model: target.model.clone(),
            concurrency,
            request_rate,
            num_requests: a.num_requests,
            input_len: source.sized().then_some(a.input_len),
            shared_prefix: a.shared_prefix,
            output_len: a.output_len,
            ignore_eos: !a.no_ignore_eos,
            seed,
            prompts: source.name(),
            output_token_count: methods(ok.iter().map(|r| r.output_count)),
            input_token_count: methods(ok.iter().map(|r| r.input_count)),
            warmup,
            completed: ok.len(),
            failed,
            errors,
            duration_s: duration,
            total_input_tokens: input_tokens,
            total_output_tokens: output_tokens,
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
        let line = |k: &str, v: String| println!("{k:<40} {v}");
        let f2 = |x: f64| format!("{x:.2}");
        println!("{:=^60}", " Serving Benchmark Result ");
        line("API:", format!("{} ({})", r.api, r.target));
        if let Some(m) = &r.model {
            line("Model:", m.clone());
        }
        let rate = r.request_rate.as_ref().map(|v| match v {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        });
        let load = match (rate, r.concurrency) {
            (Some(rate), Some(c)) => format!("Poisson, {rate} req/s, at most {c} in flight"),
            (Some(rate), None) => format!("Poisson, {rate} req/s"),
            (None, c) => format!("{} in flight", c.unwrap_or(1)),
        };
        line("Load:", load);
        line("Seed:", r.seed.to_string());
        line("Prompts:", r.prompts.to_string());
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
