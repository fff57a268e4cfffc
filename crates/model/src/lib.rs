//! The Mistral model as one tensor-parallel rank sees it: its config, the slice of
//! the weights it holds ([`partition`]), where those weights come from
//! ([`weights`], [`builtin`]), its rolling KV cache ([`kv_cache`]) and the forward
//! pass ([`mistral`]).

pub mod builtin;
pub mod config;
pub mod kv_cache;
pub mod mistral;
pub mod partition;
pub mod weights;

pub use builtin::{builtin_config, generated_tensors, LoadedSource, ModelSource, BUILTIN_VOCAB_SIZE};
pub use config::MistralConfig;
pub use kv_cache::{KvCache, KvCacheConfig, KvStats, SeqId};
pub use mistral::{Chunk, Mistral};
pub use partition::{allowed_degrees, Partition};
pub use weights::{Checkpoint, Generated, Slice, WeightSource};

/// Parses a dtype name as the CLI and configs spell it.
pub fn parse_dtype(s: &str) -> anyhow::Result<candle_core::DType> {
    use candle_core::DType;
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        _ => anyhow::bail!("unsupported dtype {s:?}: use f32, bf16 or f16"),
    })
}
