//! OpenAI's Files and Batch APIs over a data directory: `/v1/files` (upload, list,
//! retrieve, content, delete) and `/v1/batches` (create, retrieve, list, cancel).
//! A batch runs its input file's lines through this router's own completions and
//! chat routes, in process, at a low priority (unless a line's body sets one), so
//! interactive traffic keeps its latency; busy answers (429, 503) are retried.
//!
//! Everything lives in the data directory: `files/<id>` and its `files/<id>.json`,
//! `batches/<id>.json` (the batch object as served), and a running batch's
//! `batches/<id>.output.jsonl` and `.errors.jsonl` (the result lines of the batch
//! file format, [`crate::batch_file`]). Those results are the resume point: a
//! router that stops mid-batch goes on with the lines they lack when it starts
//! again; on completion they become the batch's output and error files.

use super::error::ApiError;
use crate::batch_file::{
    answer_body, check_resume, default_priority, done_lines, parse_input, result_line, retryable, Line, Retry, URLS,
};
use axum::body::{Body, Bytes};
use axum::extract::{Multipart, Path as UrlPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tower::ServiceExt;

/// The priority batch lines run at unless their body sets one: interactive
/// requests have 0 and run first (a line still gains a level per 10 s it waits).
pub(crate) const BATCH_PRIORITY: i64 = 10;
/// Lines of one batch in flight at once.
const CONCURRENCY: usize = 256;
/// How long a line keeps retrying busy answers before its error is its result.
const RETRY_FOR: Duration = Duration::from_secs(600);
/// The largest file accepted.
pub(crate) const MAX_FILE_BYTES: usize = 200 << 20;
/// Batch states that still have work (or a cancel) to finish.
const ACTIVE: [&str; 4] = ["validating", "in_progress", "finalizing", "cancelling"];

/// The data directory, the routes batch lines run through, and the cancel
/// switches of the batches running now.
pub(crate) struct Batches {
    dir: PathBuf,
    api: Router,
    api_key: Option<String>,
    running: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Serializes writes of batch objects (the runner's counts and a cancel).
    write: Mutex<()>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no {what} with id {id:?}"),
    )
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string())
}

