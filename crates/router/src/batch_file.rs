//! OpenAI's batch file format, read and written alike by `sirocco batch` (a client
//! of a running router) and the router's own `/v1/batches`: input lines (one JSON
//! object each: `custom_id`, `method`, `url`, `body`) checked one by one, a result
//! line per input line (`id`, `custom_id`, `response`, `error`, and the input's
//! 1-based `line`), and the lines an output already holds, which a resumed run skips.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The endpoints a batch line may name.
pub const URLS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// One input line, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
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
pub fn parse_input(text: &str, path: &Path) -> Result<Vec<(usize, Line)>> {
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
pub fn done_lines(output: &Path) -> Result<HashMap<usize, Option<String>>> {
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
pub fn result_line(
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

/// The priority a line's request runs at: its body's own, else `priority`.
pub fn default_priority(body: &mut Value, priority: i64) {
    if body.get("priority").is_none_or(Value::is_null) {
        body["priority"] = json!(priority);
    }
}

/// An answer's body as a result line holds it: its JSON, or its text as an error.
pub fn answer_body(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!({"error": {"message": String::from_utf8_lossy(bytes)}}))
}

/// Statuses worth another try: the router is busy or between replicas.
pub fn retryable(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

/// How a line retries: waits from 200 ms, doubling up to 5 s, for at most `limit`
/// since the first try.
pub struct Retry {
    started: std::time::Instant,
    wait: std::time::Duration,
    limit: std::time::Duration,
}

impl Retry {
    pub fn new(limit: std::time::Duration) -> Self {
        Retry {
            started: std::time::Instant::now(),
            wait: std::time::Duration::from_millis(200),
            limit,
        }
    }

    /// Waits before the next try; false, at once, when that would pass the limit.
    pub async fn pause(&mut self) -> bool {
        if self.started.elapsed() + self.wait > self.limit {
            return false;
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(std::time::Duration::from_secs(5));
        true
    }
}

/// Fails when `done` (the lines an output holds) is not of `lines`: a line it holds
/// must name the same custom id as the input's line of that number.
pub fn check_resume(
    lines: &[(usize, Line)],
    done: &HashMap<usize, Option<String>>,
    input: &str,
    output: &str,
) -> Result<()> {
    for (n, line) in lines {
        if let Some(id) = done.get(n) {
            let want = match line {
                Line::Request { custom_id, .. } => Some(custom_id),
                Line::Invalid { custom_id, .. } => custom_id.as_ref(),
            };
            if id.as_ref() != want {
                bail!("{output} holds results of another input: its line {n} is custom_id {id:?}, {input} has {want:?} there");
            }
        }
    }
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
