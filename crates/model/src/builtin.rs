//! The built-in model: a small Mistral-architecture config with deterministic
//! generated weights, so that sirocco runs with nothing downloaded.

use crate::config::MistralConfig;
use crate::gguf::{is_gguf, GgufWeights};
use crate::weights::{fnv1a_extend, Checkpoint, Generated, Slice, WeightSource};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Vocabulary of the built-in model; the built-in tokenizer has exactly this many ids.
pub const BUILTIN_VOCAB_SIZE: usize = 512;
/// Seed of the built-in model's weights.
pub const BUILTIN_SEED: u64 = 0x5172_0cc0;

/// The built-in model's config: 4 layers, hidden 256, 8 query / 2 KV heads, a
/// 256-token sliding window (so the rolling cache is exercised on short demos).
pub fn builtin_config() -> MistralConfig {
    MistralConfig {
        vocab_size: BUILTIN_VOCAB_SIZE,
        hidden_size: 256,
        intermediate_size: 688,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        sliding_window: Some(256),
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        torch_dtype: Some("float32".into()),
    }
}

/// The built-in model's weights: generated, except that lm_head's rows for special
/// tokens and for bytes that are not printable ASCII are zero. With random weights the
/// other logits straddle zero, so greedy output is readable characters rather than
/// stray bytes that decode to U+FFFD.
struct BuiltinWeights(Arc<Generated>);

/// The built-in tokenizer's id for byte `b` (its byte-level symbols follow the three
/// special tokens).
fn printable_or_merge(id: usize) -> bool {
    match id {
        0..=2 => false,
        3..=258 => {
            let b = (id - 3) as u8;
            b == b'\n' || (0x20..0x7f).contains(&b)
        }
        _ => true,
    }
}

impl WeightSource for BuiltinWeights {
    fn load(&self, name: &str, shape: &[usize], slice: &Slice, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.0.load(name, shape, slice, DType::F32, device)?;
        let t = match (name, slice) {
            ("lm_head.weight", Slice::Rows(rows)) => {
                let keep: Vec<f32> = rows
                    .clone()
                    .map(|id| f32::from(u8::from(printable_or_merge(id))))
                    .collect();
                let n = keep.len();
                t.broadcast_mul(&Tensor::from_vec(keep, (n, 1), device)?)?
            }
            _ => t,
        };
        Ok(t.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    fn fingerprint(&self) -> u64 {
        self.0.fingerprint() ^ 0xb17_1171
    }
}

/// Where a model's config and weights come from.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// The built-in model.
    Builtin,
    /// A Hugging Face checkpoint directory.
    Dir(PathBuf),
    /// A llama.cpp GGUF file (config, weights and tokenizer in one).
    Gguf(PathBuf),
    /// Generated weights for an arbitrary config (benchmarks).
    Generated { config: MistralConfig, seed: u64 },
}

/// A model's config with a handle on its weights.
pub struct LoadedSource {
    pub config: MistralConfig,
    pub weights: Arc<dyn WeightSource>,
    /// The checkpoint directory or GGUF file, when there is one.
    pub dir: Option<PathBuf>,
}

impl LoadedSource {
    /// Identifies config and weights together, as a hex string.
    pub fn fingerprint(&self) -> String {
        let cfg = serde_json::to_string(&self.config).unwrap_or_default();
        let h = fnv1a_extend(self.weights.fingerprint(), cfg.bytes());
        format!("{h:016x}")
    }
}

impl ModelSource {
    /// What `--model` names: a GGUF file, a checkpoint directory, or (absent) the
    /// built-in model.
    pub fn from_arg(path: Option<&Path>) -> Self {
        match path {
            Some(p) if is_gguf(p) => ModelSource::Gguf(p.to_owned()),
            Some(p) => ModelSource::Dir(p.to_owned()),
            None => ModelSource::Builtin,
        }
    }

