//! llama.cpp GGUF checkpoints: the config from the file's metadata, and the weights
//! dequantized to the dtype the model asks for, under the Hugging Face names the rest
//! of sirocco uses.
//!
//! Two things differ from a Hugging Face checkpoint besides the names: llama.cpp's
//! converter permutes the rows of the q and k projections (it rotates interleaved
//! pairs, Hugging Face rotates halves), and quantized tensors come in blocks. Both are
//! undone here, so a GGUF model runs through the same forward pass as a safetensors one.

use crate::config::MistralConfig;
use crate::quantized::QuantizedTensor;
use crate::weights::{fnv1a_extend, Slice, WeightSource, FNV_OFFSET};
use anyhow::{bail, Context, Result};
pub use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::gguf_file::{self, Content, TensorInfo};
pub use candle_core::quantized::GgmlDType;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

mod blocks;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The first four bytes of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Whether `path` names a GGUF file: a path ending in `.gguf` that is not a directory
/// (a missing one too, so that the error is about a missing GGUF file), or any file
/// that starts with the GGUF magic (llama.cpp does not insist on the extension).
pub fn is_gguf(path: &Path) -> bool {
    if path.is_dir() {
        return false;
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == GGUF_MAGIC)
}

/// Reads a GGUF file's header: its metadata and where each tensor lies.
pub fn read_content(path: &Path) -> Result<Content> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
    let mut reader = std::io::BufReader::new(&mut file);
    Content::read(&mut reader).map_err(|e| {
        let msg = e.to_string();
        // candle's message here reads as if it named a tensor; it is the type id.
        match msg.strip_prefix("unknown dtype for tensor ") {
            Some(id) => anyhow::anyhow!(
                "{} holds a tensor of GGML type {id}, which sirocco cannot dequantize \
                 (supported: {SUPPORTED_TYPES})",
                path.display()
            ),
            None => anyhow::anyhow!("{} is not a valid GGUF file: {msg}", path.display()),
        }
    })
}

const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// The types candle reads from a file (it knows Q8_1 and Q8_K, llama.cpp's
/// intermediate types, but cannot load them).
fn readable(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        t,
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// A GGUF file's metadata, with typed lookups that name the key on failure.
pub struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
}

impl<'a> Metadata<'a> {
    pub fn new(content: &'a Content) -> Self {
        Metadata { map: &content.metadata }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    /// An integer of any GGUF integer type.
    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| value_u64(v).with_context(|| bad(key, v)))
            .transpose()
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| match v {
                // llama.cpp stores floats as f32; read 1e-5 as 1e-5, not 9.99999974e-6,
                // so a config matches the Hugging Face one it was converted from.
                Value::F32(x) => Ok(x.to_string().parse::<f64>()?),
                Value::F64(x) => Ok(*x),
                other => value_u64(other).map(|n| n as f64).with_context(|| bad(key, v)),
            })
            .transpose()
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(anyhow::anyhow!(bad(key, v))),
            })
            .transpose()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                _ => Err(anyhow::anyhow!(bad(key, v))),
            })
            .transpose()
    }

    pub fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        self.get(key)
            .map(|v| match v {
                Value::Array(a) => Ok(a.as_slice()),
                _ => Err(anyhow::anyhow!(bad(key, v))),
            })
            .transpose()
    }

    /// The text of the token whose id `id_key` holds (`tokenizer.ggml.bos_token_id`,
    /// say), looked up in `tokenizer.ggml.tokens`.
    pub fn token(&self, id_key: &str) -> Result<Option<&'a str>> {
        let Some(id) = self.u64(id_key)? else {
            return Ok(None);
        };
        match self.array("tokenizer.ggml.tokens")?.and_then(|t| t.get(id as usize)) {
            Some(Value::String(s)) => Ok(Some(s)),
            _ => bail!("`{id_key}` is {id}, which names no string in tokenizer.ggml.tokens"),
        }
    }

    pub fn required_u64(&self, key: &str) -> Result<u64> {
        self.u64(key)?.with_context(|| format!("missing metadata key `{key}`"))
    }
}

