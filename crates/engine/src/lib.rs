//! Runs a Mistral model split over tensor-parallel ranks.
//!
//! - [`rank`]: one rank's model slice and KV cache, how both are loaded and sized
//!   (the same for in-process groups and shard processes), and the step it executes.
//! - [`group`]: a tensor-parallel group whose ranks are threads of this process.
//! - [`generate`]: turning prompts into tokens over any [`StepExecutor`]: chunked
//!   prefill, batched decode, sampling and stop conditions.

pub mod generate;
pub mod group;
pub mod rank;
pub mod step;

pub use generate::{generate_batch, score, GenerateRequest, Generation};
pub use group::{EngineOptions, TpGroup};
pub use rank::Rank;
pub use sirocco_scheduler::{FinishReason, SchedulerConfig};
pub use step::{SeqOutput, SeqStep};

use sirocco_model::{KvStats, SeqId};

/// Something that runs steps of a model: an in-process group, or a replica of
/// shard processes driven over the network.
pub trait StepExecutor {
    /// Runs one step on every rank and returns rank 0's output for each sequence, in
    /// the order given.
    fn step(&mut self, steps: &[SeqStep]) -> anyhow::Result<Vec<SeqOutput>>;
    /// Starts each new sequence from the longest cached prefix of its input (see
    /// `KvCache::attach`) on every rank, and caches its own full blocks for later
    /// sequences; returns each one's cached length. Ranks that disagree are an error.
    fn attach(&mut self, seqs: &[(SeqId, Vec<u32>)]) -> anyhow::Result<Vec<usize>>;
    /// Frees the KV cache of `seqs` on every rank.
    fn release(&mut self, seqs: &[SeqId]) -> anyhow::Result<()>;
    /// Each rank's cache statistics, in rank order.
    fn kv_stats(&mut self) -> anyhow::Result<Vec<KvStats>>;
    /// The KV pool that admission reserves against, with what is free of it now;
    /// `None` when unknown (admission is then bounded by the batch size alone).
    fn kv_geometry(&mut self) -> anyhow::Result<Option<sirocco_scheduler::KvGeometry>> {
        Ok(None)
    }
}
