//! The model's hyper-parameters, read from a Hugging Face `config.json`.
//!
//! Accepts what transformers 4.x and 5.x write: `rope_theta` top-level or inside
//! `rope_parameters`, `head_dim` present or derived, `sliding_window` an integer or
//! `null`, and `torch_dtype` or `dtype`.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Mistral hyper-parameters, validated.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MistralConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Keys a query sees, itself included; `None` is plain causal attention.
    pub sliding_window: Option<usize>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint says it was saved in, if it says.
    pub torch_dtype: Option<String>,
}

impl MistralConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("config is not valid JSON")?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().context("config must be a JSON object")?;
        let arch_ok = match obj.get("architectures").and_then(Value::as_array) {
            Some(a) => a.iter().any(|x| x.as_str() == Some("MistralForCausalLM")),
            None => obj.get("model_type").and_then(Value::as_str) == Some("mistral"),
        };
        if !arch_ok {
            let got = obj
                .get("architectures")
                .map(|a| a.to_string())
                .or_else(|| obj.get("model_type").map(|a| a.to_string()))
                .unwrap_or_else(|| "nothing".into());
            bail!("unsupported architecture {got}: sirocco serves MistralForCausalLM (model_type \"mistral\")");
        }
        let usize_field = |name: &str| -> Result<Option<usize>> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .with_context(|| format!("`{name}` must be a non-negative integer, got {x}")),
            }
        };
        let required = |name: &str| -> Result<usize> {
            usize_field(name)?.with_context(|| format!("missing required field `{name}`"))
        };
        let float_field = |v: Option<&Value>, name: &str| -> Result<Option<f64>> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .with_context(|| format!("`{name}` must be a number, got {x}")),
            }
        };

        let hidden_size = required("hidden_size")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_key_value_heads = usize_field("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            bail!("num_attention_heads and num_key_value_heads must be positive");
        }
        let head_dim = match usize_field("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    bail!("no `head_dim`, and hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}");
                }
                hidden_size / num_attention_heads
            }
        };
        let rope_params = obj.get("rope_parameters").filter(|p| !p.is_null());
        let rope_scaling = obj.get("rope_scaling").filter(|p| !p.is_null());
        for p in [rope_params, rope_scaling].into_iter().flatten() {
            let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str);
            if let Some(kind) = kind {
                if kind != "default" {
                    bail!("unsupported rope type {kind:?}: only the default RoPE is implemented");
                }
            }
        }
        let rope_theta = match float_field(obj.get("rope_theta"), "rope_theta")? {
            Some(t) => t,
            None => float_field(
                rope_params.and_then(|p| p.get("rope_theta")),
                "rope_parameters.rope_theta",
            )?
            .unwrap_or(10_000.0),
        };
        // transformers' MistralConfig defaults to a 4096 window when the key is absent.
        let sliding_window = match obj.get("sliding_window") {
            None => Some(4096),
            Some(Value::Null) => None,
            Some(x) => Some(
                x.as_u64()
                    .filter(|&w| w > 0)
                    .with_context(|| format!("`sliding_window` must be a positive integer or null, got {x}"))?
                    as usize,
            ),
        };
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("unsupported hidden_act {act:?}: Mistral uses silu");
            }
        }
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|n| n as u32)).collect(),
            Some(x) => vec![x.as_u64().context("`eos_token_id` must be an integer")? as u32],
        };
        let cfg = MistralConfig {
            vocab_size: required("vocab_size")?,
            hidden_size,
            intermediate_size: required("intermediate_size")?,
            num_hidden_layers: required("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: float_field(obj.get("rms_norm_eps"), "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            sliding_window,
            max_position_embeddings: usize_field("max_position_embeddings")?.unwrap_or(32_768),
            tie_word_embeddings: obj.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: usize_field("bos_token_id")?.map(|n| n as u32),
            eos_token_ids,
            torch_dtype: obj
                .get("dtype")
                .or_else(|| obj.get("torch_dtype"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim);
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                bail!("`{name}` must be positive");
            }
        }
        Ok(())
    }

    /// The longest sequence (prompt plus generated) the model serves.
    pub fn max_context(&self) -> usize {
        self.max_position_embeddings
    }

    /// Positions a sequence's KV cache must hold: the window, or the whole context.
    pub fn kv_positions(&self) -> usize {
        match self.sliding_window {
            Some(w) => w.min(self.max_context()),
            None => self.max_context(),
        }
    }

    /// Parameters in the model, for logs and benchmarks.
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + lm_head + self.num_hidden_layers * layer + h
    }

    /// Writes the config as transformers 5 would (for generated checkpoints).
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "dtype": self.torch_dtype.clone().unwrap_or_else(|| "float32".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V5: &str = r#"{"architectures":["MistralForCausalLM"],"vocab_size":512,"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2,
        "head_dim":8,"rope_parameters":{"rope_theta":10000.0,"rope_type":"default"},"sliding_window":16,
        "dtype":"float32","eos_token_id":2,"bos_token_id":1,"rms_norm_eps":1e-5}"#;

    #[test]
    fn reads_transformers_5_layout() {
        let c = MistralConfig::from_json_str(V5).unwrap();
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.sliding_window, Some(16));
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.torch_dtype.as_deref(), Some("float32"));
    }

    #[test]
    fn reads_legacy_layout() {
        let legacy = r#"{"architectures":["MistralForCausalLM"],"vocab_size":32000,"hidden_size":4096,
            "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
            "rope_theta":1000000.0,"sliding_window":null,"torch_dtype":"bfloat16","max_position_embeddings":32768}"#;
        let c = MistralConfig::from_json_str(legacy).unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.kv_positions(), 32768);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        // 7.24B parameters for Mistral 7B.
        assert_eq!(c.num_params(), 7_241_732_096);
    }

    #[test]
    fn refuses_other_architectures_and_bad_fields() {
        let llama = V5.replace("MistralForCausalLM", "LlamaForCausalLM");
        let e = MistralConfig::from_json_str(&llama).unwrap_err().to_string();
        assert!(e.contains("LlamaForCausalLM"), "{e}");
        let e = MistralConfig::from_json_str(&V5.replace("\"num_hidden_layers\":2,", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_hidden_layers"), "{e}");
        let e = MistralConfig::from_json_str(&V5.replace("\"sliding_window\":16", "\"sliding_window\":\"x\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sliding_window"), "{e}");
        let e = MistralConfig::from_json_str(&V5.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple"), "{e}");
    }
}
