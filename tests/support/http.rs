//! A minimal HTTP/1.0 client for tests: enough for JSON requests, /metrics scrapes
//! and server-sent events, without a client library.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one request; returns the status code and the body.
pub async fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    (status, body)
}

/// Uploads `content` to `/v1/files` as a multipart form, purpose "batch": the
/// status and the answer.
pub async fn upload_batch_file(addr: &str, content: &str) -> (u16, String) {
    let b = "sirocco-test-boundary-7f3a";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{b}--\r\n"
    );
    let kind = format!("multipart/form-data; boundary={b}");
    request(addr, "POST", "/v1/files", &[("Content-Type", &kind)], &body).await
}

pub async fn get(addr: &str, path: &str) -> (u16, String) {
    request(addr, "GET", path, &[], "").await
}

pub async fn post_json(addr: &str, path: &str, headers: &[(&str, &str)], body: &serde_json::Value) -> (u16, String) {
    request(addr, "POST", path, headers, &body.to_string()).await
}

/// Prometheus text exposition as sample values by series (name plus labels as printed).
pub fn samples(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Sum of every series of metric `name` whose labels contain all of `with`.
pub fn sum(s: &std::collections::HashMap<String, f64>, name: &str, with: &[&str]) -> f64 {
    s.iter()
        .filter(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{"))) && with.iter().all(|w| k.contains(w))
        })
        .map(|(_, v)| v)
        .sum()
}