/// An id of ours: letters, digits, `-` and `_` only, so that it names a file in
/// the data directory and nothing else.
fn safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Batches {
    /// Batches over `dir`, their lines run through `api` (the completions and chat
    /// routes) with `api_key`.
    pub(crate) fn new(dir: PathBuf, api: Router, api_key: Option<String>) -> Arc<Self> {
        Arc::new(Batches {
            dir,
            api,
            api_key,
            running: Mutex::new(HashMap::new()),
            write: Mutex::new(()),
        })
    }

    fn files_dir(&self) -> PathBuf {
        self.dir.join("files")
    }

    fn batches_dir(&self) -> PathBuf {
        self.dir.join("batches")
    }

    fn file_path(&self, id: &str) -> PathBuf {
        self.files_dir().join(id)
    }

    fn meta_path(dir: &Path, id: &str) -> PathBuf {
        dir.join(format!("{id}.json"))
    }

    fn read_json(path: &Path) -> Option<Value> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Writes `v` to `path` whole: a crash leaves the old or the new object.
    fn write_json(path: &Path, v: &Value) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, v.to_string())?;
        std::fs::rename(tmp, path)
    }

    fn file(&self, id: &str) -> Result<Value, ApiError> {
        Self::object(&self.files_dir(), "file", id)
    }

    fn batch(&self, id: &str) -> Result<Value, ApiError> {
        Self::object(&self.batches_dir(), "batch", id)
    }

    /// The stored object `id` (a `what`) in `dir`.
    fn object(dir: &Path, what: &str, id: &str) -> Result<Value, ApiError> {
        if !safe_id(id) {
            return Err(not_found(what, id));
        }
        Self::read_json(&Self::meta_path(dir, id)).ok_or_else(|| not_found(what, id))
    }

    /// Stores `bytes` as a file: its object.
    fn store_file(&self, id: &str, filename: &str, purpose: &str, bytes: &[u8]) -> std::io::Result<Value> {
        std::fs::create_dir_all(self.files_dir())?;
        std::fs::write(self.file_path(id), bytes)?;
        self.register_file(id, filename, purpose, bytes.len())
    }

    fn register_file(&self, id: &str, filename: &str, purpose: &str, bytes: usize) -> std::io::Result<Value> {
        let meta = json!({
            "id": id, "object": "file", "bytes": bytes, "created_at": now(),
            "filename": filename, "purpose": purpose, "status": "processed", "status_details": null,
        });
        Self::write_json(&Self::meta_path(&self.files_dir(), id), &meta)?;
        Ok(meta)
    }

    /// Changes batch `id`'s stored object with `f`; returns the new object.
    fn update(&self, id: &str, f: impl FnOnce(&mut Value)) -> std::io::Result<Value> {
        let _held = self.write.lock().unwrap();
        let path = Self::meta_path(&self.batches_dir(), id);
        let mut v = Self::read_json(&path).ok_or_else(|| std::io::Error::other(format!("batch {id} vanished")))?;
        f(&mut v);
        Self::write_json(&path, &v)?;
        Ok(v)
    }

    /// Runs (again) the batches a previous run of the router left unfinished.
    pub(crate) fn resume(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(self.batches_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(b) = Self::read_json(&path) else { continue };
            let (Some(id), Some(status)) = (b["id"].as_str(), b["status"].as_str()) else {
                continue;
            };
            if ACTIVE.contains(&status) {
                tracing::info!(batch = id, status, "resuming a batch left unfinished");
                self.spawn(id.to_string());
            }
        }
    }

    fn spawn(self: &Arc<Self>, id: String) {
        let (tx, rx) = watch::channel(false);
        self.running.lock().unwrap().insert(id.clone(), tx);
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.run(&id, rx).await {
                tracing::error!(batch = %id, error = %format!("{e:#}"), "batch failed");
                let _ = this.fail(&id, "batch_failed", None, &format!("{e:#}"));
            }
            this.running.lock().unwrap().remove(&id);
        });
    }

    /// Ends batch `id` as failed, with why.
    fn fail(&self, id: &str, code: &str, param: Option<&str>, message: &str) -> std::io::Result<Value> {
        self.update(id, |b| {
            b["status"] = json!("failed");
            b["failed_at"] = json!(now());
            b["errors"] =
                json!({"object": "list", "data": [{"code": code, "message": message, "param": param, "line": null}]});
        })
    }

    /// Runs batch `id` to its end: completed, failed (an input that is not a batch
    /// file), or cancelled when `cancel` turns true.
    async fn run(&self, id: &str, mut cancel: watch::Receiver<bool>) -> anyhow::Result<()> {
        let b = self.batch(id).map_err(|e| anyhow::anyhow!(e.message))?;
        let input_id = b["input_file_id"].as_str().unwrap_or_default().to_string();
        let endpoint = b["endpoint"].as_str().unwrap_or_default().to_string();
        let out_path = self.batches_dir().join(format!("{id}.output.jsonl"));
        let err_path = self.batches_dir().join(format!("{id}.errors.jsonl"));
        if b["status"] == "cancelling" {
            return self.finish(id, "cancelled", &out_path, &err_path);
        }
        let text = std::fs::read_to_string(self.file_path(&input_id));
        let lines = match text
            .map_err(anyhow::Error::from)
            .and_then(|t| parse_input(&t, Path::new(&input_id)))
        {
            Ok(l) => l,
            Err(e) => {
                self.fail(id, "invalid_file", Some("input_file_id"), &format!("{e:#}"))?;
                return Ok(());
            }
        };
        let mut done = done_lines(&out_path)?;
        let failed_before = done_lines(&err_path)?;
        let (completed, failed) = (done.len(), failed_before.len());
        done.extend(failed_before);
        check_resume(&lines, &done, &input_id, &format!("batch {id}'s results"))?;
        let total = lines.len();
        self.update(id, |b| {
            b["status"] = json!("in_progress");
            if b["in_progress_at"].is_null() {
                b["in_progress_at"] = json!(now());
            }
            b["request_counts"] = counts(total, completed, failed);
        })?;
        tracing::info!(batch = id, total, done = done.len(), "batch running");
        let todo: Vec<(usize, Line)> = lines.into_iter().filter(|(n, _)| !done.contains_key(n)).collect();
        let open = |p: &Path| std::fs::OpenOptions::new().create(true).append(true).open(p);
        let (mut out, mut err) = (open(&out_path)?, open(&err_path)?);
        let cancelled = cancel.clone();
        let mut results = futures::stream::iter(todo)
            .map(|(n, line)| {
                let cancelled = cancelled.clone();
                let endpoint = endpoint.clone();
                async move {
                    match line {
                        Line::Request { custom_id, url, .. } if url != endpoint => {
                            let message = format!("line {n}: `url` {url:?} is not this batch's endpoint {endpoint:?}");
                            (false, invalid_result(n, Some(&custom_id), message))
                        }
                        Line::Request { custom_id, url, body } => {
                            let (status, request_id, body) = self.run_line(&url, body, cancelled).await;
                            (
                                status == 200,
                                result_line(n, Some(&custom_id), Some((status, request_id, body)), None),
                            )
                        }
                        Line::Invalid { custom_id, message } => {
                            (false, invalid_result(n, custom_id.as_deref(), message))
                        }
                    }
                }
            })
            .buffer_unordered(CONCURRENCY);
        let (mut completed, mut failed) = (completed, failed);
        let mut saved = Instant::now();
        let started = Instant::now();
        loop {
            let next = tokio::select! {
                next = results.next() => next,
                _ = cancel.wait_for(|c| *c) => break,
            };
            let Some((ok, line)) = next else { break };
            let file = if ok { &mut out } else { &mut err };
            file.write_all(line.as_bytes()).and_then(|()| file.flush())?;
            completed += usize::from(ok);
            failed += usize::from(!ok);
            if saved.elapsed() >= Duration::from_millis(500) {
                saved = Instant::now();
                self.update(id, |b| b["request_counts"] = counts(total, completed, failed))?;
                tracing::info!(
                    batch = id,
                    done = completed + failed,
                    total,
                    secs = started.elapsed().as_secs(),
                    "batch progress"
                );
            }
        }
        drop(results);
        self.update(id, |b| b["request_counts"] = counts(total, completed, failed))?;
        let end = if *cancel.borrow() { "cancelled" } else { "completed" };
        tracing::info!(batch = id, completed, failed, total, end, "batch ended");
        self.finish(id, end, &out_path, &err_path)
    }

    /// Ends batch `id` as `end`: its results become its output and error files.
    fn finish(&self, id: &str, end: &str, out_path: &Path, err_path: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.files_dir())?;
        let mut ids = [Value::Null, Value::Null];
        for (k, (path, kind)) in [(out_path, "output"), (err_path, "errors")].into_iter().enumerate() {
            let bytes = std::fs::metadata(path).map_or(0, |m| m.len() as usize);
            if bytes == 0 && kind == "errors" {
                let _ = std::fs::remove_file(path);
                continue;
            }
            let file_id = format!("file-{id}-{kind}");
            if path.exists() {
                std::fs::rename(path, self.file_path(&file_id))?;
            } else {
                std::fs::write(self.file_path(&file_id), b"")?;
            }
            self.register_file(&file_id, &format!("{id}_{kind}.jsonl"), "batch_output", bytes)?;
            ids[k] = json!(file_id);
        }
        let [output, errors] = ids;
        self.update(id, |b| {
            b["status"] = json!(end);
            b[format!("{end}_at")] = json!(now());
            b["output_file_id"] = output;
            b["error_file_id"] = errors;
        })?;
        Ok(())
    }

    /// Runs one line through the in-process routes: (status, request id, body).
    async fn run_line(&self, url: &str, mut body: Value, cancelled: watch::Receiver<bool>) -> (u16, String, Value) {
        default_priority(&mut body, BATCH_PRIORITY);
        let body = Bytes::from(body.to_string());
        let mut retry = Retry::new(RETRY_FOR);
        loop {
            let mut req = axum::http::Request::post(url).header(header::CONTENT_TYPE, "application/json");
            if let Some(k) = &self.api_key {
                req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
            }
            let req = req.body(Body::from(body.clone())).expect("a valid request");
            let resp = match self.api.clone().oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let status = resp.status().as_u16();
            if retryable(status) && !*cancelled.borrow() && retry.pause().await {
                continue;
            }
            let request_id = resp
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap_or_default();
            return (status, request_id, answer_body(&bytes));
        }
    }
}

