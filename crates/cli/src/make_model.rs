//! `sirocco make-model`: writes a Mistral-architecture checkpoint with generated
//! weights in Hugging Face layout, for benchmarks and trials at sizes the built-in
//! model does not have.

use anyhow::{Context, Result};
use clap::Args;
use sirocco_model::{generated_tensors, MistralConfig};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct MakeModelArgs {
    /// Directory to write config.json, model.safetensors (and tokenizer.json) into.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 768)]
    pub hidden: usize,
    #[arg(long, default_value_t = 12)]
    pub layers: usize,
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 3072)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    /// Sliding window; 0 for none.
    #[arg(long, default_value_t = 4096)]
    pub window: usize,
    #[arg(long, default_value_t = 32768)]
    pub max_context: usize,
    /// A tokenizer.json to copy beside the weights (its vocabulary should match).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Split the weights over this many safetensors files.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stored dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Writes `tensors` (stored as `dtype`, over `shards` files) and `cfg`'s config.json
/// into `out` in Hugging Face layout.
pub fn write_hf(
    out: &std::path::Path,
    cfg: &MistralConfig,
    tensors: Vec<(String, candle_core::Tensor)>,
    dtype: candle_core::DType,
    shards: usize,
) -> Result<()> {
    let torch_dtype = match dtype {
        candle_core::DType::BF16 => "bfloat16",
        candle_core::DType::F16 => "float16",
        _ => "float32",
    };
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    sirocco_model::weights::write_checkpoint(out, &tensors, shards)?;
    let cfg = MistralConfig {
        torch_dtype: Some(torch_dtype.into()),
        ..cfg.clone()
    };
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&cfg.to_hf_json())?,
    )?;
    Ok(())
}

pub fn run(a: MakeModelArgs) -> Result<()> {
    let dtype = sirocco_model::parse_dtype(&a.dtype)?;
    let cfg = MistralConfig {
        vocab_size: a.vocab,
        hidden_size: a.hidden,
        intermediate_size: a.intermediate,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        num_key_value_heads: a.kv_heads,
        head_dim: a.hidden / a.heads,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        sliding_window: (a.window > 0).then_some(a.window),
        max_position_embeddings: a.max_context,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        torch_dtype: None,
    };
    cfg.validate()?;
    eprintln!("generating {} parameters into {}", cfg.num_params(), a.out.display());
    write_hf(&a.out, &cfg, generated_tensors(&cfg, a.seed)?, dtype, a.shards)?;
    if let Some(t) = &a.tokenizer {
        std::fs::copy(t, a.out.join("tokenizer.json")).with_context(|| format!("cannot copy {}", t.display()))?;
    }
    println!("{}", a.out.display());
    Ok(())
}
