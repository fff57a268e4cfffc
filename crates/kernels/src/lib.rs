//! CPU kernels for sirocco's forward pass. The linear layers: `out = x · Wᵀ` with
//! the weight in Hugging Face `[out_features, in_features]` layout.
//!
//! This crate owns the packed weight layout ([`PackedMatrix`]), the matmul that
//! runs over it ([`matmul`]: a stream over the weights for decode-sized m, a
//! cache-blocked loop near the FMA peak for prefill-sized m, both split over
//! rayon's global pool), the AVX-512 microkernels (f32 FMA, bf16 `vdpbf16ps`) and
//! AMX tiles (bf16), with a portable fallback chosen at run time ([`Isa`]), and the
//! [`probe`]s that measure the machine's rooflines. Besides: decode and prefill
//! attention over the paged KV pool ([`attention`]), the element-wise steps worth a
//! pass of their own ([`elementwise`]), and the caller-participating fork they all
//! run on ([`parallel`]).

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
pub mod elementwise;
mod gemm;
pub mod packed;
pub mod parallel;
mod portable;
pub mod probe;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use packed::{PackedMatrix, WeightData, WeightDtype, NR};

use half::{bf16, f16};
use std::sync::OnceLock;

/// The instruction set a matmul runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX-512F (BW, VL): f32 FMA tiles; half-precision weights widen to f32.
    Avx512,
    /// [`Isa::Avx512`] plus AVX512_BF16: bf16 weights multiply in `vdpbf16ps`
    /// (the automatic choice takes it only for the row counts where it pays).
    Avx512Bf16,
    /// [`Isa::Avx512Bf16`] plus AMX-BF16 tiles for bf16 weights (the automatic
    /// choice takes them only from the row count where they pay); other weights
    /// run as on [`Isa::Avx512`].
    Amx,
}

impl Isa {
    /// The best this CPU runs, unless `SIROCCO_KERNELS_ISA` (`portable`, `avx512`,
    /// `avx512bf16`, `amx`) asks for one it has (for comparisons).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let available = Isa::available();
            let forced = std::env::var("SIROCCO_KERNELS_ISA").ok().and_then(|s| {
                available
                    .iter()
                    .copied()
                    .find(|i| format!("{i:?}").eq_ignore_ascii_case(s.trim()))
            });
            forced.unwrap_or(*available.last().expect("portable is always available"))
        })
    }

    /// Every ISA this CPU can run, worst first.
    pub fn available() -> Vec<Isa> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                v.push(Isa::Avx512);
                if is_x86_feature_detected!("avx512bf16") {
                    v.push(Isa::Avx512Bf16);
                    if amx::available() {
                        v.push(Isa::Amx);
                    }
                }
            }
        }
        v
    }
}

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

    fn row(&self, i: usize, k: usize) -> Input<'a> {
        match *self {
            Input::F32(s) => Input::F32(&s[i * k..(i + 1) * k]),
            Input::BF16(s) => Input::BF16(&s[i * k..(i + 1) * k]),
            Input::F16(s) => Input::F16(&s[i * k..(i + 1) * k]),
        }
    }
}

/// `out[m × n] = x[m × k] · Wᵀ`, f32 accumulation, on the best [`Isa`] of this CPU
/// for this `m`.
pub fn matmul(x: &[f32], m: usize, w: &PackedMatrix, out: &mut [f32]) {
    gemm::matmul(gemm::auto_isa(m), Input::F32(x), m, w, as_uninit(out))
}

/// [`matmul`] with activations in any dtype (bf16 activations feed `vdpbf16ps`
/// and AMX tiles without a conversion; f32 ones are rounded to bf16 there).
pub fn matmul_input(x: Input<'_>, m: usize, w: &PackedMatrix, out: &mut [f32]) {
    gemm::matmul(gemm::auto_isa(m), x, m, w, as_uninit(out))
}

/// [`matmul_input`] into a new `[m × n]` vector, which is not zeroed first: the
/// kernels write every element, and zeroing a prefill's outputs was a pass over
/// memory as large as them (~2% of a prefill's time).
pub fn matmul_to_vec(x: Input<'_>, m: usize, w: &PackedMatrix) -> Vec<f32> {
    let len = m * w.n();
    let mut out = Vec::with_capacity(len);
    gemm::matmul(gemm::auto_isa(m), x, m, w, &mut out.spare_capacity_mut()[..len]);
    // SAFETY: `gemm::matmul` wrote all `len` elements (or panicked, leaving `out` empty).
    unsafe { out.set_len(len) };
    out
}

fn as_uninit(out: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: same layout; the callee only writes initialised f32s through it.
    unsafe { &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

/// [`matmul_input`] on a given [`Isa`]. Panics if this CPU lacks it.
pub fn matmul_with(isa: Isa, x: Input<'_>, m: usize, w: &PackedMatrix, out: &mut [f32]) {
    assert!(Isa::available().contains(&isa), "this CPU cannot run {isa:?}");
    gemm::matmul(isa, x, m, w, as_uninit(out))
}