fn counts(total: usize, completed: usize, failed: usize) -> Value {
    json!({"total": total, "completed": completed, "failed": failed})
}

fn invalid_result(n: usize, custom_id: Option<&str>, message: String) -> String {
    result_line(
        n,
        custom_id,
        None,
        Some(json!({"code": "invalid_line", "message": message})),
    )
}

/// The Files and Batch routes over `batches`, behind the API key.
pub(crate) fn routes(batches: Arc<Batches>) -> Router {
    let key = batches.api_key.clone();
    Router::new()
        .route("/v1/files", post(upload_file).get(list_files))
        .route("/v1/files/{id}", get(file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .route_layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            let key = key.clone();
            async move {
                match super::routes::check_key(key.as_deref(), req.headers()) {
                    Ok(()) => next.run(req).await,
                    Err(e) => e.into_response(),
                }
            }
        }))
        .with_state(batches)
}

async fn list_files(State(b): State<Arc<Batches>>) -> Result<Json<Value>, ApiError> {
    list(&b.files_dir(), None, usize::MAX)
}

async fn file(State(b): State<Arc<Batches>>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    b.file(&id).map(Json)
}

async fn delete_file(State(b): State<Arc<Batches>>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    b.file(&id)?;
    std::fs::remove_file(b.file_path(&id)).map_err(internal)?;
    std::fs::remove_file(Batches::meta_path(&b.files_dir(), &id)).map_err(internal)?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

async fn file_content(State(b): State<Arc<Batches>>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    b.file(&id)?;
    let bytes = tokio::fs::read(b.file_path(&id)).await.map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn list_batches(
    State(b): State<Arc<Batches>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| ApiError::invalid(format!("`limit` must be in [1, 100], got {l:?}")).param("limit"))?,
        None => 20,
    };
    list(&b.batches_dir(), q.get("after").map(String::as_str), limit)
}

