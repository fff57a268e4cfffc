//! `sirocco batch`: a file of OpenAI batch requests (one JSON object per line:
//! `custom_id`, `method`, `url`, `body`) run through a running router's HTTP API at
//! full throughput, one result or error line written per input line as each
//! finishes. The output file is the resume point: a run interrupted (Ctrl-C, a kill,
//! a lost router) and started again with the same arguments runs only the lines the
//! output does not hold yet.

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BatchArgs {
    /// The requests: one JSON object per line, as OpenAI's batch input
    /// (`{"custom_id", "method": "POST", "url": "/v1/chat/completions" or
    /// "/v1/completions", "body"}`).
    #[arg(long, value_name = "FILE.jsonl")]
    pub input: PathBuf,
    /// The results: one JSON object per input line, as OpenAI's batch output (`id`,
    /// `custom_id`, `response` {`status_code`, `request_id`, `body`}, `error`) with the
    /// input's 1-based `line`, in the order they finish. Lines it already holds are
    /// not run again.
    #[arg(long, value_name = "FILE.jsonl")]
    pub output: PathBuf,
    /// The router's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// The `priority` each request is sent with unless its body sets one: lower runs
    /// first, and interactive requests have 0, so a batch does not delay them (it
    /// still gains a level for each 10 s a request waits).
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    pub priority: i32,
    /// Sent as `authorization: Bearer KEY`, for a router started with --api-key.
    #[arg(long, env = "SIROCCO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// How long a request may keep failing to reach the router (refused connections,
    /// 429/502/503/504) before the run stops, to be resumed later.
    #[arg(long, default_value_t = 120)]
    pub retry_for_secs: u64,
}

/// The endpoints a batch line may name.
const URLS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// One input line, checked.
#[derive(Debug, Clone, PartialEq)]
enum Line {
    Request {
        custom_id: String,
        url: String,
        body: Value,
    },
    /// Refused, with why (its `custom_id` when it had one).
    Invalid { custom_id: Option<String>, message: String },
}

/// The input's non-blank lines as `(line number, line)`, checked one by one. Fails
/// only when no line is a JSON object: then the file is not JSONL at all.
fn parse_input(text: &str, path: &Path) -> Result<Vec<(usize, Line)>> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut lines = Vec::new();
    let mut first_error = None;
    let mut objects = 0;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let line = match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(o)) => {
                objects += 1;
                check_line(&Value::Object(o), n, &mut seen)
            }
            Ok(other) => Line::Invalid {
                custom_id: None,
                message: format!("line {n}: not a JSON object but {}", kind(&other)),
            },
            Err(e) => Line::Invalid {
                custom_id: None,
                message: format!("line {n}: not JSON ({e})"),
            },
        };
        if let (Line::Invalid { message, .. }, None) = (&line, &first_error) {
            first_error = Some(message.clone());
        }
        lines.push((n, line));
    }
    if objects == 0 {
        match first_error {
            Some(e) => bail!("{} is not JSONL (one JSON object per line): {e}", path.display()),
            None => bail!("{} holds no requests", path.display()),
        }
    }
    Ok(lines)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One JSON object line checked against the batch input format; `seen` maps the
/// custom ids so far to their lines.
fn check_line(v: &Value, n: usize, seen: &mut HashMap<String, usize>) -> Line {
    let custom_id = match &v["custom_id"] {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::Null => return invalid(None, n, "`custom_id` is missing (a non-empty string)".into()),
        other => {
            return invalid(
                None,
                n,
                format!("`custom_id` is {}, not a non-empty string", kind(other)),
            )
        }
    };
    if let Some(first) = seen.get(&custom_id) {
        return invalid(
            Some(custom_id.clone()),
            n,
            format!("`custom_id` {custom_id:?} already names line {first}"),
        );
    }
    seen.insert(custom_id.clone(), n);
    let bad = |m: String| invalid(Some(custom_id.clone()), n, m);
    match &v["method"] {
        Value::String(m) if m == "POST" => {}
        Value::Null => return bad("`method` is missing (\"POST\")".into()),
        other => return bad(format!("`method` is {other}: only \"POST\" is served")),
    }
    let url = match &v["url"] {
        Value::String(u) if URLS.contains(&u.as_str()) => u.clone(),
        Value::Null => return bad(format!("`url` is missing (one of {})", URLS.join(", "))),
        other => return bad(format!("`url` {other} is not served here (one of {})", URLS.join(", "))),
    };
    let body = match &v["body"] {
        Value::Object(_) => v["body"].clone(),
        Value::Null => return bad("`body` is missing (the request's JSON object)".into()),
        other => return bad(format!("`body` is {}, not an object", kind(other))),
    };
    if body["stream"] == json!(true) {
        return bad("`body.stream` is true: a batch line is answered whole".into());
    }
    Line::Request { custom_id, url, body }
}

