//! Raw (undecoded) tensor access for the quantized loaders: integer tensors, which
//! [`crate::weights::WeightSource`] does not hand out. A checkpoint directory is read
//! through [`crate::weights::Checkpoint`], which implements [`TensorLookup`].

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

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
