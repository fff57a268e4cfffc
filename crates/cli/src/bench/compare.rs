//! `sirocco bench --compare a.json b.json ...`: one table of runs saved with `--json`,
//! a column per run, so serving systems benched under the same load read side by side;
//! a prefix-cache run (`--workload shared-prefix` or `multi-turn`) is a column per
//! phase, the cache off and on, and a structured-output run (`--structured`) a column
//! per number of streams and kind of request. Reports from before a field existed
//! show `-` for it.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Reads one cell from a report; None where the report lacks the field.
type Cell = Box<dyn Fn(&Value) -> Option<String>>;
/// What each row shows: its label, and how to read it from a report.
type Row = (String, Cell);

fn text(key: &'static str) -> Cell {
    Box::new(move |r| match &r[key] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        v => Some(v.to_string()),
    })
}

fn number(key: &'static str, sub: Option<&'static str>) -> Cell {
    Box::new(move |r| {
        let v = sub.map_or(&r[key], |s| &r[key][s]);
        v.as_f64().map(|x| format!("{x:.2}"))
    })
}

fn percent(key: &'static str) -> Cell {
    Box::new(move |r| r[key].as_f64().map(|x| format!("{:.1}%", x * 100.0)))
}

fn rows() -> Vec<Row> {
    let mut rows: Vec<Row> = vec![
        ("Workload".into(), text("workload")),
        ("Prefix cache".into(), text("cache")),
        ("Structured output".into(), text("requests")),
        ("API".into(), text("api")),
        ("Target".into(), text("target")),
        ("Model".into(), text("model")),
        ("Seed".into(), text("seed")),
        ("Prompts".into(), text("prompts")),
        ("Output token count".into(), text("output_token_count")),
        ("Successful requests".into(), text("completed")),
        ("Failed requests".into(), text("failed")),
        ("Request throughput (req/s)".into(), number("request_throughput", None)),
        ("Request goodput (req/s)".into(), number("goodput", None)),
        (
            "Output token throughput (tok/s)".into(),
            number("output_throughput", None),
        ),
        ("Prefix cache hit rate".into(), percent("prefix_cache_hit_rate")),
    ];
    for (key, short) in [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL")] {
        for (q, name) in [("median", "P50"), ("p90", "P90"), ("p99", "P99")] {
            rows.push((format!("{name} {short} (ms)"), number(key, Some(q))));
        }
    }
    rows
}

fn load(path: &Path) -> Result<Value> {
    let not_a_report = || format!("{} is not a report saved with `sirocco bench --json`", path.display());
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(not_a_report)?;
    let is_report = |v: &Value| v.is_object() && v.get("request_throughput").is_some();
    let structured = |v: &Value| {
        v["runs"]
            .as_array()
            .is_some_and(|runs| runs.iter().all(|r| SIDES.iter().all(|(key, _)| is_report(&r[key]))))
    };
    if !is_report(&v) && !PHASES.iter().all(|(key, _)| is_report(&v[key])) && !structured(&v) {
        bail!(not_a_report());
    }
    Ok(v)
}

/// The phases of a prefix-cache report: their keys and what their columns say.
const PHASES: [(&str, &str); 2] = [("cache_off", "off"), ("cache_on", "on")];

/// The kinds of request of a structured-output report's runs: their keys and what
/// their columns say.
const SIDES: [(&str, &str); 4] = [
    ("unconstrained", "unconstrained"),
    ("constrained", "constrained"),
    ("mixed_constrained", "mixed, constrained"),
    ("mixed_unconstrained", "mixed, unconstrained"),
];

/// The columns of one report named `name`: itself, a prefix-cache report's phases or a
/// structured-output report's kinds of request at each number of streams, each with
/// the fields they share.
fn columns(name: String, report: Value) -> Vec<(String, Value)> {
    let Value::Object(mut shared) = report else {
        return vec![(name, report)];
    };
    if let Some(Value::Array(runs)) = shared.remove("runs") {
        let mut out = Vec::new();
        for run in runs {
            let streams = run["streams"].as_u64().unwrap_or(0);
            for (key, kind) in SIDES {
                let mut column = shared.clone();
                if let Value::Object(fields) = &run[key] {
                    column.extend(fields.clone());
                }
                column.insert("concurrency".into(), streams.into());
                column.insert("requests".into(), Value::String(kind.into()));
                out.push((format!("{name} ({streams}, {kind})"), Value::Object(column)));
            }
        }
        return out;
    }
    let phases: Vec<_> = PHASES
        .iter()
        .filter_map(|(key, cache)| Some((shared.remove(*key)?, cache)))
        .collect();
    if phases.is_empty() {
        return vec![(name, Value::Object(shared))];
    }
    phases
        .into_iter()
        .map(|(phase, cache)| {
            let mut column = shared.clone();
            if let Value::Object(fields) = phase {
                column.extend(fields);
            }
            column.insert("cache".into(), Value::String((*cache).into()));
            (format!("{name} ({cache})"), Value::Object(column))
        })
        .collect()
}

