//! Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with a
//! fitting HTTP status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tonic::{Code, Status};

/// An error in OpenAI's shape with a fitting HTTP status.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) kind: &'static str,
    pub(super) param: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
        }
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub(super) fn param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }

    pub(super) fn from_status(s: &Status) -> Self {
        let (status, kind) = match s.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
            Code::DeadlineExceeded => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        Self::new(status, kind, s.message())
    }

    /// The error object, as a response body or a stream's error event carries it.
    pub(super) fn body(&self, param: bool) -> serde_json::Value {
        let param = if param { self.param.as_deref() } else { None };
        json!({"error": {"message": self.message, "type": self.kind, "param": param, "code": null}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body(true);
        (self.status, Json(body)).into_response()
    }
}
