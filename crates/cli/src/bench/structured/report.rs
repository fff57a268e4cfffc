//! A structured-output run's report: what was asked, then at each number of streams
//! the figures of the constrained, unconstrained and mixed phases (the mixed one
//! split into its constrained and unconstrained halves), the checks of the
//! constrained outputs, the router's mask time where it exports it, and the TPOT
//! ratios that say what masks cost; printed as a table a block per number of
//! streams, or as one JSON object whose phases `--compare` shows as columns.

use super::schema::Schema;
use crate::bench::driver::Run;
use crate::bench::record::{Finish, Record};
use crate::bench::report::{percent, print_report, ratio, Dist, Stats, WarmupReport};
use crate::bench::target::Target;
use crate::bench::workload::Source;
use crate::bench::BenchArgs;
use anyhow::Result;
use serde::Serialize;

/// The time the router spent computing masks during a phase, from its histogram.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct MaskTime {
    pub seconds: f64,
    /// Observations of the histogram: the steps that computed masks (one per step,
    /// for all of its constrained sequences, as the router counts them).
    pub computations: f64,
    /// seconds over computations, in ms.
    pub ms_per_computation: Option<f64>,
    /// seconds over the phase's constrained output tokens, in ms.
    pub ms_per_token: Option<f64>,
}

impl MaskTime {
    /// What the histogram's (sum, count) gained between `before` and `after`; None
    /// unless both were read.
    pub fn between(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<MaskTime> {
        let ((s0, c0), (s1, c1)) = (before?, after?);
        Some(MaskTime::of((s1 - s0).max(0.0), (c1 - c0).max(0.0)))
    }

    fn of(seconds: f64, computations: f64) -> MaskTime {
        MaskTime {
            seconds,
            computations,
            ms_per_computation: (computations > 0.0).then(|| seconds * 1000.0 / computations),
            ms_per_token: None,
        }
    }

    /// The two together: `self` and a later phase of the same kind.
    pub fn add(self, more: MaskTime) -> MaskTime {
        MaskTime::of(self.seconds + more.seconds, self.computations + more.computations)
    }

    /// Itself, per token of `tokens` constrained output tokens.
    fn per(self, tokens: usize) -> MaskTime {
        MaskTime {
            ms_per_token: (tokens > 0).then(|| self.seconds * 1000.0 / tokens as f64),
            ..self
        }
    }
}

/// One kind of request in one phase: all of a constrained or unconstrained phase, or
/// a half of the mixed one.
#[derive(Serialize, Debug)]
pub struct Side {
    #[serde(flatten)]
    stats: Stats,
    /// Mean output tokens of the successful requests.
    mean_output_tokens: Option<f64>,
    /// Constrained requests: the share of the successful ones whose output parsed as
    /// JSON and ended by completion (not at max_new_tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    json_complete: Option<f64>,
    /// ... whose output parsed as JSON, and whose generation ended by completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    json_parsed: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_complete: Option<f64>,
    /// ... whose output matches the schema; null where it cannot be checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_valid: Option<Option<f64>>,
    /// Constrained requests: the router's mask time over the phase; null where its
    /// metrics do not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<Option<MaskTime>>,
}

impl Side {
    /// The figures of `run`, whose requests were constrained by `schema` or not; `mask`
    /// is the phase's mask time.
    fn new(a: &BenchArgs, run: &Run, schema: Option<&Schema>, mask: Option<MaskTime>) -> Side {
        let stats = Stats::new(a, WarmupReport::none(), run);
        let ok: Vec<&Record> = run.records.iter().filter(|r| r.error.is_none()).collect();
        let tokens = ok.iter().map(|r| r.output_tokens).sum::<usize>();
        let mut side = Side {
            mean_output_tokens: (!ok.is_empty()).then(|| tokens as f64 / ok.len() as f64),
            json_complete: None,
            json_parsed: None,
            finished_complete: None,
            schema_valid: None,
            mask: schema.map(|_| mask.map(|m| m.per(tokens))),
            stats,
        };
        let Some(schema) = schema.filter(|_| !ok.is_empty()) else {
            return side;
        };
        let checks: Vec<Checked> = ok.iter().map(|r| Checked::of(r, schema)).collect();
        let share = |f: fn(&Checked) -> bool| checks.iter().filter(|c| f(c)).count() as f64 / checks.len() as f64;
        side.json_complete = Some(share(|c| c.parsed && c.complete));
        side.json_parsed = Some(share(|c| c.parsed));
        side.finished_complete = Some(share(|c| c.complete));
        let checkable = checks.iter().all(|c| c.valid.is_some());
        side.schema_valid = Some(checkable.then(|| share(|c| c.valid == Some(true))));
        side
    }

