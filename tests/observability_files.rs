//! The operator-facing observability files under deploy/ are valid and agree with the
//! metrics sirocco exports:
//!
//! - deploy/prometheus/alerts.yml passes `promtool check rules`, its unit tests
//!   (alerts_test.yml) pass `promtool test rules`, and scrape-example.yml passes
//!   `promtool check config`;
//! - every query of deploy/grafana/sirocco-dashboard.json, panels nested in rows
//!   included, parses as PromQL once Grafana's variables are replaced (each becomes a
//!   recording rule in a scratch rules file that `promtool check rules` reads), uses the
//!   `datasource` variable, and the panels cover throughput, latency, queue, KV cache
//!   and replica health;
//! - every `sirocco_*` metric named in those files, and every value they give the
//!   `outcome`, `finish_reason` and `kind` labels, is one that sirocco exports, so a
//!   typo fails here rather than leaving a panel empty or an alert silent.
//!
//! These tests need `promtool`, from Debian's `prometheus` package (or the `PROMTOOL`
//! environment variable naming the binary).

use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Counters sirocco exports (router and shards).
const COUNTERS: &[&str] = &[
    "sirocco_requests_total",
    "sirocco_prompt_tokens_total",
    "sirocco_generated_tokens_total",
    "sirocco_replica_failures_total",
    "sirocco_readmitted_requests_total",
    "sirocco_preempted_requests_total",
    "sirocco_process_cpu_seconds_total",
    "sirocco_prefix_cache_queried_tokens_total",
    "sirocco_prefix_cache_hit_tokens_total",
    "sirocco_shard_prefix_cache_evictions_total",
    "sirocco_structured_requests_total",
];

/// Gauges sirocco exports.
const GAUGES: &[&str] = &[
    "sirocco_queue_depth",
    "sirocco_running_sequences",
    "sirocco_ready_replicas",
    "sirocco_build_info",
    "sirocco_shard_kv_tokens_used",
    "sirocco_shard_kv_tokens_capacity",
    "sirocco_shard_kv_blocks_used",
    "sirocco_shard_kv_wrapped_sequences",
    "sirocco_shard_sequences",
    "sirocco_shard_model_load_seconds",
    "sirocco_shard_prefix_cache_blocks",
];

/// Histograms sirocco exports; each is the series `_bucket`, `_sum` and `_count`.
const HISTOGRAMS: &[&str] = &[
    "sirocco_time_to_first_token_seconds",
    "sirocco_inter_token_latency_seconds",
    "sirocco_request_duration_seconds",
    "sirocco_queue_time_seconds",
    "sirocco_request_prompt_tokens",
    "sirocco_request_generated_tokens",
    "sirocco_batch_size",
    "sirocco_step_tokens",
    "sirocco_shard_step_duration_seconds",
    "sirocco_shard_allreduce_duration_seconds",
    "sirocco_structured_compile_seconds",
    "sirocco_structured_mask_seconds",
];

/// The values sirocco gives its enumerated labels.
const LABEL_VALUES: &[(&str, &[&str])] = &[
    (
        "outcome",
        &[
            "success",
            "invalid_argument",
            "resource_exhausted",
            "unavailable",
            "cancelled",
            "deadline_exceeded",
            "internal",
        ],
    ),
    (
        "finish_reason",
        &["length", "eos", "stop_sequence", "cancelled", "none"],
    ),
    (
        "kind",
        &["prefill", "decode", "json_schema", "regex", "choice", "grammar"],
    ),
];

/// Series the dashboard must query: throughput, TTFT, ITL, queue, KV cache, replica
/// health and the shards' step and collective times.
const DASHBOARD_MUST_QUERY: &[&str] = &[
    "sirocco_requests_total",
    "sirocco_generated_tokens_total",
    "sirocco_prompt_tokens_total",
    "sirocco_time_to_first_token_seconds_bucket",
    "sirocco_inter_token_latency_seconds_bucket",
    "sirocco_request_duration_seconds_bucket",
    "sirocco_queue_depth",
    "sirocco_running_sequences",
    "sirocco_queue_time_seconds_bucket",
    "sirocco_shard_kv_tokens_used",
    "sirocco_shard_kv_tokens_capacity",
    "sirocco_shard_kv_wrapped_sequences",
    "sirocco_ready_replicas",
    "sirocco_replica_failures_total",
    "sirocco_readmitted_requests_total",
    "sirocco_shard_step_duration_seconds_bucket",
    "sirocco_shard_allreduce_duration_seconds_bucket",
    "sirocco_prefix_cache_hit_tokens_total",
    "sirocco_prefix_cache_queried_tokens_total",
    "sirocco_shard_prefix_cache_blocks",
    "sirocco_shard_prefix_cache_evictions_total",
    "sirocco_structured_requests_total",
    "sirocco_structured_mask_seconds_bucket",
];