/// The table as lines; columns are the runs, headed by their file names.
fn table(runs: &[(String, Value)]) -> Vec<String> {
    let rows = rows();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(_, get)| runs.iter().map(|(_, r)| get(r).unwrap_or_else(|| "-".into())).collect())
        .collect();
    let label_w = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let widths: Vec<usize> = runs
        .iter()
        .enumerate()
        .map(|(i, (name, _))| cells.iter().map(|c| c[i].len()).chain([name.len()]).max().unwrap_or(0))
        .collect();
    let line = |label: &str, values: &[String]| {
        let mut s = format!("{label:<label_w$}");
        for (v, w) in values.iter().zip(&widths) {
            s.push_str(&format!("  {v:>w$}"));
        }
        s
    };
    let names: Vec<String> = runs.iter().map(|(n, _)| n.clone()).collect();
    let mut out = vec![line("", &names)];
    out.extend(rows.iter().zip(&cells).map(|((label, _), c)| line(label, c)));
    out
}

pub fn print(paths: &[PathBuf]) -> Result<()> {
    let mut runs = Vec::new();
    for p in paths {
        let name = p.file_stem().unwrap_or(p.as_os_str()).to_string_lossy().into_owned();
        runs.extend(columns(name, load(p)?));
    }
    for l in table(&runs) {
        println!("{l}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn old_reports_show_dashes_for_new_fields() {
        let old = json!({"api": "grpc", "request_throughput": 2.0, "ttft_ms": {"median": 1.5}});
        let new = json!({"api": "openai", "request_throughput": 3.25, "output_token_count": "usage", "goodput": 1.0});
        let t = table(&[("old".into(), old), ("new".into(), new)]);
        assert!(t[0].contains("old") && t[0].contains("new"));
        let row = |label: &str| t.iter().find(|l| l.starts_with(label)).unwrap().clone();
        assert!(row("Request throughput").ends_with("2.00    3.25"), "{t:#?}");
        assert!(row("Output token count").contains('-'), "{t:#?}");
        assert!(row("P50 TTFT").contains("1.50"), "{t:#?}");
    }

    #[test]
    fn a_prefix_cache_run_is_a_column_per_phase() {
        let cache = json!({
            "workload": "multi-turn", "api": "grpc", "seed": 7,
            "cache_off": {"request_throughput": 1.0, "prefix_cache_hit_rate": 0.0, "ttft_ms": {"median": 90.0}},
            "cache_on": {"request_throughput": 2.0, "prefix_cache_hit_rate": 0.875, "ttft_ms": {"median": 30.0}},
        });
        let plain = json!({"api": "grpc", "request_throughput": 3.0});
        let mut runs = columns("mt".into(), cache);
        runs.extend(columns("plain".into(), plain));
        let t = table(&runs);
        let row = |label: &str| t.iter().find(|l| l.starts_with(label)).unwrap().clone();
        assert!(
            t[0].contains("mt (off)") && t[0].contains("mt (on)") && t[0].contains("plain"),
            "{t:#?}"
        );
        let cells =
            |label: &str| -> Vec<String> { row(label).split_whitespace().rev().take(3).map(String::from).collect() };
        assert_eq!(cells("Request throughput"), ["3.00", "2.00", "1.00"], "{t:#?}");
        assert!(row("Prefix cache hit rate").contains("87.5%"), "{t:#?}");
        assert!(
            row("Prefix cache ").contains("off") && row("Workload").ends_with('-'),
            "{t:#?}"
        );
        assert!(row("Seed").contains('7') && row("P50 TTFT").contains("30.00"), "{t:#?}");
    }

    #[test]
    fn a_structured_run_is_a_column_per_streams_and_kind_of_request() {
        let side = |tpot: f64| json!({"request_throughput": 1.0, "tpot_ms": {"median": tpot}});
        let run = |streams: u64, base: f64| {
            json!({
                "streams": streams,
                "unconstrained": side(base),
                "constrained": side(base + 1.0),
                "mixed_constrained": side(base + 2.0),
                "mixed_unconstrained": side(base + 3.0),
            })
        };
        let report = json!({"workload": "structured", "seed": 7, "runs": [run(1, 10.0), run(16, 20.0)]});
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, report.to_string()).unwrap();
        let runs = columns("s".into(), load(&path).unwrap());
        let names: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 8);
        assert_eq!(names[1], "s (1, constrained)");
        assert_eq!(names[7], "s (16, mixed, unconstrained)");
        let t = table(&runs);
        let row = |label: &str| t.iter().find(|l| l.starts_with(label)).unwrap().clone();
        let last: Vec<String> = row("P50 TPOT")
            .split_whitespace()
            .rev()
            .take(4)
            .map(String::from)
            .collect();
        assert_eq!(last, ["23.00", "22.00", "21.00", "20.00"], "{t:#?}");
        assert!(row("Structured output").contains("mixed, constrained"), "{t:#?}");
        assert!(row("Seed").contains('7'), "{t:#?}");
    }
}