    fn tpot(&self) -> Option<Dist> {
        self.stats.tpot_ms
    }
}

/// What a constrained output was found to be.
struct Checked {
    parsed: bool,
    /// Whether it matches the schema; None where that cannot be checked.
    valid: Option<bool>,
    /// Whether its generation ended by completion, not at max_new_tokens.
    complete: bool,
}

impl Checked {
    fn of(r: &Record, schema: &Schema) -> Checked {
        let (parsed, valid) = schema.check(&r.text);
        Checked {
            parsed,
            valid,
            complete: r.finish == Some(Finish::Complete),
        }
    }
}

/// `run` split into its constrained and its unconstrained requests, each over the
/// whole run's time.
fn split(run: Run) -> (Run, Run) {
    let (c, u): (Vec<Record>, Vec<Record>) = run.records.into_iter().partition(|r| r.constrained);
    let part = |records| Run {
        records,
        elapsed: run.elapsed,
    };
    (part(c), part(u))
}

/// `num / den - 1`: how much more `num` is, where both are known.
fn overhead(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    ratio(num, den).map(|r| r - 1.0)
}

/// The phases at one number of streams.
#[derive(Serialize, Debug)]
pub struct StreamsRun {
    streams: usize,
    /// Requests per phase.
    num_requests: usize,
    /// The median max_new_tokens of the unconstrained requests: each asks for the
    /// output length of the constrained request of its number (in the first round).
    unconstrained_output_len: u32,
    constrained: Side,
    unconstrained: Side,
    mixed_constrained: Side,
    mixed_unconstrained: Side,
    /// Output tokens/s of the whole mixed phase.
    mixed_output_throughput: f64,
    /// Median TPOT constrained over unconstrained, minus 1: what masks add.
    mask_overhead: Option<f64>,
    /// The same at p99.
    mask_overhead_p99: Option<f64>,
    /// Median TPOT of the mixed batch's unconstrained half over the unconstrained
    /// phase's, minus 1: what an unconstrained request pays for constrained neighbours.
    mixed_unconstrained_overhead: Option<f64>,
    /// The constrained phase's mask time per step over its median TPOT: what masks
    /// add to a step where they are computed before it, measured within the phase
    /// (so unaffected by the machine's speed drifting between phases).
    mask_step_share: Option<f64>,
}

impl StreamsRun {
    /// The report at `streams` of the constrained, unconstrained and mixed phases, each
    /// with the mask time read around it.
    pub fn new(
        a: &BenchArgs,
        schema: &Schema,
        streams: usize,
        num_requests: usize,
        unconstrained_output_len: u32,
        [(constrained, c_mask), (unconstrained, _), (mixed, m_mask)]: [(Run, Option<MaskTime>); 3],
    ) -> StreamsRun {
        let mixed_tokens: usize = mixed
            .records
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| r.output_tokens)
            .sum();
        let mixed_output_throughput = mixed_tokens as f64 / mixed.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let (mixed_c, mixed_u) = split(mixed);
        let constrained = Side::new(a, &constrained, Some(schema), c_mask);
        let unconstrained = Side::new(a, &unconstrained, None, None);
        let mixed_constrained = Side::new(a, &mixed_c, Some(schema), m_mask);
        let mixed_unconstrained = Side::new(a, &mixed_u, None, None);
        let q = |s: &Side, f: fn(&Dist) -> f64| s.tpot().map(|d| f(&d));
        let per_step = constrained.mask.flatten().and_then(|m| m.ms_per_computation);
        StreamsRun {
            mask_step_share: ratio(per_step, q(&constrained, |d| d.median)),
            streams,
            num_requests,
            unconstrained_output_len,
            mask_overhead: overhead(q(&constrained, |d| d.median), q(&unconstrained, |d| d.median)),
            mask_overhead_p99: overhead(q(&constrained, |d| d.p99), q(&unconstrained, |d| d.p99)),
            mixed_unconstrained_overhead: overhead(
                q(&mixed_unconstrained, |d| d.median),
                q(&unconstrained, |d| d.median),
            ),
            mixed_output_throughput,
            constrained,
            unconstrained,
            mixed_constrained,
            mixed_unconstrained,
        }
    }