/// Alerts operators rely on by name.
const REQUIRED_ALERTS: &[&str] = &[
    "SiroccoNoReadyReplica",
    "SiroccoTTFTHighP99",
    "SiroccoKVCacheNearlyFull",
];

/// What Grafana's built-in variables stand for when a query is checked.
const BUILTIN_VARIABLES: &[(&str, &str)] = &[
    ("__rate_interval", "5m"),
    ("__interval", "1m"),
    ("__interval_ms", "60000"),
    ("__range", "1h"),
    ("__range_s", "3600"),
    ("__range_ms", "3600000"),
];

const DASHBOARD: &str = "deploy/grafana/sirocco-dashboard.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yml";
const SCRAPE_EXAMPLE: &str = "deploy/prometheus/scrape-example.yml";

fn repo_root() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .canonicalize()
        .expect("repository root")
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs promtool in the repository root and panics with its output unless it succeeds.
fn promtool(args: &[&str]) {
    let bin = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_string());
    let out = match Command::new(&bin).args(args).current_dir(repo_root()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{bin}` not found: these tests need promtool; install Debian's `prometheus` package \
             (sudo apt-get install prometheus) or set PROMTOOL to the binary"
        ),
        Err(e) => panic!("running `{bin}`: {e}"),
    };
    assert!(
        out.status.success(),
        "`promtool {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every series name sirocco exports, histograms' `_bucket`, `_sum` and `_count` included.
fn exported_series() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = COUNTERS.iter().chain(GAUGES).map(|s| s.to_string()).collect();
    for h in HISTOGRAMS {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{h}{suffix}"));
        }
    }
    names
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The identifiers in `text` that start with `sirocco_`.
fn sirocco_identifiers(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("sirocco_") {
        if text[..i].chars().next_back().is_some_and(is_ident_char) {
            continue;
        }
        let end = text[i..].find(|c| !is_ident_char(c)).map_or(text.len(), |n| i + n);
        found.insert(text[i..end].to_string());
    }
    found
}

/// The values that label matchers in `text` give `label`: `label="v"`, `label!="v"`, and
/// the literal alternatives of `label=~"a|b"` and `label!~"a|b"`.
fn label_matcher_values(text: &str, label: &str) -> Vec<String> {
    let mut values = Vec::new();
    for (i, _) in text.match_indices(label) {
        if text[..i].chars().next_back().is_some_and(is_ident_char) {
            continue;
        }
        let rest = text[i + label.len()..].trim_start();
        let Some(op) = ["=~", "!~", "!=", "="].into_iter().find(|op| rest.starts_with(op)) else {
            continue;
        };
        let rest = rest[op.len()..].trim_start();
        let Some(quoted) = rest.strip_prefix('"') else {
            continue;
        };
        let value = &quoted[..quoted.find('"').unwrap_or(quoted.len())];
        if op.ends_with('~') {
            let is_literal = |v: &&str| !v.contains(|c| ".*+?()[]{}^$\\".contains(c));
            values.extend(value.split('|').filter(is_literal).map(str::to_string));
        } else {
            values.push(value.to_string());
        }
    }
    values
}

/// Replaces Grafana's variables in `expr` (`$name`, `${name}`, `${name:format}`,
/// `[[name]]`) with stand-ins: built-in intervals become durations, the dashboard's own
/// variables (`template_vars`) the regex `.*`. An unknown variable is an error.
fn substitute_variables(expr: &str, template_vars: &BTreeSet<String>) -> Result<String, String> {
    let builtins: HashMap<&str, &str> = BUILTIN_VARIABLES.iter().copied().collect();
    let value_of = |name: &str| -> Result<&str, String> {
        if let Some(v) = builtins.get(name) {
            Ok(v)
        } else if template_vars.contains(name) {
            Ok(".*")
        } else {
            Err(format!("unknown variable `{name}` in `{expr}`"))
        }
    };
    let mut out = String::new();
    let mut rest = expr;
    loop {
        let Some(start) = rest.find(['$', '[']) else {
            out.push_str(rest);
            return Ok(out);
        };
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let (name, len) = if let Some(braced) = tail.strip_prefix("${") {
            let close = braced.find('}').ok_or_else(|| format!("unclosed `${{` in `{expr}`"))?;
            let inner = &braced[..close];
            (inner.split(':').next().unwrap_or(inner), close + 3)
        } else if let Some(bracketed) = tail.strip_prefix("[[") {
            let close = bracketed
                .find("]]")
                .ok_or_else(|| format!("unclosed `[[` in `{expr}`"))?;
            (&bracketed[..close], close + 4)
        } else if let Some(bare) = tail.strip_prefix('$') {
            let n = bare
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(bare.len());
            if n == 0 {
                return Err(format!("a `$` that names no variable in `{expr}`"));
            }
            (&bare[..n], n + 1)
        } else {
            // A `[` that opens a range, not a variable.
            out.push('[');
            rest = &tail[1..];
            continue;
        };
        out.push_str(value_of(name)?);
        rest = &tail[len..];
    }
}

/// One query of the dashboard.
#[derive(Clone)]
struct Query {
    panel: String,
    expr: String,
}

struct Dashboard {
    json: Value,
    queries: Vec<Query>,
}

impl Dashboard {
    fn load() -> Dashboard {
        let json: Value =
            serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
        let mut queries = Vec::new();
        for panel in Self::panels_of(&json) {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push(Query {
                        panel: title.to_string(),
                        expr: expr.to_string(),
                    });
                }
            }
        }
        Dashboard { json, queries }
    }

    /// Every panel, those inside rows (collapsed rows keep theirs in `panels`) included.
    fn panels_of(v: &Value) -> Vec<&Value> {
        let mut all = Vec::new();
        for p in v["panels"].as_array().into_iter().flatten() {
            all.push(p);
            all.extend(Self::panels_of(p));
        }
        all
    }

    fn variables(&self) -> Vec<&Value> {
        self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .collect()
    }

    fn variable_names(&self) -> BTreeSet<String> {
        self.variables()
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect()
    }

    /// The PromQL behind the query variables: `label_values(selector, label)` becomes
    /// `group by (label) (selector)`, `query_result(q)` becomes `q`.
    fn variable_queries(&self) -> Vec<Query> {
        let mut queries = Vec::new();
        for var in self.variables() {
            if var["type"] != "query" {
                continue;
            }
            let name = var["name"].as_str().unwrap_or("(unnamed)");
            let q = var["query"]["query"]
                .as_str()
                .or(var["query"].as_str())
                .unwrap_or("")
                .trim();
            let expr = if let Some(args) = q.strip_prefix("label_values(").and_then(|a| a.strip_suffix(')')) {
                let (selector, label) = args
                    .rsplit_once(',')
                    .unwrap_or_else(|| panic!("variable `{name}`: label_values without a selector: `{q}`"));
                format!("group by ({}) ({})", label.trim(), selector.trim())
            } else if let Some(inner) = q.strip_prefix("query_result(").and_then(|a| a.strip_suffix(')')) {
                inner.to_string()
            } else {
                panic!("variable `{name}`: a query this test does not know how to check: `{q}`")
            };
            queries.push(Query {
                panel: format!("variable {name}"),
                expr,
            });
        }
        queries
    }

    /// Panel and variable queries together.
    fn all_queries(&self) -> Vec<Query> {
        let mut all = self.queries.clone();
        all.extend(self.variable_queries());
        all
    }
}

