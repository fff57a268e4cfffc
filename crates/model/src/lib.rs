//! The Mistral model as one tensor-parallel rank sees it: its config, the slice of
//! the weights it holds ([`partition`]), where those weights come from
//! ([`weights`], [`gguf`], [`builtin`]), its rolling KV cache ([`kv_cache`]), its linear
//! layers ([`linear`]), attention over the cache ([`attention`]), the CPU kernels'
//! glue ([`cpu`]), the CUDA kernels (`cuda`, with `--features cuda`) and the forward
//! pass ([`mistral`]: one struct per part of the architecture).

pub mod attention;
pub mod builtin;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gguf;
pub mod kv_cache;
pub mod linear;
pub mod mistral;
pub mod partition;
pub mod quantized;
pub mod weights;

pub use builtin::{builtin_config, LoadedSource, ModelSource, BUILTIN_VOCAB_SIZE};
pub use config::MistralConfig;
pub use kv_cache::{KvCache, KvCacheConfig, KvStats, SeqId};
pub use linear::{Linear, Quantize};
pub use mistral::{Chunk, Mistral};
pub use partition::{allowed_degrees, Partition};
pub use quantized::{load_quantized, read_quantization, Prequantized, QuantScheme, QuantizedTensor};
pub use weights::{generated_tensors, read_tensors, Checkpoint, Generated, Slice, WeightSource};

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

/// Where a rank computes, as `--device` spells it: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// CUDA device ordinal (for a group of threads, rank `r` uses ordinal `N + r`).
    Cuda(usize),
}

/// Whether this build has the CUDA backend (`--features cuda`).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// Parses `cpu`, `cuda` or `cuda:N`. CUDA is refused, with a clear message, by a
    /// build without the `cuda` feature.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let spec = match s.trim() {
            "cpu" => DeviceSpec::Cpu,
            "cuda" | "gpu" => DeviceSpec::Cuda(0),
            other => match other.strip_prefix("cuda:") {
                Some(n) => DeviceSpec::Cuda(
                    n.parse()
                        .map_err(|_| anyhow::anyhow!("bad device {s:?}: the ordinal in cuda:N must be a number"))?,
                ),
                None => anyhow::bail!("unsupported device {s:?}: use cpu, cuda or cuda:N"),
            },
        };
        if matches!(spec, DeviceSpec::Cuda(_)) && !CUDA_BUILD {
            anyhow::bail!(
                "--device {s}: this sirocco was built without the cuda feature \
                 (build it with scripts/build-cuda.sh, i.e. cargo build --release -p sirocco --features cuda)"
            );
        }
        Ok(spec)
    }

    /// The dtype used when none is given: bf16 on CUDA, f32 on the CPU.
    pub fn default_dtype(&self) -> candle_core::DType {
        match self {
            DeviceSpec::Cpu => candle_core::DType::F32,
            DeviceSpec::Cuda(_) => candle_core::DType::BF16,
        }
    }

    /// `--dtype` if given, else [`DeviceSpec::default_dtype`].
    pub fn dtype_or_default(&self, dtype: Option<&str>) -> anyhow::Result<candle_core::DType> {
        dtype.map_or(Ok(self.default_dtype()), parse_dtype)
    }

    /// The same spec shifted by `offset` CUDA ordinals (the CPU stays the CPU).
    pub fn offset(&self, offset: usize) -> Self {
        match self {
            DeviceSpec::Cpu => DeviceSpec::Cpu,
            DeviceSpec::Cuda(n) => DeviceSpec::Cuda(n + offset),
        }
    }

    /// Opens the device.
    pub fn open(&self) -> anyhow::Result<candle_core::Device> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => {
                candle_core::Device::new_cuda(*n).map_err(|e| anyhow::anyhow!("cannot open CUDA device {n}: {e}"))
            }
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => anyhow::bail!("this sirocco was built without the cuda feature"),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        DeviceSpec::parse(s)
    }
}

/// The name `parse_dtype` accepts for `dtype` (f32, bf16, f16).
pub fn dtype_name(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::F32 => "f32",
        candle_core::DType::BF16 => "bf16",
        candle_core::DType::F16 => "f16",
        _ => "other",
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::Cpu.default_dtype(), candle_core::DType::F32);
        assert_eq!(DeviceSpec::Cuda(1).default_dtype(), candle_core::DType::BF16);
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        assert!(DeviceSpec::parse("tpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
        if CUDA_BUILD {
            assert_eq!(DeviceSpec::parse("cuda:2").unwrap(), DeviceSpec::Cuda(2));
        } else {
            let e = DeviceSpec::parse("cuda").unwrap_err().to_string();
            assert!(e.contains("built without the cuda feature"), "{e}");
        }
    }
}