    /// Its sides in the table's order, with their column heads and names.
    fn sides(&self) -> [(&'static str, &'static str, &Side); 4] {
        [
            ("unconstr.", "unconstrained", &self.unconstrained),
            ("constr.", "constrained", &self.constrained),
            ("mixed: c.", "mixed, constrained", &self.mixed_constrained),
            ("mixed: u.", "mixed, unconstrained", &self.mixed_unconstrained),
        ]
    }

    /// Its block of the table.
    fn table(&self) -> Vec<String> {
        let sides = self.sides();
        let cells = |k: &str, values: [String; 4]| {
            let cells: String = values.iter().map(|v| format!(" {v:>10}")).collect();
            format!("{k:<40}{cells}").trim_end().to_string()
        };
        let row = |k: &str, get: &dyn Fn(&Side) -> String| cells(k, sides.map(|(_, _, s)| get(s)));
        let f2 = |x: f64| format!("{x:.2}");
        let ms = |d: Option<Dist>, q: fn(&Dist) -> f64| d.as_ref().map_or("n/a".into(), |d| f2(q(d)));
        let share = |x: Option<f64>| x.map_or("-".into(), percent);
        let times = |x: Option<f64>| x.map_or("n/a".into(), |x| format!("{:.3}x ({:+.1}%)", 1.0 + x, x * 100.0));
        let plural = if self.streams == 1 { "" } else { "s" };
        let mut out = vec![format!("{:-^84}", format!(" {} stream{plural} ", self.streams))];
        out.push(cells("", sides.map(|(head, _, _)| head.to_string())));
        out.extend([
            row("Successful / failed requests:", &|s| {
                format!("{}/{}", s.stats.completed, s.stats.failed)
            }),
            row("Mean output tokens:", &|s| {
                s.mean_output_tokens.map_or("n/a".into(), |x| format!("{x:.1}"))
            }),
            row("Output token throughput (tok/s):", &|s| f2(s.stats.output_throughput)),
            row("Median TPOT (ms):", &|s| ms(s.tpot(), |d| d.median)),
            row("P99 TPOT (ms):", &|s| ms(s.tpot(), |d| d.p99)),
            row("Median TTFT (ms):", &|s| ms(s.stats.ttft_ms, |d| d.median)),
            row("JSON and complete:", &|s| share(s.json_complete)),
            row("Matches the schema:", &|s| match s.schema_valid {
                None => "-".into(),
                Some(v) => v.map_or("n/a".into(), percent),
            }),
            row("Mask time per token (ms):", &|s| match s.mask {
                None => "-".into(),
                Some(m) => m
                    .and_then(|m| m.ms_per_token)
                    .map_or("n/a".into(), |x| format!("{x:.3}")),
            }),
        ]);
        out.push(line_text(
            "Unconstrained max_new_tokens:",
            format!(
                "{} (median; each the constrained one's of its number)",
                self.unconstrained_output_len
            ),
        ));
        out.push(line_text(
            "Mixed output throughput (tok/s):",
            f2(self.mixed_output_throughput),
        ));
        out.push(line_text(
            "TPOT p50, constrained / unconstrained:",
            times(self.mask_overhead),
        ));
        out.push(line_text(
            "TPOT p99, constrained / unconstrained:",
            times(self.mask_overhead_p99),
        ));
        out.push(line_text(
            "TPOT p50, mixed unconstr. / unconstr.:",
            times(self.mixed_unconstrained_overhead),
        ));
        out.push(line_text(
            "Mask time per step / TPOT p50 (constr.):",
            self.mask_step_share.map_or("n/a".into(), percent),
        ));
        for (_, name, s) in sides {
            out.extend(s.stats.errors.iter().map(|e| format!("  error ({name}): {e}")));
        }
        out
    }
}

