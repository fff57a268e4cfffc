//! Collective operations that join the tensor-parallel ranks of one replica.
//!
//! The model only ever talks to the [`Collective`] trait. Implementations:
//! - [`local`]: ranks are threads of one process (tests, `sirocco generate --tp N`).
//! - [`tcp`]: ranks are separate processes (possibly on separate hosts) joined to rank 0
//!   over TCP; data moves through host memory as f32.
//! - `nccl` (feature `cuda`): ranks are GPUs joined by NCCL; tensors stay on the device.

mod host;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

use candle_core::Tensor;
use std::time::Duration;

pub use local::LocalGroup;
#[cfg(feature = "cuda")]
pub use nccl::NcclCollective;
pub use tcp::TcpCollective;

/// Why a collective call failed. Every variant is terminal for the group: a replica
/// whose collective broke must be rebuilt rather than retried.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("collective {op} timed out after {timeout:?} waiting for ranks {missing:?}")]
    Timeout {
        op: &'static str,
        timeout: Duration,
        missing: Vec<usize>,
    },
    #[error("collective group is broken: {0}")]
    Broken(String),
    #[error("collective {op}: {msg}")]
    Mismatch { op: &'static str, msg: String },
    #[error("collective tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

/// The operations a tensor-parallel rank needs from its peers.
///
/// Every rank of a group must call the same operations in the same order with
/// tensors of the same shape and dtype; results are identical on every rank.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks; same shape and dtype as the input.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Concatenation of every rank's tensor along dim 0, in rank order. All ranks must
    /// pass the same shape (NCCL requires it); callers pad uneven slices.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// `root`'s tensor on every rank. Non-root ranks pass a tensor of the same shape.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
}

/// A group of one: every operation is the identity. Used at tp = 1.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
