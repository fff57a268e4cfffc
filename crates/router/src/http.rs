//! The router's HTTP side: `/metrics` (Prometheus), `/health` (the process answers)
//! and `/ready` (some replica completed a forward step and collective within the
//! readiness window; idle replicas run canary steps to keep this true).

use crate::infer::{Infer, Readiness};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use sirocco_metrics::RouterMetrics;
use sirocco_tokenizer::Tokenizer;
use std::sync::Arc;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<RouterMetrics>,
    pub readiness: Arc<Readiness>,
    pub infer: Arc<Infer>,
    pub tokenizer: Option<Tokenizer>,
}

pub fn app(state: HttpState) -> Router {
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