async fn batch(State(b): State<Arc<Batches>>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    b.batch(&id).map(Json)
}

/// The objects in `dir`, newest first, after the one named `after`, at most `limit`.
fn list(dir: &Path, after: Option<&str>, limit: usize) -> Result<Json<Value>, ApiError> {
    let mut all: Vec<Value> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .filter_map(|p| Batches::read_json(&p))
                .collect()
        })
        .unwrap_or_default();
    all.sort_by(|a, b| (b["created_at"].as_u64(), b["id"].as_str()).cmp(&(a["created_at"].as_u64(), a["id"].as_str())));
    if let Some(after) = after {
        let at = all.iter().position(|v| v["id"] == after).map_or(all.len(), |i| i + 1);
        all.drain(..at);
    }
    let has_more = all.len() > limit;
    all.truncate(limit);
    Ok(Json(json!({
        "object": "list",
        "first_id": all.first().map(|v| v["id"].clone()),
        "last_id": all.last().map(|v| v["id"].clone()),
        "has_more": has_more,
        "data": all,
    })))
}

async fn upload_file(State(b): State<Arc<Batches>>, mut form: Multipart) -> Result<Json<Value>, ApiError> {
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::invalid(format!("the body is not a multipart form: {e}")))?
    {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(|e| ApiError::invalid(e.to_string()))?),
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field.bytes().await.map_err(|e| ApiError::invalid(e.to_string()))?;
                file = Some((name, bytes));
            }
            Some(other) => {
                return Err(
                    ApiError::invalid(format!("unknown form field `{other}` (send `file` and `purpose`)")).param(other),
                )
            }
            None => {}
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::invalid("`purpose` is missing (\"batch\")").param("purpose"))?;
    if purpose != "batch" {
        return Err(ApiError::invalid(format!(
            "`purpose` {purpose:?} is not served here: only \"batch\" files are"
        ))
        .param("purpose"));
    }
    let (name, bytes) = file.ok_or_else(|| ApiError::invalid("`file` is missing").param("file"))?;
    let id = format!("file-{}", uuid::Uuid::new_v4().simple());
    let meta = b.store_file(&id, &name, &purpose, &bytes).map_err(internal)?;
    tracing::info!(file = %id, bytes = bytes.len(), filename = %name, "file uploaded");
    Ok(Json(meta))
}