fn invalid(custom_id: Option<String>, n: usize, what: String) -> Line {
    Line::Invalid {
        custom_id,
        message: format!("line {n}: {what}"),
    }
}

/// The input lines an existing output file holds results for, by line number with
/// their custom ids. A last line cut short (an interrupted write) is removed from the
/// file; any other line that is not a result is an error (not a file this wrote).
fn done_lines(output: &Path) -> Result<HashMap<usize, Option<String>>> {
    let mut done = HashMap::new();
    let Ok(mut text) = std::fs::read_to_string(output) else {
        return Ok(done);
    };
    if !text.is_empty() && !text.ends_with('\n') {
        let keep = text.rfind('\n').map_or(0, |i| i + 1);
        text.truncate(keep);
        let f = std::fs::OpenOptions::new().write(true).open(output)?;
        f.set_len(keep as u64)
            .with_context(|| format!("cannot trim the cut last line of {}", output.display()))?;
    }
    for (i, l) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(l).ok().filter(Value::is_object).with_context(|| {
            format!(
                "{} line {} is not a batch result: pass an --output this command wrote, or a new one",
                output.display(),
                i + 1
            )
        })?;
        let line = v["line"].as_u64().with_context(|| {
            format!(
                "{} line {} has no input `line` number: pass an --output this command wrote, or a new one",
                output.display(),
                i + 1
            )
        })? as usize;
        done.insert(line, v["custom_id"].as_str().map(str::to_owned));
    }
    Ok(done)
}

