//! How steps are planned and when sequences stop: the policy that the router's
//! batcher, the engine's offline `generate` loop and `bench-engine --streams` share,
//! written once. Pure logic, no I/O: callers own their sequences and the executor.
//!
//! - [`SchedulerConfig`]: max batch, prefill chunk and prefill budget, with their
//!   defaults in one place.
//! - [`KvGeometry`]: the KV slots a sequence holds on a rank (at most one window, in
//!   whole blocks), for admission under KV pressure.
//! - [`Planner`]: admission (batch and KV room) and the composition of each step
//!   (every prefilled sequence decodes; prompts are read in chunks, oldest first,
//!   within the step's prefill budget).
//! - [`StopCriteria`]: max tokens, EOS unless ignored, stop token ids and stop
//!   sequences over the detokenized text, and the one [`FinishReason`].
//! - [`pick_replica`]: cache-aware routing over a [`PrefixIndex`] per replica, within
//!   an imbalance threshold.

mod config;
mod kv;
mod planner;
mod route;
mod stop;

pub use config::SchedulerConfig;
pub use kv::KvGeometry;
pub use planner::{Holder, Planned, Planner, Scheduled, Work};
pub use route::{pick_replica, Candidate, PrefixIndex};
pub use stop::{FinishReason, Judged, StopCriteria, StopMatch};