async fn create_batch(State(b): State<Arc<Batches>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    let input =
        field("input_file_id").ok_or_else(|| ApiError::invalid("`input_file_id` is missing").param("input_file_id"))?;
    let file = b.file(input).map_err(|e| ApiError {
        param: Some("input_file_id".into()),
        ..e
    })?;
    if file["purpose"] != "batch" {
        return Err(
            ApiError::invalid(format!("file {input:?} was not uploaded with purpose \"batch\"")).param("input_file_id"),
        );
    }
    let endpoint = field("endpoint").unwrap_or_default();
    if !URLS.contains(&endpoint) {
        return Err(ApiError::invalid(format!(
            "`endpoint` {endpoint:?} is not served here (one of {})",
            URLS.join(", ")
        ))
        .param("endpoint"));
    }
    let window = field("completion_window").unwrap_or("24h");
    if window != "24h" {
        return Err(
            ApiError::invalid(format!("`completion_window` must be \"24h\", got {window:?}"))
                .param("completion_window"),
        );
    }
    let metadata = match v.get("metadata") {
        None | Some(Value::Null) => Value::Null,
        Some(m @ Value::Object(_)) => m.clone(),
        Some(_) => return Err(ApiError::invalid("`metadata` must be an object").param("metadata")),
    };
    let id = format!("batch_{}", uuid::Uuid::new_v4().simple());
    let created = now();
    let batch = json!({
        "id": id, "object": "batch", "endpoint": endpoint, "errors": null,
        "input_file_id": input, "completion_window": window, "status": "validating",
        "output_file_id": null, "error_file_id": null, "created_at": created,
        "in_progress_at": null, "expires_at": created + 24 * 3600, "finalizing_at": null,
        "completed_at": null, "failed_at": null, "expired_at": null, "cancelling_at": null,
        "cancelled_at": null, "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    });
    std::fs::create_dir_all(b.batches_dir()).map_err(internal)?;
    Batches::write_json(&Batches::meta_path(&b.batches_dir(), &id), &batch).map_err(internal)?;
    tracing::info!(batch = %id, input_file = input, endpoint, "batch created");
    b.spawn(id);
    Ok(Json(batch))
}

async fn cancel_batch(State(b): State<Arc<Batches>>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let id = id.as_str();
    let batch = b.batch(id)?;
    if !ACTIVE.contains(&batch["status"].as_str().unwrap_or_default()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!("batch {id} is {} and cannot be cancelled", batch["status"]),
        ));
    }
    let v = b
        .update(id, |v| {
            v["status"] = json!("cancelling");
            v["cancelling_at"] = json!(now());
        })
        .map_err(internal)?;
    match b.running.lock().unwrap().get(id) {
        Some(tx) => {
            let _ = tx.send(true);
        }
        None => tracing::warn!(batch = id, "cancelled batch is not running here"),
    }
    tracing::info!(batch = id, "batch cancelling");
    Ok(Json(v))
}
