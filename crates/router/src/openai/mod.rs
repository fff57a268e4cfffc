//! The OpenAI-compatible HTTP API: `POST /v1/completions`, `POST /v1/chat/completions`
//! (both streaming as server-sent events ending in `data: [DONE]`) and
//! `GET /v1/models`, and OpenAI's Batch API. Requests are translated into the same validated requests the
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
//! - [`routes`]: the handlers, which check the key, queue the request and answer;
//! - [`tools`]: a chat request's tools, and the grammar that makes the model call one;
//! - [`tool_calls`]: the calls read back out of an answer, whole or streamed;
//! - [`batches`]: the Files and Batch APIs (`/v1/files`, `/v1/batches`) over a data
//!   directory, their lines run through the routes above at a low priority.

mod batches;
mod constraint;
mod error;
mod request;
mod response;
mod routes;
mod tool_calls;
mod tools;

pub(crate) use batches::{routes as batch_routes, Batches, MAX_FILE_BYTES};
pub(crate) use error::ApiError;
pub(crate) use routes::{routes, OpenAiState};
