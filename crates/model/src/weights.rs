//! Where a rank's weights come from: a Hugging Face safetensors checkpoint on disk
//! (memory-mapped, one file or sharded with an index) or deterministic generated
//! weights (the built-in model and benchmarks).
//!
//! A rank asks for a tensor and the slice it holds; only that slice's bytes are read
//! (the mapping pages in nothing else).

use crate::config::MistralConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Part of a 2-D weight (or all of a 1-D one) that a rank loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slice {
    Full,
    /// Rows of a `[out, in]` matrix: column-parallel layers, vocab slices.
    Rows(Range<usize>),
    /// Columns of a `[out, in]` matrix: row-parallel layers.
    Cols(Range<usize>),
}

impl Slice {
    fn sliced_shape(&self, shape: &[usize]) -> Vec<usize> {
        match self {
            Slice::Full => shape.to_vec(),
            Slice::Rows(r) => vec![r.len(), shape[1]],
            Slice::Cols(c) => vec![shape[0], c.len()],
        }
    }
}

/// A source of named weights.
pub trait WeightSource: Send + Sync {
    /// Loads `slice` of tensor `name`, checking that the whole tensor has `shape`, and
    /// converts it to `dtype` on `device`.
    fn load(&self, name: &str, shape: &[usize], slice: &Slice, dtype: DType, device: &Device) -> Result<Tensor>;

    /// Whether the source has a tensor of this name (for optional tensors such as lm_head).
    fn contains(&self, name: &str) -> bool;

    /// Identifies the weights: ranks that must agree on a model compare these.
    fn fingerprint(&self) -> u64;

    /// The quantized linear weights, when the checkpoint is pre-quantized (GPTQ, AWQ,
    /// compressed-tensors); [`WeightSource::load`] then serves the float rest.
    fn prequantized(&self) -> Option<&crate::quantized::Prequantized> {
        None
    }

    /// Tensor `name` (whole, of `shape`) as the quantized kernels take it, where the
    /// checkpoint stores it in a block format they run without loss (a GGUF's Q4_1,
    /// say); `None` for float tensors and other formats, which [`WeightSource::load`]
    /// dequantizes.
    fn native_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<crate::quantized::QuantizedTensor>> {
        let _ = (name, shape);
        Ok(None)
    }
}

struct TensorEntry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range of the tensor's data inside its file's mapping.
    bytes: Range<usize>,
}

/// A safetensors checkpoint in Hugging Face layout: `model.safetensors`, or shards
/// listed by `model.safetensors.index.json`.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorEntry>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let file_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{} has no `weight_map` object", index_path.display()))?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_owned)).collect();
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".into()]
        } else {
            let has_bin = dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists();
            bail!(
                "no weights in {}: expected model.safetensors or model.safetensors.index.json{}",
                dir.display(),
                if has_bin {
                    " (PyTorch .bin checkpoints are not supported; convert them to safetensors)"
                } else {
                    ""
                }
            );
        };
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (fi, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let file =
                std::fs::File::open(&path).with_context(|| format!("cannot open weights file {}", path.display()))?;
            // SAFETY: the checkpoint is read-only input; a file changed under us is a
            // misconfiguration we cannot guard against with a copy either.
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, meta): (usize, Metadata) = safetensors::SafeTensors::read_metadata(&mmap[..])
                .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
            let data_start = 8 + header_len;
            for (tname, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                tensors.insert(
                    tname.clone(),
                    TensorEntry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        bytes: data_start + a..data_start + b,
                    },
                );
            }
            files.push((path, mmap));
        }
        Ok(Checkpoint {
            dir: dir.to_owned(),
            files,
            tensors,
        })
    }

    /// Total bytes of tensor data in the checkpoint.
    pub fn data_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.bytes.len()).sum()
    }
}