#[test]
fn alert_rules_pass_promtool() {
    promtool(&["check", "rules", ALERTS]);
    promtool(&["test", "rules", ALERTS_TEST]);
    let alerts = read(ALERTS);
    for name in REQUIRED_ALERTS {
        assert!(
            alerts.contains(&format!("alert: {name}\n")),
            "{ALERTS} lacks the alert {name}"
        );
    }
}

#[test]
fn scrape_example_passes_promtool() {
    promtool(&["check", "config", SCRAPE_EXAMPLE]);
}

#[test]
fn dashboard_queries_parse_as_promql() {
    let dashboard = Dashboard::load();
    let vars = dashboard.variable_names();
    let queries = dashboard.all_queries();
    assert!(
        queries.len() > 10,
        "only {} queries found in {DASHBOARD}",
        queries.len()
    );

    let mut rules = Vec::new();
    let mut listing = String::new();
    for (n, q) in queries.iter().enumerate() {
        let expr = substitute_variables(&q.expr, &vars).unwrap_or_else(|e| panic!("panel `{}`: {e}", q.panel));
        listing.push_str(&format!("dashboard:expr_{n} ({}): {expr}\n", q.panel));
        rules.push(json!({ "record": format!("dashboard:expr_{n}"), "expr": expr }));
    }
    // JSON is YAML, so promtool reads this as a rules file.
    let file = json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
    let path = path.to_str().unwrap();
    let result = std::panic::catch_unwind(|| promtool(&["check", "rules", path]));
    if let Err(e) = result {
        eprintln!("the dashboard's queries, as checked:\n{listing}");
        std::panic::resume_unwind(e);
    }
}

