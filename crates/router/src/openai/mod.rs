//! The OpenAI-compatible HTTP API: `POST /v1/completions`, `POST /v1/chat/completions`
//! (both streaming as server-sent events ending in `data: [DONE]`) and
//! `GET /v1/models`. Requests are translated into the same validated requests the
//! gRPC API queues, so both see the same limits and the same batches.
//!
//! Every body field is either supported or refused by name; nothing is silently
//! ignored (but `user`, which only labels a request). As in vLLM, `prompt` may be
//! token ids, and `ignore_eos` and `return_token_ids` are accepted.
//!
//! - [`error`]: errors in OpenAI's shape, with their HTTP status;
//! - [`constraint`]: structured-output fields (`response_format`, vLLM's `guided_*`);
//! - [`request`]: a body parsed and checked field by field ([`request::FieldError`]
//!   names the field at fault);
//! - [`response`]: whole responses and server-sent event streams from a request's events;
//! - [`routes`]: the handlers, which check the key, queue the request and answer.

mod constraint;
mod error;
mod request;
mod response;
mod routes;

pub(crate) use error::ApiError;
pub(crate) use routes::{routes, OpenAiState};
