//! The web console on the router's HTTP address: `/` and `/console/*` serve the
//! single-page console (HTML, JS and CSS embedded in the binary, no network at run
//! time), and the JSON it reads, which is also public API: `GET /v1/cluster`
//! (replicas, ranks, queue, etcd), `GET /v1/traffic` (recent throughput and
//! latency) and `POST /v1/replicas/{id}/drain`. The API calls need the API key when
//! one is set, as the OpenAI ones do.
//!
//! Nothing is served cross-origin: no CORS header is ever sent, and
//! [`same_origin_only`] refuses any request a browser marks as coming from another
//! site, so a page elsewhere cannot drive the console's calls (a drain) with the
//! operator's browser. Console pages carry a strict Content-Security-Policy: no
//! inline script or style, no framing.

use crate::cluster::State;
use crate::openai::ApiError;
use crate::pool::{DrainRefused, Pool};
use crate::traffic::Traffic;
use axum::extract::{Path, Request, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("console/assets/index.html");
const APP_JS: &str = include_str!("console/assets/app.js");
const APP_CSS: &str = include_str!("console/assets/app.css");

/// The policy of every console page: its own files and same-origin calls only.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

#[derive(Clone)]
pub(crate) struct ConsoleState {
    pub(crate) pool: Arc<Pool>,
    pub(crate) traffic: Arc<Traffic>,
    pub(crate) api_key: Option<String>,
    pub(crate) max_queue: usize,
}

pub(crate) fn routes(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/v1/cluster", get(cluster))
        .route("/v1/traffic", get(traffic))
        .route("/v1/replicas/{id}/drain", post(drain))
        .with_state(Arc::new(state))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
            // The files change with the binary: revalidate rather than cache stale code.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

fn check_key(key: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if crate::headers::authorized(key, given) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key (send Authorization: Bearer <key>)",
        ))
    }
}

async fn cluster(Extract(s): Extract<Arc<ConsoleState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_key(s.api_key.as_deref(), &headers)?;
    let mut view = serde_json::to_value(s.pool.board.view(s.pool.queue.len(), s.max_queue))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string()))?;
    let m = &s.pool.model;
    view["model"] = json!({
        "name": m.name,
        "fingerprint": s.pool.fingerprint,
        "tp": m.tp,
        "max_context": m.max_context,
        "sliding_window": m.sliding_window,
        "kv_block_size": m.kv.block_size,
    });
    Ok(Json(view).into_response())
}

async fn traffic(Extract(s): Extract<Arc<ConsoleState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_key(s.api_key.as_deref(), &headers)?;
    Ok(Json(s.traffic.view()).into_response())
}

async fn drain(
    Extract(s): Extract<Arc<ConsoleState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_key(s.api_key.as_deref(), &headers)?;
    let Ok(n) = id.parse::<usize>() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("no replica {id:?}: replica ids are numbers (see GET /v1/cluster)"),
        ));
    };
    match s.pool.drain(n).await {
        Ok(()) => Ok((StatusCode::ACCEPTED, Json(json!({"id": n, "state": State::Draining}))).into_response()),
        Err(DrainRefused::Unknown) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("no replica {n} is serving (see GET /v1/cluster)"),
        )),
        Err(DrainRefused::NotServing(state)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict_error",
            format!(
                "replica {n} is {}; only a ready replica can be drained",
                serde_json::to_value(state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
        )),
    }
}

/// Refuses (403) a request that a browser says comes from another origin: its
/// `Origin` names another host than the one it was sent to, or its
/// `Sec-Fetch-Site` says `cross-site`. Clients that are not browsers send neither.
pub(crate) async fn same_origin_only(req: Request, next: Next) -> Response {
    let h = req.headers();
    let text = |name: header::HeaderName| h.get(name).and_then(|v| v.to_str().ok());
    let host = h
        .get("x-forwarded-host")
        .and_then(|v| v.to_str().ok())
        .or_else(|| text(header::HOST));
    let cross_site = h.get("sec-fetch-site").is_some_and(|v| v.as_bytes() == b"cross-site");
    let other_origin = text(header::ORIGIN).is_some_and(|o| {
        let authority = o.split_once("://").map_or(o, |(_, rest)| rest);
        Some(authority) != host
    });
    if cross_site || other_origin {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "cross-origin requests are not served: use the console on this address, or call the API without a browser",
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn app() -> Router {
        Router::new()
            .route("/x", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(same_origin_only))
    }

    async fn status(headers: &[(&str, &str)]) -> StatusCode {
        let mut req = Request::builder().uri("/x").header("host", "127.0.0.1:8080");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        app().oneshot(req.body(Body::empty()).unwrap()).await.unwrap().status()
    }

    #[tokio::test]
    async fn only_same_origin_and_non_browser_requests_pass() {
        assert_eq!(status(&[]).await, StatusCode::OK);
        assert_eq!(status(&[("origin", "http://127.0.0.1:8080")]).await, StatusCode::OK);
        assert_eq!(status(&[("sec-fetch-site", "same-origin")]).await, StatusCode::OK);
        assert_eq!(
            status(&[("origin", "http://evil.example")]).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(&[("origin", "http://127.0.0.1:9090")]).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(status(&[("origin", "null")]).await, StatusCode::FORBIDDEN);
        assert_eq!(status(&[("sec-fetch-site", "cross-site")]).await, StatusCode::FORBIDDEN);
    }

    #[test]
    fn the_pages_load_only_their_own_files() {
        // The policy forbids inline code: the page must reference its files instead.
        assert!(INDEX_HTML.contains("console/app.js") && INDEX_HTML.contains("console/app.css"));
        let lower = INDEX_HTML.to_lowercase();
        assert!(!lower.contains("<script>") && !lower.contains(" onclick=") && !lower.contains(" style="));
        assert!(
            !lower.contains("http://") && !lower.contains("https://"),
            "no remote resources"
        );
    }
}
