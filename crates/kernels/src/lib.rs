//! CPU kernels for sirocco's forward pass. The linear layers: `out = x · Wᵀ` with
//! the weight in Hugging Face `[out_features, in_features]` layout.
//!
//! This crate owns the packed weight layout ([`PackedMatrix`]), the matmul that
//! runs over it ([`matmul`]: a stream over the weights for decode-sized m, a
//! cache-blocked loop near the FMA peak for prefill-sized m, both split over
//! rayon's global pool), the AVX-512 microkernels (f32 FMA, bf16 `vdpbf16ps`) and
//! AMX tiles (bf16), weight-only int8/int4 weights widened in registers
//! ([`WeightData::Quantized`]), with a portable fallback chosen at run time ([`Isa`]), and the
//! [`probe`]s that measure the machine's rooflines. Besides: decode and prefill
//! attention over the paged KV pool ([`attention`]), the element-wise steps worth a
//! pass of their own ([`elementwise`]), and the caller-participating fork they all
//! run on ([`parallel`]).

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
pub mod elementwise;
mod gemm;
mod isa;
mod operands;
pub mod packed;
pub mod parallel;
mod portable;
pub mod probe;
mod quant;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_quant;

pub use isa::Isa;
pub use operands::Input;
pub use packed::{PackError, PackedMatrix, WeightData, WeightDtype, NR};

/// `out[m × n] = x[m × k] · Wᵀ`, f32 accumulation, on the best [`Isa`] of this CPU
/// for this `m`.
pub fn matmul(x: &[f32], m: usize, w: &PackedMatrix, out: &mut [f32]) {
    gemm::matmul(gemm::auto_isa(m, w), Input::F32(x), m, w, as_uninit(out))
}

/// [`matmul`] with activations in any dtype (bf16 activations feed `vdpbf16ps`
/// and AMX tiles without a conversion; f32 ones are rounded to bf16 there).
pub fn matmul_input(x: Input<'_>, m: usize, w: &PackedMatrix, out: &mut [f32]) {
    gemm::matmul(gemm::auto_isa(m, w), x, m, w, as_uninit(out))
}

/// [`matmul_input`] into a new `[m × n]` vector, which is not zeroed first: the
/// kernels write every element, and zeroing a prefill's outputs was a pass over
/// memory as large as them (~2% of a prefill's time).
pub fn matmul_to_vec(x: Input<'_>, m: usize, w: &PackedMatrix) -> Vec<f32> {
    let len = m * w.n();
    let mut out = Vec::with_capacity(len);
    gemm::matmul(gemm::auto_isa(m, w), x, m, w, &mut out.spare_capacity_mut()[..len]);
    // SAFETY: `gemm::matmul` wrote all `len` elements (or panicked, leaving `out` empty).
    unsafe { out.set_len(len) };
    out
}

/// Which kernels multiply quantized weights on this CPU, in words (for benchmarks
/// and logs), with `bf16_compute` as [`PackedMatrix::with_bf16_compute`] says.
pub fn quantized_kernels(bf16_compute: bool) -> String {
    let isa = Isa::detect();
    // int4 decode rows: VNNI tiles where they run (groups of a multiple of 8).
    let int4 = |rows: String| {
        if gemm::vnni_int4(isa, bf16_compute) {
            format!("int4 in VNNI tiles on activations quantized to int8 per group {rows}")
        } else {
            format!("int4 in AVX-512 f32 decode tiles {rows}")
        }
    };
    match isa {
        Isa::Portable => "portable (dequantized f32 blocks)".into(),
        Isa::Amx if bf16_compute => format!(
            "int8 in AVX-512 f32 decode tiles below {} rows, {}, bf16 panels in AMX tiles from there",
            gemm::amx_min_m_quant(8),
            int4(format!("below {} rows", gemm::amx_min_m_quant(4)))
        ),
        _ => format!(
            "int8 in AVX-512 f32 decode tiles up to {m} rows, {}, dequantized f32 panels beyond",
            int4(format!("up to {m} rows", m = gemm::SMALL_M)),
            m = gemm::SMALL_M
        ),
    }
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
