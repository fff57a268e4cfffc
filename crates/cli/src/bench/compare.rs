//! `sirocco bench --compare a.json b.json ...`: one table of runs saved with `--json`,
//! a column per run, so serving systems benched under the same load read side by side.
//! Reports from before a field existed show `-` for it.

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

fn rows() -> Vec<Row> {
    let mut rows: Vec<Row> = vec![
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
    if !v.is_object() || v.get("request_throughput").is_none() {
        bail!(not_a_report());
    }
    Ok(v)
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
    let runs = paths
        .iter()
        .map(|p| {
            Ok((
                p.file_stem().unwrap_or(p.as_os_str()).to_string_lossy().into_owned(),
                load(p)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
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
}
