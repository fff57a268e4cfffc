//! The router's HTTP side: `/metrics` (Prometheus), `/health` (the process answers)
//! and `/ready` (some replica completed a forward step and collective within the
//! readiness window; idle replicas run canary steps to keep this true).
//!
//! Every request body is read whole, within a time limit and a size limit, before
//! any handler sees it: a client that trickles its body cannot hold a connection and
//! a handler longer than that.

use crate::infer::Infer;
use crate::load::Readiness;
use crate::openai::ApiError;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sirocco_metrics::RouterMetrics;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) metrics: Arc<RouterMetrics>,
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) infer: Arc<Infer>,
}

pub(crate) fn app(state: HttpState) -> Router {
    let s = state.clone();
    let metrics = get(move || {
        let s = s.clone();
        async move {
            s.metrics.ready_replicas.set(s.readiness.ready_count() as i64);
            s.metrics.queue_depth.set(s.infer.queue.len() as i64);
            (
                [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                sirocco_metrics::encode(&s.metrics.registry),
            )
        }
    });
    let r = state.readiness.clone();
    let ready = get(move || {
        let r = r.clone();
        async move {
            let n = r.ready_count();
            if n > 0 {
                (StatusCode::OK, format!("ready: {n} replica(s)\n"))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: no replica completed a step in the last {:?}\n", r.window),
                )
            }
        }
    });
    Router::new()
        .route("/metrics", metrics)
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", ready)
}

/// Makes `app` read each request body whole first: refused with 413 past `max_bytes`,
/// and with 408 when the client has not sent it all within `timeout`.
pub(crate) fn read_bodies_whole(app: Router, timeout: Duration, max_bytes: usize) -> Router {
    app.layer(axum::middleware::from_fn(move |req: Request, next: Next| {
        read_body(req, next, timeout, max_bytes)
    }))
    // The body is bounded here; the extractors' own 2 MB default would contradict it.
    .layer(DefaultBodyLimit::disable())
}

async fn read_body(req: Request, next: Next, timeout: Duration, max_bytes: usize) -> Response {
    let too_large = || {
        closing(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is over the limit of {max_bytes} bytes"),
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_bytes as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, max_bytes)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(e)) if is_length_limit(&e) => too_large(),
        Ok(Err(e)) => closing(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("cannot read the request body: {e}"),
        )),
        Err(_) => closing(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {:.1} s (--http-body-timeout)",
                timeout.as_secs_f64()
            ),
        )),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// `e` as a response after which the connection closes: the rest of the body is
/// not worth reading.
fn closing(e: ApiError) -> Response {
    let mut r = e.into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}