fn candle_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl WeightSource for Checkpoint {
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A hash of every tensor's name, dtype, shape and first and last bytes: cheap (no
    /// full read of the weights) yet different for different checkpoints in practice.
    fn fingerprint(&self) -> u64 {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let mut h = FNV_OFFSET;
        for n in names {
            let t = &self.tensors[n];
            let data = &self.files[t.file].1[t.bytes.clone()];
            let edge = 64.min(data.len());
            let desc = format!("{n}:{:?}:{:?}", t.dtype, t.shape);
            h = fnv1a_extend(
                h,
                desc.bytes()
                    .chain(data[..edge].iter().copied())
                    .chain(data[data.len() - edge..].iter().copied()),
            );
        }
        h
    }

    fn load(&self, name: &str, shape: &[usize], slice: &Slice, dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self
            .tensors
            .get(name)
            .with_context(|| format!("tensor `{name}` not found in checkpoint {}", self.dir.display()))?;
        let (path, mmap) = &self.files[entry.file];
        if entry.shape != shape {
            bail!(
                "tensor `{name}` in {} has shape {:?}, expected {:?} from config.json",
                path.display(),
                entry.shape,
                shape
            );
        }
        let stored = candle_dtype(entry.dtype).with_context(|| {
            format!(
                "tensor `{name}` in {} is stored as {:?}; supported: F32, F16, BF16",
                path.display(),
                entry.dtype
            )
        })?;
        let esz = stored.size_in_bytes();
        let data = &mmap[entry.bytes.clone()];
        if data.len() != shape.iter().product::<usize>() * esz {
            bail!(
                "tensor `{name}` in {} has a data size that does not match its shape",
                path.display()
            );
        }
        let out_shape = slice.sliced_shape(shape);
        let t = match slice {
            Slice::Full => Tensor::from_raw_buffer(data, stored, &out_shape, device)?,
            Slice::Rows(r) => {
                let row = shape[1] * esz;
                Tensor::from_raw_buffer(&data[r.start * row..r.end * row], stored, &out_shape, device)?
            }
            Slice::Cols(c) => {
                let row = shape[1] * esz;
                let mut buf = Vec::with_capacity(shape[0] * c.len() * esz);
                for i in 0..shape[0] {
                    buf.extend_from_slice(&data[i * row + c.start * esz..i * row + c.end * esz]);
                }
                Tensor::from_raw_buffer(&buf, stored, &out_shape, device)?
            }
        };
        release_pages(mmap, entry.bytes.clone());
        Ok(t.to_dtype(dtype)?)
    }
}

/// The stored bytes of any tensor, integer ones included: what the quantized
/// loaders read.
impl crate::quantized::TensorLookup for Checkpoint {
    fn raw(&self, name: &str) -> Option<crate::quantized::RawTensor<'_>> {
        let t = self.tensors.get(name)?;
        Some(crate::quantized::RawTensor {
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: &self.files[t.file].1[t.bytes.clone()],
        })
    }
}

/// Lets the kernel take back the pages of `range` from this process: the tensor has
/// been copied out, and a model load touches every page of the checkpoint once, which
/// otherwise kept the whole file resident beside the packed weights (the f32 bench
/// shape peaked at twice its weights; quantized loads at the float file's size).
/// The file stays in the page cache; a later read of the range faults it back in.
fn release_pages(mmap: &Mmap, range: Range<usize>) {
    #[cfg(unix)]
    {
        // SAFETY: the mapping is a read-only shared mapping of a file nobody writes
        // (see `Checkpoint::open`), and no reference into `range` outlives this call's
        // caller's copy: dropping its pages only makes the next access fault them in
        // again from the file, with the same contents. A failure only leaves them
        // resident.
        let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len()) };
    }
    #[cfg(not(unix))]
    let _ = (mmap, range);
}

/// Deterministic pseudo-random weights: every element is a hash of (seed, tensor
/// name, element index), so any slice can be made without making the whole tensor,
/// on any rank, with the same values.
pub struct Generated {
    pub seed: u64,
    /// Uniform values in `[-scale, scale]` for matrices.
    pub scale: f32,
}

impl Generated {
    pub fn new(seed: u64) -> Arc<Self> {
        // Uniform in [-a, a] has std a/sqrt(3): this gives transformers' 0.02 init std.
        Arc::new(Generated {
            seed,
            scale: 0.02 * 3f32.sqrt(),
        })
    }

