//! The kernels' operands besides the packed weights: the activations they read
//! ([`Input`]) and where a matmul tile writes ([`Out`]).

use half::{bf16, f16};

/// Where a tile's `mr × ncols` results go: rows `ldc` apart, added to what is
/// there when `accumulate` (the k blocks after the first).
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub(crate) ptr: *mut f32,
    pub(crate) ldc: usize,
    pub(crate) ncols: usize,
    pub(crate) accumulate: bool,
}

/// Activations `[m, k]`, row-major, in the dtype the model computes in.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Input<'a> {
    pub fn len(&self) -> usize {
        match self {
            Input::F32(s) => s.len(),
            Input::BF16(s) => s.len(),
            Input::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn row(&self, i: usize, k: usize) -> Input<'a> {
        match *self {
            Input::F32(s) => Input::F32(&s[i * k..(i + 1) * k]),
            Input::BF16(s) => Input::BF16(&s[i * k..(i + 1) * k]),
            Input::F16(s) => Input::F16(&s[i * k..(i + 1) * k]),
        }
    }
}