/// A line of the table as text: its label, then its value.
fn line_text(label: &str, value: String) -> String {
    format!("{label:<40} {value}")
}

#[derive(Serialize, Debug)]
pub struct StructuredReport {
    /// Always "structured".
    workload: &'static str,
    /// What constrained the outputs: "json-schema".
    structured: &'static str,
    /// "built-in", or the --schema file.
    schema: String,
    api: &'static str,
    target: String,
    model: Option<String>,
    input_len: Option<usize>,
    /// max_new_tokens of the constrained requests.
    output_len: u32,
    /// Whether the unconstrained requests ignored EOS.
    ignore_eos: bool,
    seed: u64,
    prompts: &'static str,
    warmup: WarmupReport,
    runs: Vec<StreamsRun>,
}

impl StructuredReport {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        a: &BenchArgs,
        structured: &'static str,
        schema: &str,
        source: &Source,
        target: &Target,
        seed: u64,
        warmup: WarmupReport,
        runs: Vec<StreamsRun>,
    ) -> StructuredReport {
        StructuredReport {
            workload: "structured",
            structured,
            schema: schema.to_string(),
            api: a.api.name(),
            target: target.address().to_string(),
            model: target.model.clone(),
            input_len: source.sized().then_some(a.input_len()),
            output_len: a.output_len(),
            ignore_eos: !a.no_ignore_eos,
            seed,
            prompts: source.name(),
            warmup,
            runs,
        }
    }

    /// The first phase in which no request succeeded, if any: its streams and name.
    pub fn empty_phase(&self) -> Option<(usize, &'static str)> {
        self.runs.iter().find_map(|r| {
            [
                ("constrained", r.constrained.stats.completed),
                ("unconstrained", r.unconstrained.stats.completed),
                (
                    "mixed",
                    r.mixed_constrained.stats.completed + r.mixed_unconstrained.stats.completed,
                ),
            ]
            .into_iter()
            .find(|(_, n)| *n == 0)
            .map(|(name, _)| (r.streams, name))
        })
    }

    /// Prints the report: one JSON object with `json`, else a table.
    pub fn print(&self, json: bool) -> Result<()> {
        print_report(self, json, || self.table())
    }

    /// The table, a line each: the header, then a block per number of streams.
    fn table(&self) -> Vec<String> {
        let mut out = vec![format!(
            "{:=^84}",
            format!(" Structured Output Benchmark ({}) ", self.structured)
        )];
        out.push(line_text("API:", format!("{} ({})", self.api, self.target)));
        if let Some(m) = &self.model {
            out.push(line_text("Model:", m.clone()));
        }
        out.push(line_text("Schema:", self.schema.clone()));
        let prompts = match self.input_len {
            Some(n) => format!("{}, {n} tokens", self.prompts),
            None => self.prompts.to_string(),
        };
        out.push(line_text("Prompts:", prompts));
        out.push(line_text("Constrained max_new_tokens:", self.output_len.to_string()));
        out.push(line_text("Seed:", self.seed.to_string()));
        if self.warmup.requests > 0 {
            out.push(line_text(
                "Warmup requests (not counted):",
                self.warmup.requests.to_string(),
            ));
        }
        for r in &self.runs {
            out.extend(r.table());
        }
        out.push("=".repeat(84));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tests::args;
    use std::time::Duration;

    /// A request of `tokens` tokens, 10 ms apart after a 50 ms first; a constrained one
    /// streamed `text` and ended as `finish`.
    fn rec(tokens: usize, constrained: Option<(&str, Finish)>) -> Record {
        Record {
            output_tokens: tokens,
            ttft: Some(Duration::from_millis(50)),
            e2e: Duration::from_millis(50 + 10 * (tokens as u64 - 1)),
            constrained: constrained.is_some(),
            text: constrained.map_or(String::new(), |(t, _)| t.into()),
            finish: Some(constrained.map_or(Finish::Length, |(_, f)| f)),
            ..Default::default()
        }
    }

    fn run(records: Vec<Record>) -> Run {
        Run {
            records,
            elapsed: Duration::from_secs(2),
        }
    }

    #[test]
    fn sides_split_the_mixed_phase_check_outputs_and_compare_tpot() {
        let a = args(&["--structured", "json-schema"]);
        let json = |f| Some(("{\"ok\": true}", f));
        // Constrained TPOT 11 ms: the same gaps, stretched a tenth.
        let slow = |tokens: usize, c| Record {
            e2e: Duration::from_millis(50 + 11 * (tokens as u64 - 1)),
            ..rec(tokens, c)
        };
        let constrained = run(vec![
            slow(21, json(Finish::Complete)),
            slow(21, Some(("{\"ok\": tr", Finish::Length))),
            slow(21, json(Finish::Complete)),
            slow(21, Some(("{\"ok\": true}", Finish::Length))),
        ]);
        let unconstrained = run((0..4).map(|_| rec(21, None)).collect());
        let mixed = run(vec![
            slow(21, json(Finish::Complete)),
            rec(21, None),
            rec(21, None),
            Record {
                error: Some("boom".into()),
                ..rec(2, json(Finish::Complete))
            },
        ]);
        let mask = MaskTime::between(Some((1.0, 10.0)), Some((1.084, 94.0)));
        let schema = r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}"#;
        let schema = super::super::schema::parse(schema, "ok.json".into()).unwrap();
        let phases = [(constrained, mask), (unconstrained, None), (mixed, None)];
        let r = StreamsRun::new(&a, &schema, 16, 4, 21, phases);
        assert_eq!(r.constrained.json_complete, Some(0.5));
        assert_eq!(r.constrained.json_parsed, Some(0.75));
        assert_eq!(r.constrained.finished_complete, Some(0.5));
        assert_eq!(r.constrained.schema_valid, Some(Some(0.75)));
        assert_eq!(r.unconstrained.schema_valid, None);
        assert_eq!(r.unconstrained.json_complete, None);
        // The failed request was constrained: it counts on that side, not in the checks.
        assert_eq!(
            (r.mixed_constrained.stats.completed, r.mixed_constrained.stats.failed),
            (1, 1)
        );
        assert_eq!(r.mixed_constrained.json_complete, Some(1.0));
        assert_eq!(r.mixed_unconstrained.stats.completed, 2);
        assert!((r.mask_overhead.unwrap() - 0.1).abs() < 1e-9, "{r:?}");
        assert!(r.mixed_unconstrained_overhead.unwrap().abs() < 1e-9, "{r:?}");
        assert!((r.mixed_output_throughput - 63.0 / 2.0).abs() < 1e-9);
        // 84 ms over 84 constrained tokens; over 84 masks.
        let m = r.constrained.mask.flatten().unwrap();
        assert!((m.ms_per_token.unwrap() - 1.0).abs() < 1e-9 && (m.ms_per_computation.unwrap() - 1.0).abs() < 1e-9);
        assert!(matches!(r.mixed_constrained.mask, Some(None)));

        let t = r.table();
        let row = |label: &str| {
            t.iter()
                .find(|l| l.starts_with(label))
                .unwrap_or_else(|| panic!("no {label}: {t:#?}"))
                .clone()
        };
        assert!(t[0].contains(" 16 streams "), "{t:#?}");
        assert!(t[1].ends_with("unconstr.    constr.  mixed: c.  mixed: u."), "{t:#?}");
        assert!(
            row("Median TPOT").ends_with("10.00      11.00      11.00      10.00"),
            "{t:#?}"
        );
        assert!(
            row("JSON and complete").ends_with("-      50.0%     100.0%          -"),
            "{t:#?}"
        );
        assert!(
            row("Mask time per token").ends_with("-      1.000        n/a          -"),
            "{t:#?}"
        );
        assert!(
            row("TPOT p50, constrained / unconstrained").ends_with("1.100x (+10.0%)"),
            "{t:#?}"
        );
        assert!(row("  error (mixed, constrained): boom").len() > 10, "{t:#?}");
    }
}