    fn element(&self, name_hash: u64, index: u64) -> f32 {
        let x = splitmix64(self.seed ^ name_hash ^ splitmix64(index));
        // 24 random bits to a float in [-1, 1).
        ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a's starting state.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Continues an FNV-1a hash `h` over `bytes`.
pub(crate) fn fnv1a_extend(h: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes
        .into_iter()
        .fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn fnv1a(s: &str) -> u64 {
    fnv1a_extend(FNV_OFFSET, s.bytes())
}

impl WeightSource for Generated {
    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn fingerprint(&self) -> u64 {
        splitmix64(self.seed ^ self.scale.to_bits() as u64)
    }

    fn load(&self, name: &str, shape: &[usize], slice: &Slice, dtype: DType, device: &Device) -> Result<Tensor> {
        let h = fnv1a(name);
        let out_shape = slice.sliced_shape(shape);
        // Norm weights are scales around one, as after training; matrices are small.
        let is_norm = shape.len() == 1;
        let value = |i: usize| -> f32 {
            let e = self.element(h, i as u64);
            if is_norm {
                1.0 + 0.1 * e
            } else {
                self.scale * e
            }
        };
        // Element `o` of the output is element `index(o)` of the full tensor.
        let cols = shape.get(1).copied().unwrap_or(1);
        let index = |o: usize| -> usize {
            match slice {
                Slice::Full => o,
                Slice::Rows(r) => r.start * cols + o,
                Slice::Cols(c) => (o / c.len()) * cols + c.start + o % c.len(),
            }
        };
        // One hash per element: spread over the cores (a 7B shape has ~7e9 of them).
        let mut data = vec![0f32; out_shape.iter().product()];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = data.len().div_ceil(threads).max(1 << 16);
        std::thread::scope(|s| {
            for (part, out) in data.chunks_mut(per).enumerate() {
                s.spawn(move || {
                    for (j, x) in out.iter_mut().enumerate() {
                        *x = value(index(part * per + j));
                    }
                });
            }
        });
        Ok(Tensor::from_vec(data, out_shape, device)?.to_dtype(dtype)?)
    }
}

/// Writes `tensors` as a Hugging Face checkpoint: one `model.safetensors`, or
/// `shards` files with an index when `shards > 1`.
pub fn write_checkpoint(dir: &Path, tensors: &[(String, Tensor)], shards: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let shards = shards.max(1);
    if shards == 1 {
        let map: HashMap<&str, Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
        return Ok(());
    }
    let mut weight_map = serde_json::Map::new();
    let per = tensors.len().div_ceil(shards);
    let mut total = 0usize;
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let map: HashMap<&str, Tensor> = chunk.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        candle_core::safetensors::save(&map, dir.join(&fname))?;
        for (n, t) in chunk {
            weight_map.insert(n.clone(), serde_json::Value::String(fname.clone()));
            total += t.elem_count() * t.dtype().size_in_bytes();
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    Ok(())
}

/// Every tensor of a Mistral checkpoint of shape `cfg`, with generated weights, named
/// as Hugging Face names them.
pub fn generated_tensors(cfg: &MistralConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    read_tensors(Generated::new(seed).as_ref(), cfg)
}

/// Every tensor of a Mistral checkpoint of shape `cfg`, in f32, read whole from
/// `source`, named as Hugging Face names them (to write it out in that layout).
pub fn read_tensors(source: &dyn WeightSource, cfg: &MistralConfig) -> Result<Vec<(String, Tensor)>> {
    checkpoint_shapes(cfg)
        .into_iter()
        .map(|(n, s)| {
            let t = source.load(&n, &s, &Slice::Full, DType::F32, &Device::Cpu)?;
            Ok((n, t))
        })
        .collect()
}

/// The name and shape of every tensor of a Mistral checkpoint of shape `cfg`.
fn checkpoint_shapes(cfg: &MistralConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let mut names: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        names.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        for (n, s) in [
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
            ("self_attn.q_proj", vec![q, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, q]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ] {
            names.push((format!("model.layers.{l}.{n}.weight"), s));
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_slices_agree_with_the_whole() {
        let g = Generated::new(7);
        let d = Device::Cpu;
        let full = g.load("w", &[6, 5], &Slice::Full, DType::F32, &d).unwrap();
        let rows = g.load("w", &[6, 5], &Slice::Rows(2..4), DType::F32, &d).unwrap();
        let cols = g.load("w", &[6, 5], &Slice::Cols(1..3), DType::F32, &d).unwrap();
        assert_eq!(
            rows.to_vec2::<f32>().unwrap(),
            full.narrow(0, 2, 2).unwrap().to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            cols.to_vec2::<f32>().unwrap(),
            full.narrow(1, 1, 2).unwrap().to_vec2::<f32>().unwrap()
        );
        let other = g.load("v", &[6, 5], &Slice::Full, DType::F32, &d).unwrap();
        assert_ne!(full.to_vec2::<f32>().unwrap(), other.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn checkpoint_slices_match_and_errors_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let d = Device::Cpu;
        let t = Tensor::arange(0f32, 24.0, &d).unwrap().reshape((4, 6)).unwrap();
        let tensors = vec![
            ("a".to_string(), t.to_dtype(DType::BF16).unwrap()),
            ("b".to_string(), t.clone()),
            ("c".to_string(), t.to_dtype(DType::F16).unwrap()),
        ];
        write_checkpoint(dir.path(), &tensors, 2).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        for name in ["a", "b", "c"] {
            let cols = ck.load(name, &[4, 6], &Slice::Cols(2..5), DType::F32, &d).unwrap();
            assert_eq!(
                cols.to_vec2::<f32>().unwrap(),
                t.narrow(1, 2, 3).unwrap().to_vec2::<f32>().unwrap()
            );
            let rows = ck.load(name, &[4, 6], &Slice::Rows(1..3), DType::F32, &d).unwrap();
            assert_eq!(
                rows.to_vec2::<f32>().unwrap(),
                t.narrow(0, 1, 2).unwrap().to_vec2::<f32>().unwrap()
            );
        }
        let e = ck
            .load("b", &[6, 4], &Slice::Full, DType::F32, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`b`") && e.contains("[4, 6]"), "{e}");
        let e = ck
            .load("zz", &[1], &Slice::Full, DType::F32, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`zz` not found"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = Checkpoint::open(empty.path()).err().unwrap().to_string();
        assert!(e.contains("no weights"), "{e}");
    }
}