#[test]
fn dashboard_covers_the_serving_signals() {
    let dashboard = Dashboard::load();
    let queried: BTreeSet<String> = dashboard
        .queries
        .iter()
        .flat_map(|q| sirocco_identifiers(&q.expr))
        .collect();
    let missing: Vec<_> = DASHBOARD_MUST_QUERY.iter().filter(|m| !queried.contains(**m)).collect();
    assert!(missing.is_empty(), "no panel of {DASHBOARD} queries {missing:?}");

    let names = dashboard.variable_names();
    assert!(
        names.contains("datasource"),
        "{DASHBOARD} lacks the `datasource` variable"
    );
    let replica = dashboard
        .variables()
        .into_iter()
        .find(|v| v["name"] == "replica")
        .unwrap_or_else(|| panic!("{DASHBOARD} lacks the `replica` variable"));
    assert!(
        replica
            .to_string()
            .contains("label_values(sirocco_shard_kv_tokens_used, replica)"),
        "the `replica` variable should list label_values(sirocco_shard_kv_tokens_used, replica)"
    );
}

#[test]
fn dashboard_panels_use_the_datasource_variable() {
    let dashboard = Dashboard::load();
    let mut ids = BTreeSet::new();
    for panel in Dashboard::panels_of(&dashboard.json) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel `{title}` has no numeric id"));
        assert!(ids.insert(id), "panel `{title}`: id {id} is used twice");
        assert!(panel["gridPos"].is_object(), "panel `{title}` has no gridPos");
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array();
        assert!(targets.is_some_and(|t| !t.is_empty()), "panel `{title}` has no query");
        for source in
            std::iter::once(&panel["datasource"]).chain(targets.into_iter().flatten().map(|t| &t["datasource"]))
        {
            assert_eq!(
                source["uid"], "${datasource}",
                "panel `{title}`: a data source other than the `datasource` variable: {source}"
            );
        }
    }
}

#[test]
fn metric_names_and_label_values_are_exported_ones() {
    let exported = exported_series();
    let dashboard = Dashboard::load();
    let mut sources: Vec<(String, String)> = [ALERTS, ALERTS_TEST].iter().map(|f| (f.to_string(), read(f))).collect();
    for q in dashboard.all_queries() {
        sources.push((format!("{DASHBOARD}, {}", q.panel), q.expr));
    }

    let mut problems = Vec::new();
    for (source, text) in &sources {
        for name in sirocco_identifiers(text) {
            if !exported.contains(&name) {
                problems.push(format!("{source}: `{name}` is not a metric sirocco exports"));
            }
        }
        for (label, allowed) in LABEL_VALUES {
            for value in label_matcher_values(text, label) {
                if !allowed.contains(&value.as_str()) {
                    problems.push(format!("{source}: {label}=\"{value}\" is not one of {allowed:?}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checks_catch_mistakes() {
    let vars: BTreeSet<String> = ["replica".to_string()].into();
    assert_eq!(
        substitute_variables(
            r#"rate(x{replica=~"$replica", r="${replica:regex}", s="[[replica]]"}[$__rate_interval])"#,
            &vars
        )
        .unwrap(),
        r#"rate(x{replica=~".*", r=".*", s=".*"}[5m])"#
    );
    assert!(substitute_variables("rate(x[$__rate_intreval])", &vars).is_err());
    assert!(substitute_variables(r#"x{replica=~"$replcia"}"#, &vars).is_err());

    let found = sirocco_identifiers("sum(rate(sirocco_requets_total[5m])) / my_sirocco_x + sirocco_batch_size_sum");
    assert_eq!(
        found,
        [
            "sirocco_batch_size_sum".to_string(),
            "sirocco_requets_total".to_string()
        ]
        .into()
    );
    assert!(!exported_series().contains("sirocco_requets_total"));
    assert!(!exported_series().contains("sirocco_queue_depth_count"));

    assert_eq!(
        label_matcher_values(
            r#"x{outcome=~"unavailable|internl", kind = "decode", outcome!~".*"}"#,
            "outcome"
        ),
        ["unavailable", "internl"]
    );
}