/// An unsigned integer of any GGUF integer type (negative values are refused).
pub fn value_u64(v: &Value) -> Result<u64> {
    let n = match *v {
        Value::U8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::U64(x) => x,
        Value::I8(x) => u64::try_from(x)?,
        Value::I16(x) => u64::try_from(x)?,
        Value::I32(x) => u64::try_from(x)?,
        Value::I64(x) => u64::try_from(x)?,
        _ => bail!("not an unsigned integer"),
    };
    Ok(n)
}

fn bad(key: &str, v: &Value) -> String {
    let shown = format!("{v:?}");
    let shown: String = shown.chars().take(80).collect();
    format!("metadata key `{key}` has an unexpected value {shown}")
}

/// Architectures whose tensors and forward pass are Mistral's.
const ARCHITECTURES: [&str; 2] = ["llama", "mistral"];

/// The model config a GGUF file's metadata describes.
pub fn config_from_content(content: &Content) -> Result<MistralConfig> {
    let md = Metadata::new(content);
    let arch = md
        .str("general.architecture")?
        .context("missing metadata key `general.architecture`")?;
    if !ARCHITECTURES.contains(&arch) {
        bail!(
            "unsupported general.architecture {arch:?}: sirocco serves {} GGUF models",
            ARCHITECTURES.join(" and ")
        );
    }
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| -> Result<usize> { Ok(md.required_u64(&key(k))? as usize) };
    if md.u64(&key("expert_count"))?.unwrap_or(0) > 0 {
        bail!("{arch}.expert_count is set: mixture-of-experts models are not supported");
    }
    let hidden_size = req("embedding_length")?;
    let num_attention_heads = req("attention.head_count")?;
    let num_key_value_heads = md
        .u64(&key("attention.head_count_kv"))?
        .map_or(num_attention_heads, |n| n as usize);
    if num_attention_heads == 0 || num_key_value_heads == 0 {
        bail!("{arch}.attention.head_count and head_count_kv must be positive");
    }
    let head_dim = match md.u64(&key("attention.key_length"))? {
        Some(d) => d as usize,
        None => {
            if !hidden_size.is_multiple_of(num_attention_heads) {
                bail!("no {arch}.attention.key_length, and embedding_length {hidden_size} is not divisible by head_count {num_attention_heads}");
            }
            hidden_size / num_attention_heads
        }
    };
    if let Some(v) = md.u64(&key("attention.value_length"))? {
        if v as usize != head_dim {
            bail!("{arch}.attention.value_length {v} differs from the key length {head_dim}: not supported");
        }
    }
    if let Some(rot) = md.u64(&key("rope.dimension_count"))? {
        if rot as usize != head_dim {
            bail!(
                "{arch}.rope.dimension_count {rot} is not the head dimension {head_dim}: partial RoPE is not supported"
            );
        }
    }
    check_rope_scaling(&md, arch)?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        bail!("the file has rope_freqs.weight (Llama 3.1-style RoPE frequency scaling), which is not supported");
    }
    let sliding_window = match md.u64(&key("attention.sliding_window"))? {
        None | Some(0) => None,
        Some(w) => Some(w as usize),
    };
    let embd_rows = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied());
    let tokens = md.array("tokenizer.ggml.tokens")?.map(<[Value]>::len);
    let vocab_size = match (md.u64(&key("vocab_size"))?, embd_rows, tokens) {
        (Some(v), Some(rows), _) if v as usize != rows => {
            bail!("{arch}.vocab_size {v} differs from token_embd.weight's {rows} rows")
        }
        (Some(v), _, _) => v as usize,
        (None, Some(rows), _) => rows,
        (None, None, Some(n)) => n,
        (None, None, None) => {
            bail!("cannot tell the vocabulary size: no {arch}.vocab_size, token_embd.weight or tokenizer.ggml.tokens")
        }
    };
    let token_id = |k: &str| -> Result<Option<u32>> { Ok(md.u64(k)?.map(|n| n as u32)) };
    let mut eos_token_ids: Vec<u32> = Vec::new();
    for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = token_id(k)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let cfg = MistralConfig {
        vocab_size,
        hidden_size,
        intermediate_size: req("feed_forward_length")?,
        num_hidden_layers: req("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: md
            .f64(&key("attention.layer_norm_rms_epsilon"))?
            .with_context(|| format!("missing metadata key `{arch}.attention.layer_norm_rms_epsilon`"))?,
        rope_theta: md.f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        sliding_window,
        max_position_embeddings: req("context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        torch_dtype: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Only unscaled RoPE is implemented; anything else would silently change the model,
/// so it is refused.
fn check_rope_scaling(md: &Metadata, arch: &str) -> Result<()> {
    let kind = md.str(&format!("{arch}.rope.scaling.type"))?.unwrap_or("none");
    let factor = md
        .f64(&format!("{arch}.rope.scaling.factor"))?
        .or(md.f64(&format!("{arch}.rope.scale_linear"))?)
        .unwrap_or(1.0);
    // Linear and YaRN scaling by a factor of 1 change nothing; other kinds (longrope,
    // say) may scale without a factor key, so they are refused whatever it says.
    if factor != 1.0 || !matches!(kind, "none" | "linear" | "yarn") {
        bail!("{arch}.rope.scaling.type is {kind:?} with factor {factor}: only unscaled RoPE is supported");
    }
    Ok(())
}

/// The llama.cpp name of a Hugging Face tensor name, if it has one.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let short = match part {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// How many heads' rows llama.cpp interleaved in this tensor, if it is a q or k weight.
fn rope_heads(gguf: &str, cfg: &MistralConfig) -> Option<usize> {
    if gguf.ends_with(".attn_q.weight") {
        Some(cfg.num_attention_heads)
    } else if gguf.ends_with(".attn_k.weight") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

/// llama.cpp's `permute` (convert_hf_to_gguf.py): each head's rows, seen as
/// `[2, head_dim/2]`, are transposed to `[head_dim/2, 2]`, so that the two halves
/// RoPE rotates together become adjacent rows.
pub fn permute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    swap_row_axes(w, heads, 2)
}

/// The inverse of [`permute_rope_rows`]: back to Hugging Face's layout.
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, _) = w.dims2()?;
    swap_row_axes(w, heads, rows / heads.max(1) / 2)
}

/// Views each head's rows as `[outer, rows/heads/outer]` and transposes that.
fn swap_row_axes(w: &Tensor, heads: usize, outer: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || outer == 0 || !rows.is_multiple_of(heads * 2) || !rows.is_multiple_of(heads * outer) {
        bail!("{rows} rows do not split into {heads} heads of an even size");
    }
    let inner = rows / heads / outer;
    Ok(w.reshape((heads, outer, inner, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The weights of a GGUF file. Each load reads its tensor from the file and
/// dequantizes it whole; slices are cut after that (quantization blocks run along
/// rows, so a column slice could not be read on its own anyway).
pub struct GgufWeights {
    path: PathBuf,
    content: Content,
    config: MistralConfig,
    fingerprint: u64,
}

impl GgufWeights {
    /// Opens `path`: reads its header, derives the config and checks that every tensor
    /// lies inside the file, so a truncated file fails here and not mid-load.
    pub fn open(path: &Path) -> Result<Self> {
        let content = read_content(path)?;
        let config =
            config_from_content(&content).with_context(|| format!("unsupported GGUF model {}", path.display()))?;
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let file_len = file.seek(SeekFrom::End(0))?;
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let mut h = FNV_OFFSET;
        for name in names {
            let info = &content.tensor_infos[name];
            if !readable(info.ggml_dtype) {
                bail!(
                    "tensor `{name}` in {} is stored as {:?}, which sirocco cannot dequantize (supported: {SUPPORTED_TYPES})",
                    path.display(),
                    info.ggml_dtype
                );
            }
            let range = tensor_bytes(info, content.tensor_data_offset)
                .with_context(|| format!("tensor `{name}` in {}", path.display()))?;
            if range.end > file_len {
                bail!(
                    "{} is truncated: tensor `{name}` needs bytes {}..{} but the file has {file_len}",
                    path.display(),
                    range.start,
                    range.end
                );
            }
            // Name, type, shape and the tensor's first and last bytes: cheap, and
            // different for different checkpoints in practice.
            let desc = format!("{name}:{:?}:{:?}", info.ggml_dtype, info.shape.dims());
            h = fnv1a_extend(h, desc.bytes());
            let edge = 64.min(range.end - range.start);
            for start in [range.start, range.end - edge] {
                let mut buf = vec![0u8; edge as usize];
                file.seek(SeekFrom::Start(start))?;
                file.read_exact(&mut buf)
                    .with_context(|| format!("cannot read tensor `{name}` from {}", path.display()))?;
                h = fnv1a_extend(h, buf);
            }
        }
        Ok(GgufWeights {
            path: path.to_owned(),
            content,
            config,
            fingerprint: h,
        })
    }

    pub fn config(&self) -> &MistralConfig {
        &self.config
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    fn read_qtensor(&self, gguf: &str) -> Result<QTensor> {
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("cannot open GGUF file {}", self.path.display()))?;
        self.content
            .tensor(&mut file, gguf, &Device::Cpu)
            .with_context(|| format!("cannot read tensor `{gguf}` from {}", self.path.display()))
    }
}

/// Where a tensor's data lies in the file.
fn tensor_bytes(info: &TensorInfo, data_offset: u64) -> Result<std::ops::Range<u64>> {
    let elems = info.shape.elem_count();
    let block = info.ggml_dtype.block_size();
    if !elems.is_multiple_of(block) {
        bail!(
            "{elems} elements of type {:?} do not fill whole blocks of {block}",
            info.ggml_dtype
        );
    }
    let size = (elems / block * info.ggml_dtype.type_size()) as u64;
    let start = data_offset
        .checked_add(info.offset)
        .context("tensor offset overflows")?;
    Ok(start..start.checked_add(size).context("tensor size overflows")?)
}

impl GgufWeights {
    /// The GGUF name and header of the tensor for Hugging Face name `name`, checked
    /// to have `shape`.
    fn info(&self, name: &str, shape: &[usize]) -> Result<(String, &TensorInfo)> {
        let gguf = gguf_name(name).with_context(|| format!("no GGUF tensor corresponds to `{name}`"))?;
        let info = self.content.tensor_infos.get(&gguf).with_context(|| {
            format!(
                "tensor `{gguf}` (for `{name}`) not found in GGUF file {}",
                self.path.display()
            )
        })?;
        if info.shape.dims() != shape {
            bail!(
                "tensor `{gguf}` in {} has shape {:?}, expected {shape:?} from the metadata",
                self.path.display(),
                info.shape.dims()
            );
        }
        Ok((gguf, info))
    }
}

impl WeightSource for GgufWeights {
    fn native_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QuantizedTensor>> {
        let (gguf, info) = self.info(name, shape)?;
        let &[n, k] = shape else {
            return Ok(None);
        };
        if blocks::native(info.ggml_dtype).is_none() {
            return Ok(None);
        }
        let what = || format!("tensor `{gguf}` in {}", self.path.display());
        let range = tensor_bytes(info, self.content.tensor_data_offset).with_context(what)?;
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        let mut file = std::fs::File::open(&self.path).with_context(what)?;
        file.seek(SeekFrom::Start(range.start)).with_context(what)?;
        file.read_exact(&mut bytes).with_context(what)?;
        let Some(t) = blocks::unpack(info.ggml_dtype, &bytes, n, k).with_context(what)? else {
            return Ok(None);
        };
        Ok(Some(match rope_heads(&gguf, &self.config) {
            Some(heads) => {
                // The rows' order as unpermute_rope_rows puts them (one policy for
                // float and quantized rows).
                let ids = Tensor::arange(0u32, n as u32, &Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .reshape((n, 1))?;
                let order: Vec<usize> = unpermute_rope_rows(&ids, heads)
                    .with_context(what)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|i| i as usize)
                    .collect();
                t.select_rows(&order)
            }
            None => t,
        }))
    }

    fn load(&self, name: &str, shape: &[usize], slice: &Slice, dtype: DType, device: &Device) -> Result<Tensor> {
        let (gguf, _) = self.info(name, shape)?;
        let t = self
            .read_qtensor(&gguf)?
            .dequantize(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        let t = match rope_heads(&gguf, &self.config) {
            Some(heads) => {
                unpermute_rope_rows(&t, heads).with_context(|| format!("tensor `{gguf}` in {}", self.path.display()))?
            }
            None => t,
        };
        let t = match slice {
            Slice::Full => t,
            Slice::Rows(r) => t.narrow(0, r.start, r.len())?,
            Slice::Cols(c) => t.narrow(1, c.start, c.len())?,
        };
        Ok(t.contiguous()?.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// Writes `tensors` (Hugging Face names and layout) as a llama.cpp GGUF file for
/// `cfg`: llama metadata, llama.cpp names, q/k rows permuted as llama.cpp's converter
/// does, each tensor stored as `dtype_of(name)` (quantized where that is a block type).
/// `extra` metadata (a tokenizer, say) is written after the model's.
pub fn write_gguf(
    path: &Path,
    cfg: &MistralConfig,
    tensors: &[(String, Tensor)],
    dtype_of: impl Fn(&str) -> GgmlDType,
    extra: &[(String, Value)],
) -> Result<()> {
    let arch = "llama";
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(cfg.num_hidden_layers as u32)),
        (
            format!("{arch}.context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (format!("{arch}.embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(cfg.num_key_value_heads as u32),
        ),
        (format!("{arch}.attention.key_length"), Value::U32(cfg.head_dim as u32)),
        (format!("{arch}.rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (format!("{arch}.vocab_size"), Value::U32(cfg.vocab_size as u32)),
    ];
    if let Some(w) = cfg.sliding_window {
        md.push((format!("{arch}.attention.sliding_window"), Value::U32(w as u32)));
    }
    if let Some(b) = cfg.bos_token_id {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    md.extend(extra.iter().cloned());
    let mut qtensors = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let gguf = gguf_name(name).with_context(|| format!("`{name}` has no GGUF name"))?;
        let t = t.to_dtype(DType::F32)?;
        let t = match rope_heads(&gguf, cfg) {
            Some(heads) => permute_rope_rows(&t, heads)?,
            None => t,
        };
        let q = QTensor::quantize(&t, dtype_of(name)).with_context(|| format!("cannot store `{name}`"))?;
        qtensors.push((gguf, q));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    gguf_file::write(&mut file, &md_refs, &t_refs).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mistral::{Chunk, Mistral};
    use crate::partition::Partition;
    use crate::weights::{generated_tensors, write_checkpoint, Checkpoint, Generated};
    use std::sync::Arc;

    /// Small, but every matrix has rows of whole 32-element quantization blocks.
    fn config(tie: bool) -> MistralConfig {
        MistralConfig {
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            sliding_window: None,
            max_position_embeddings: 256,
            tie_word_embeddings: tie,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            torch_dtype: None,
        }
    }

    fn all_f32(_: &str) -> GgmlDType {
        GgmlDType::F32
    }

    /// q/k and the embedding in Q8_0, the other matrices in Q4_1, norms in F32.
    fn mixed(name: &str) -> GgmlDType {
        if name.ends_with("norm.weight") {
            GgmlDType::F32
        } else if name.contains("q_proj") || name.contains("k_proj") || name.contains("embed") {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q4_1
        }
    }

    struct Pair {
        _dir: tempfile::TempDir,
        cfg: MistralConfig,
        hf: Checkpoint,
        gguf: GgufWeights,
        path: PathBuf,
    }

    fn pair(tie: bool, dtype_of: fn(&str) -> GgmlDType) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(tie);
        let tensors = generated_tensors(&cfg, 3).unwrap();
        write_checkpoint(&dir.path().join("hf"), &tensors, 1).unwrap();
        let path = dir.path().join("model.gguf");
        write_gguf(&path, &cfg, &tensors, dtype_of, &[]).unwrap();
        Pair {
            hf: Checkpoint::open(&dir.path().join("hf")).unwrap(),
            gguf: GgufWeights::open(&path).unwrap(),
            _dir: dir,
            cfg,
            path,
        }
    }

    fn shapes(cfg: &MistralConfig) -> Vec<(String, Vec<usize>)> {
        generated_tensors(cfg, 0)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect()
    }

    fn logits(cfg: &MistralConfig, w: &dyn WeightSource) -> Vec<f32> {
        logits_and_bytes(cfg, w).0
    }

    /// The logits of a short prompt, and the bytes the model's weights take.
    fn logits_and_bytes(cfg: &MistralConfig, w: &dyn WeightSource) -> (Vec<f32>, usize) {
        let part = Partition::new(cfg, 0, 1).unwrap();
        let m = Mistral::load(
            cfg,
            w,
            part,
            DType::F32,
            &Device::Cpu,
            Arc::new(sirocco_collective::Solo),
        )
        .unwrap();
        let bytes = m.weight_bytes();
        let mut cache = m.new_cache(64, 16).unwrap();
        let chunk = Chunk {
            seq: 0,
            tokens: vec![1, 5, 7, 9, 40, 95],
        };
        let logits = m
            .forward(&[chunk], &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (logits, bytes)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn permutation_is_llama_cpps() {
        // convert_hf_to_gguf.py: reshape(n_head, 2, hd/2, dim).swapaxes(1, 2), so GGUF
        // row (h, i, j) is Hugging Face row (h, j, i).
        let (heads, hd, cols) = (3, 8, 2);
        let hf = Tensor::arange(0f32, (heads * hd * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        let g = permute_rope_rows(&hf, heads).unwrap().to_vec2::<f32>().unwrap();
        let h = hf.to_vec2::<f32>().unwrap();
        for head in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    assert_eq!(g[head * hd + i * 2 + j], h[head * hd + j * hd / 2 + i]);
                }
            }
        }
        let back = unpermute_rope_rows(&permute_rope_rows(&hf, heads).unwrap(), heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), h);
        assert!(unpermute_rope_rows(&hf, 5).is_err());
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let p = pair(false, all_f32);
        assert_eq!(p.gguf.config(), &p.cfg);
        let d = Device::Cpu;
        for (name, shape) in shapes(&p.cfg) {
            assert!(p.gguf.contains(&name), "{name}");
            let slices = if shape.len() == 2 {
                vec![Slice::Full, Slice::Rows(8..24), Slice::Cols(8..40)]
            } else {
                vec![Slice::Full]
            };
            for s in slices {
                let a = p.hf.load(&name, &shape, &s, DType::F32, &d).unwrap();
                let b = p.gguf.load(&name, &shape, &s, DType::F32, &d).unwrap();
                assert_eq!(max_abs_diff(&a, &b), 0.0, "{name} {s:?}");
            }
        }
        let bf = p
            .gguf
            .load("lm_head.weight", &[96, 64], &Slice::Full, DType::BF16, &d)
            .unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
        assert_eq!(logits(&p.cfg, &p.hf), logits(&p.cfg, &p.gguf));
        // Deterministic, and a property of the contents.
        assert_eq!(GgufWeights::open(&p.path).unwrap().fingerprint(), p.gguf.fingerprint());
        assert_ne!(pair(false, mixed).gguf.fingerprint(), p.gguf.fingerprint());
    }

    #[test]
    fn quantized_round_trip_is_within_quantization_error() {
        let p = pair(true, mixed);
        assert!(p.gguf.config().tie_word_embeddings);
        assert!(!p.gguf.contains("lm_head.weight"));
        // Blocks run along rows and the q/k permutation moves whole rows, so quantizing
        // the Hugging Face layout gives the very values the GGUF file must load as.
        let dir = tempfile::tempdir().unwrap();
        let reference: Vec<(String, Tensor)> = generated_tensors(&p.cfg, 3)
            .unwrap()
            .into_iter()
            .map(|(n, t)| {
                let q = QTensor::quantize(&t, mixed(&n)).unwrap();
                (n, q.dequantize(&Device::Cpu).unwrap())
            })
            .collect();
        write_checkpoint(dir.path(), &reference, 1).unwrap();
        let reference = Checkpoint::open(dir.path()).unwrap();
        let d = Device::Cpu;
        for (name, shape) in shapes(&p.cfg) {
            let original = p.hf.load(&name, &shape, &Slice::Full, DType::F32, &d).unwrap();
            let expected = reference.load(&name, &shape, &Slice::Full, DType::F32, &d).unwrap();
            let got = p.gguf.load(&name, &shape, &Slice::Full, DType::F32, &d).unwrap();
            assert_eq!(max_abs_diff(&expected, &got), 0.0, "{name}");
            // Generated matrices lie in [-0.035, 0.035]: a Q8_0 step is amax/127, a
            // Q4_1 step (max-min)/15; rounding is at most half a step (plus f16 scales).
            let tol = match mixed(&name) {
                GgmlDType::F32 => 0.0,
                GgmlDType::Q8_0 => 0.035 / 127.0 * 0.6,
                _ => 0.07 / 15.0 * 0.6,
            };
            let err = max_abs_diff(&original, &got);
            assert!(err <= tol, "{name}: {err} > {tol}");
        }
        // The GGUF model keeps its Q8_0 and Q4_1 matrices quantized (the same values
        // in the quantized kernels, summed in another order) at about their size.
        let (want, float_bytes) = logits_and_bytes(&p.cfg, &reference);
        let (got, bytes) = logits_and_bytes(&p.cfg, &p.gguf);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-5 * scale, "logit {i}: {a} against {b}");
        }
        assert!(bytes * 3 < float_bytes, "{bytes} bytes, {float_bytes} as floats");
    }

    /// A GGUF file of raw metadata and one `token_embd.weight`.
    fn write_raw(path: &Path, md: &[(String, Value)], embd: &QTensor) {
        let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(
            &mut std::fs::File::create(path).unwrap(),
            &md,
            &[("token_embd.weight", embd)],
        )
        .unwrap();
    }

    fn llama_md(arch: &str) -> Vec<(String, Value)> {
        llama_md_of_width(arch, 64)
    }

    fn llama_md_of_width(arch: &str, hidden: u32) -> Vec<(String, Value)> {
        let mut md = vec![("general.architecture".to_string(), Value::String(arch.into()))];
        for (k, v) in [
            ("block_count", 1u32),
            ("context_length", 128),
            ("embedding_length", hidden),
            ("feed_forward_length", 96),
            ("attention.head_count", 4),
        ] {
            md.push((format!("{arch}.{k}"), Value::U32(v)));
        }
        md.push((format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-6)));
        md
    }

    fn config_of(md: &[(String, Value)]) -> Result<MistralConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let embd = Tensor::zeros((10, 64), DType::F32, &Device::Cpu).unwrap();
        write_raw(&path, md, &QTensor::quantize(&embd, GgmlDType::F32).unwrap());
        GgufWeights::open(&path).map(|w| w.config().clone())
    }

    #[test]
    fn every_block_type_dequantizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let md = llama_md_of_width("llama", 256);
        let d = Device::Cpu;
        let t = Generated::new(5)
            .load("e", &[8, 256], &Slice::Full, DType::F32, &d)
            .unwrap();
        use GgmlDType::*;
        for dtype in [F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            write_raw(&path, &md, &q);
            if dtype == Q8K {
                let e = GgufWeights::open(&path).err().unwrap().to_string();
                assert!(e.contains("`token_embd.weight`") && e.contains("Q8K"), "{e}");
                continue;
            }
            let w = GgufWeights::open(&path).unwrap();
            let got = w
                .load(
                    "model.embed_tokens.weight",
                    &[8, 256],
                    &Slice::Rows(2..5),
                    DType::F32,
                    &d,
                )
                .unwrap();
            let want = q.dequantize(&d).unwrap().narrow(0, 2, 3).unwrap();
            assert_eq!(max_abs_diff(&got, &want), 0.0, "{dtype:?}");
            // Even Q2_K keeps values within a third of their 0.035 range.
            let err = max_abs_diff(&got, &t.narrow(0, 2, 3).unwrap());
            assert!(err < 0.012, "{dtype:?}: {err}");
        }
    }

    #[test]
    fn metadata_defaults_and_refusals() {
        let c = config_of(&llama_md("llama")).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_theta), (4, 16, 10_000.0));
        assert_eq!((c.vocab_size, c.sliding_window, c.rms_norm_eps), (10, None, 1e-6));
        assert!(c.tie_word_embeddings);
        let mut md = llama_md("mistral");
        md.push(("mistral.attention.sliding_window".into(), Value::U32(32)));
        md.push(("mistral.rope.freq_base".into(), Value::F32(1e6)));
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(2)));
        let c = config_of(&md).unwrap();
        assert_eq!(
            (c.sliding_window, c.rope_theta, c.eos_token_ids.clone()),
            (Some(32), 1e6, vec![2])
        );

        let e = format!("{:#}", config_of(&llama_md("gpt2")).unwrap_err());
        assert!(e.contains("general.architecture") && e.contains("\"gpt2\""), "{e}");
        let mut md = llama_md("llama");
        md.push(("llama.rope.scaling.type".into(), Value::String("yarn".into())));
        md.push(("llama.rope.scaling.factor".into(), Value::F32(4.0)));
        let e = format!("{:#}", config_of(&md).unwrap_err());
        assert!(e.contains("yarn"), "{e}");
        let mut md = llama_md("llama");
        md.push(("llama.rope.scaling.type".into(), Value::String("longrope".into())));
        let e = format!("{:#}", config_of(&md).unwrap_err());
        assert!(e.contains("longrope"), "{e}");
        let mut md = llama_md("llama");
        md.push(("llama.rope.scaling.type".into(), Value::String("linear".into())));
        md.push(("llama.rope.scaling.factor".into(), Value::F32(1.0)));
        assert!(config_of(&md).is_ok());
        let mut md = llama_md("llama");
        md.retain(|(k, _)| k != "llama.block_count");
        let e = format!("{:#}", config_of(&md).unwrap_err());
        assert!(e.contains("llama.block_count"), "{e}");
        let mut md = llama_md("llama");
        md.push(("llama.vocab_size".into(), Value::U32(11)));
        let e = format!("{:#}", config_of(&md).unwrap_err());
        assert!(e.contains("vocab_size 11") && e.contains("10 rows"), "{e}");
    }

    #[test]
    fn truncated_unknown_type_and_missing_tensor_are_clear_errors() {
        let p = pair(false, mixed);
        let bytes = std::fs::read(&p.path).unwrap();
        let bad = p.path.with_file_name("bad.gguf");
        let shown = bad.display().to_string();
        // Inside the header, then inside the tensor data.
        for len in [3, 40, 1000, bytes.len() - 100] {
            std::fs::write(&bad, &bytes[..len]).unwrap();
            let e = format!("{:#}", GgufWeights::open(&bad).err().unwrap());
            assert!(e.contains(&shown), "{len}: {e}");
            assert!(
                e.contains("not a valid GGUF file") || e.contains("truncated"),
                "{len}: {e}"
            );
        }
        let e = format!(
            "{:#}",
            GgufWeights::open(&bad.with_file_name("none.gguf")).err().unwrap()
        );
        assert!(e.contains("cannot open"), "{e}");

        // A tensor info is: name, n_dims (u32), dims (u64 each), type (u32), offset.
        let name = b"blk.0.attn_norm.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 8;
        let mut patched = bytes.clone();
        patched[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(&bad, &patched).unwrap();
        let e = format!("{:#}", GgufWeights::open(&bad).err().unwrap());
        assert!(e.contains(&shown) && e.contains("GGML type 99"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<(String, Tensor)> = generated_tensors(&p.cfg, 3)
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
            .collect();
        let path = dir.path().join("m.gguf");
        write_gguf(&path, &p.cfg, &tensors, all_f32, &[]).unwrap();
        let w = GgufWeights::open(&path).unwrap();
        let part = Partition::new(&p.cfg, 0, 1).unwrap();
        let e = Mistral::load(
            &p.cfg,
            &w,
            part,
            DType::F32,
            &Device::Cpu,
            Arc::new(sirocco_collective::Solo),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("`blk.1.ffn_up.weight`") && e.contains(&path.display().to_string()),
            "{e}"
        );
        let e = w
            .load("model.norm.weight", &[65], &Slice::Full, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("output_norm.weight") && e.contains("[64]"), "{e}");
    }
}
