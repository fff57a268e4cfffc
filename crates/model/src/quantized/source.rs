//! Raw (undecoded) tensor access for the quantized loaders: integer tensors, which
//! [`crate::weights::WeightSource`] does not hand out.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One stored tensor: its safetensors dtype, shape and little-endian bytes.
#[derive(Clone, Debug)]
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// Something that holds named tensors in safetensors form.
pub trait TensorLookup {
    /// The tensor called `name`, or `None` when there is none.
    fn raw(&self, name: &str) -> Option<RawTensor<'_>>;
}

impl TensorLookup for SafeTensors<'_> {
    fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        let t = self.tensor(name).ok()?;
        Some(RawTensor {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.data(),
        })
    }
}

/// A list of files (the shards of one checkpoint) is searched in order.
impl TensorLookup for [SafeTensors<'_>] {
    fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        self.iter().find_map(|st| st.raw(name))
    }
}

/// A safetensors checkpoint directory (`model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists), memory-mapped, with raw access to every tensor.
pub struct QuantCheckpoint {
    dir: PathBuf,
    files: Vec<Mmap>,
    tensors: HashMap<String, (usize, Dtype, Vec<usize>, Range<usize>)>,
}

impl QuantCheckpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index_path.exists() {
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
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".into()]
        } else {
            bail!(
                "no weights in {}: expected model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        };
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (fi, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let file =
                std::fs::File::open(&path).with_context(|| format!("cannot open weights file {}", path.display()))?;
            // SAFETY: the checkpoint is read-only input; a file changed under us is a
            // misconfiguration that a copy would not guard against either.
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, meta): (usize, Metadata) = SafeTensors::read_metadata(&mmap[..])
                .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
            let start = 8 + header_len;
            for (tname, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                tensors.insert(
                    tname.clone(),
                    (fi, info.dtype, info.shape.clone(), start + a..start + b),
                );
            }
            files.push(mmap);
        }
        Ok(QuantCheckpoint {
            dir: dir.to_owned(),
            files,
            tensors,
        })
    }

    /// The directory it was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

impl TensorLookup for QuantCheckpoint {
    fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        let (f, dtype, shape, bytes) = self.tensors.get(name)?;
        Some(RawTensor {
            dtype: *dtype,
            shape: shape.clone(),
            data: &self.files[*f][bytes.clone()],
        })
    }
}