    /// Reads the config and opens (maps) the weights.
    pub fn open(&self) -> Result<LoadedSource> {
        match self {
            ModelSource::Builtin => Ok(LoadedSource {
                config: builtin_config(),
                weights: Arc::new(BuiltinWeights(Generated::new(BUILTIN_SEED))),
                dir: None,
            }),
            ModelSource::Generated { config, seed } => Ok(LoadedSource {
                config: config.clone(),
                weights: Generated::new(*seed),
                dir: None,
            }),
            ModelSource::Gguf(path) => {
                let weights = GgufWeights::open(path)?;
                Ok(LoadedSource {
                    config: weights.config().clone(),
                    weights: Arc::new(weights),
                    dir: Some(path.clone()),
                })
            }
            ModelSource::Dir(dir) => {
                if dir.is_file() {
                    anyhow::bail!(
                        "model path {} is a file but not a GGUF file: give a Hugging Face checkpoint directory or a .gguf file",
                        dir.display()
                    );
                }
                if !dir.is_dir() {
                    anyhow::bail!("model directory {} does not exist", dir.display());
                }
                let config = MistralConfig::from_file(&dir.join("config.json"))?;
                Ok(LoadedSource {
                    config,
                    weights: open_checkpoint(dir)?,
                    dir: Some(dir.clone()),
                })
            }
        }
    }
}

/// A pre-quantized checkpoint serves its float tensors (embeddings, norms, lm_head,
/// and any module the scheme leaves out) as any checkpoint does, and its quantized
/// linear weights to the layers that ask.
impl WeightSource for crate::quantized::Prequantized {
    fn load(&self, name: &str, shape: &[usize], slice: &Slice, dtype: DType, device: &Device) -> Result<Tensor> {
        self.tensors.load(name, shape, slice, dtype, device)
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains(name)
    }
    fn fingerprint(&self) -> u64 {
        self.tensors.fingerprint()
    }
    fn prequantized(&self) -> Option<&crate::quantized::Prequantized> {
        Some(self)
    }
}

/// The checkpoint at `dir`: pre-quantized when its config.json declares a
/// `quantization_config` (a variant sirocco cannot read is refused naming its field).
fn open_checkpoint(dir: &Path) -> Result<Arc<dyn WeightSource>> {
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let tensors = Checkpoint::open(dir).with_context(|| format!("loading weights from {}", dir.display()))?;
    let scheme = crate::quantized::read_quantization(&json)
        .with_context(|| format!("{}: quantization_config", config.display()))?;
    Ok(match scheme {
        None => Arc::new(tensors),
        // A scheme that also quantizes activations (W8A8) runs here with float
        // activations: its weights are all the model needs.
        Some(scheme) => Arc::new(crate::quantized::Prequantized { scheme, tensors }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{write_gguf, GgmlDType};
    use crate::weights::{generated_tensors, write_checkpoint};

    #[test]
    fn model_source_recognises_gguf_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MistralConfig {
            num_hidden_layers: 1,
            // Not in a GGUF file.
            torch_dtype: None,
            ..builtin_config()
        };
        let tensors = generated_tensors(&cfg, 3).unwrap();
        let hf = dir.path().join("hf");
        write_checkpoint(&hf, &tensors, 1).unwrap();
        let path = dir.path().join("model.gguf");
        write_gguf(&path, &cfg, &tensors, |_| GgmlDType::F32, &[]).unwrap();

        assert!(matches!(ModelSource::from_arg(Some(&path)), ModelSource::Gguf(_)));
        let renamed = path.with_file_name("model.bin");
        std::fs::copy(&path, &renamed).unwrap();
        assert!(matches!(ModelSource::from_arg(Some(&renamed)), ModelSource::Gguf(_)));
        assert!(matches!(ModelSource::from_arg(Some(&hf)), ModelSource::Dir(_)));
        let missing = hf.join("gone.gguf");
        let e = ModelSource::from_arg(Some(&missing)).open().err().unwrap().to_string();
        assert!(e.contains("cannot open GGUF file") && e.contains("gone.gguf"), "{e}");
        let loaded = ModelSource::from_arg(Some(&renamed)).open().unwrap();
        assert_eq!(loaded.config, cfg);
        let other = hf.join("model.safetensors");
        let e = ModelSource::from_arg(Some(&other)).open().err().unwrap().to_string();
        assert!(e.contains("not a GGUF file"), "{e}");
    }
}