/// One output line.
fn result_line(
    n: usize,
    custom_id: Option<&str>,
    response: Option<(u16, String, Value)>,
    error: Option<Value>,
) -> String {
    let response = response
        .map(|(status, request_id, body)| json!({"status_code": status, "request_id": request_id, "body": body}));
    let v = json!({
        "id": format!("batch_req_{n}"),
        "custom_id": custom_id,
        "line": n,
        "response": response,
        "error": error,
    });
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// What one request came to: the output line, whether it is a 200 answer, and the
/// completion tokens it made.
struct Outcome {
    line: String,
    ok: bool,
    tokens: u64,
}

/// Statuses worth another try: the router is busy or between replicas.
fn retryable(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

/// Sends one request, retrying refused connections and busy answers for up to
/// `retry_for`; an answer of any other status is the line's result.
async fn run_one(
    http: &reqwest::Client,
    args: &BatchArgs,
    n: usize,
    custom_id: &str,
    url: &str,
    body: &Value,
) -> Result<Outcome> {
    let endpoint = format!("{}{url}", args.url.trim_end_matches('/'));
    let mut body = body.clone();
    if body.get("priority").is_none_or(Value::is_null) {
        body["priority"] = json!(args.priority);
    }
    let start = Instant::now();
    let retry_for = Duration::from_secs(args.retry_for_secs);
    let mut wait = Duration::from_millis(200);
    loop {
        let mut req = http.post(&endpoint).json(&body);
        if let Some(k) = &args.api_key {
            req = req.bearer_auth(k);
        }
        let failure = match req.send().await {
            Ok(resp) if !retryable(resp.status().as_u16()) => {
                let status = resp.status().as_u16();
                let request_id = resp
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map_or_else(|| format!("line-{n}"), str::to_owned);
                let text = resp
                    .text()
                    .await
                    .with_context(|| format!("line {n}: reading the answer"))?;
                let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| json!({"error": {"message": text}}));
                let tokens = body["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                return Ok(Outcome {
                    line: result_line(n, Some(custom_id), Some((status, request_id, body)), None),
                    ok: status == 200,
                    tokens,
                });
            }
            Ok(resp) => format!("HTTP {}", resp.status()),
            Err(e) => format!("{e}"),
        };
        if start.elapsed() + wait > retry_for {
            bail!(
                "line {n}: the router at {} kept failing for {}s ({failure})",
                args.url,
                args.retry_for_secs
            );
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

pub fn run(args: BatchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read the batch input {}", args.input.display()))?;
    let lines = parse_input(&text, &args.input)?;
    let done = done_lines(&args.output)?;
    // The output must be this input's: a line it holds names the same custom id.
    for (n, line) in &lines {
        if let Some(id) = done.get(n) {
            let want = match line {
                Line::Request { custom_id, .. } => Some(custom_id),
                Line::Invalid { custom_id, .. } => custom_id.as_ref(),
            };
            if id.as_ref() != want {
                bail!(
                    "{} holds results of another input: its line {n} is custom_id {id:?}, {} has {want:?} there",
                    args.output.display(),
                    args.input.display()
                );
            }
        }
    }
    let total = lines.len();
    let todo: Vec<(usize, Line)> = lines.into_iter().filter(|(n, _)| !done.contains_key(n)).collect();
    let skipped = total - todo.len();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.output)
        .with_context(|| format!("cannot open the batch output {}", args.output.display()))?;
    if skipped > 0 {
        eprintln!(
            "resuming: {skipped} of {total} lines are in {} already",
            args.output.display()
        );
    }

    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("batch [{elapsed_precise}] {wide_bar} {pos}/{len} lines, {msg}, ETA {eta}")
    {
        bar.set_style(style);
    }
    bar.set_position(skipped as u64);
    bar.reset_eta();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let summary = rt.block_on(async {
        let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
        let (http, args) = (&http, &args);
        let mut results = futures::stream::iter(todo)
            .map(|(n, line)| async move {
                match line {
                    Line::Request { custom_id, url, body } => run_one(http, args, n, &custom_id, &url, &body).await,
                    Line::Invalid { custom_id, message } => Ok(Outcome {
                        line: result_line(
                            n,
                            custom_id.as_deref(),
                            None,
                            Some(json!({"code": "invalid_line", "message": message})),
                        ),
                        ok: false,
                        tokens: 0,
                    }),
                }
            })
            .buffer_unordered(args.concurrency as usize);
        let (start, mut tokens, mut written, mut failed) = (Instant::now(), 0u64, 0usize, 0usize);
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            let outcome = tokio::select! {
                next = results.next() => match next {
                    Some(o) => o?,
                    None => break,
                },
                _ = &mut ctrl_c => {
                    // Every finished line is written and flushed; those in flight
                    // run again on resume.
                    bar.abandon();
                    eprintln!(
                        "interrupted: {} of {total} lines are in {}; run the same command again to finish",
                        skipped + written,
                        args.output.display()
                    );
                    std::process::exit(130);
                }
            };
            out.write_all(outcome.line.as_bytes())
                .and_then(|()| out.flush())
                .with_context(|| format!("cannot write to {}", args.output.display()))?;
            written += 1;
            failed += usize::from(!outcome.ok);
            tokens += outcome.tokens;
            bar.inc(1);
            bar.set_message(format!(
                "{:.0} tok/s",
                tokens as f64 / start.elapsed().as_secs_f64().max(1e-3)
            ));
        }
        bar.finish();
        anyhow::Ok(format!(
            "{total} lines: {written} run now ({failed} of them errors, in the output), {skipped} before; \
             {tokens} tokens in {:.1}s",
            start.elapsed().as_secs_f64()
        ))
    })?;
    eprintln!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_checked_one_by_one_and_a_file_of_no_objects_is_refused() {
        let text = [
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}"#,
            "",
            "not json",
            r#"[1, 2]"#,
            r#"{"method": "POST", "url": "/v1/completions", "body": {}}"#,
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}"#,
            r#"{"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {}}"#,
            r#"{"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}"#,
            r#"{"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": "hi"}"#,
            r#"{"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {"stream": true}}"#,
            r#"{"custom_id": "f", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}"#,
        ]
        .join("\n");
        let lines = parse_input(&text, Path::new("in.jsonl")).unwrap();
        let numbers: Vec<usize> = lines.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let message = |i: usize| match &lines[i].1 {
            Line::Invalid { message, .. } => message.clone(),
            other => panic!("{other:?}"),
        };
        assert!(matches!(&lines[0].1, Line::Request { custom_id, .. } if custom_id == "a"));
        assert!(message(1).starts_with("line 3: not JSON"), "{}", message(1));
        assert_eq!(message(2), "line 4: not a JSON object but an array");
        assert_eq!(message(3), "line 5: `custom_id` is missing (a non-empty string)");
        assert_eq!(message(4), "line 6: `custom_id` \"a\" already names line 1");
        assert_eq!(message(5), "line 7: `method` is \"GET\": only \"POST\" is served");
        assert!(message(6).starts_with("line 8: `url` \"/v1/embeddings\" is not served"));
        assert_eq!(message(7), "line 9: `body` is a string, not an object");
        assert!(message(8).starts_with("line 10: `body.stream` is true"));
        assert!(matches!(&lines[9].1, Line::Request { url, .. } if url == "/v1/chat/completions"));

        let err = parse_input("[\n1,\n2\n]\n", Path::new("in.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "in.json is not JSONL (one JSON object per line): line 1: not JSON (EOF while parsing a list at line 1 column 1)"
        );
        assert!(parse_input("\n\n", Path::new("e.jsonl")).is_err());
    }

    #[test]
    fn an_output_is_read_back_and_a_cut_last_line_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        assert!(done_lines(&out).unwrap().is_empty());
        let a = result_line(3, Some("x"), Some((200, "r".into(), json!({}))), None);
        let b = result_line(1, None, None, Some(json!({"code": "invalid_line"})));
        std::fs::write(&out, format!("{a}{b}{{\"id\": \"batch_req_2\", \"cus")).unwrap();
        let done = done_lines(&out).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[&3], Some("x".to_string()));
        assert_eq!(done[&1], None);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("{a}{b}"));
        std::fs::write(&out, "hello\n").unwrap();
        let err = done_lines(&out).unwrap_err().to_string();
        assert!(err.contains("line 1 is not a batch result"), "{err}");
    }
}
