//! What this CPU runs, asked once per process: the matmul's instruction set
//! ([`Isa`]) and the AVX-512 check of the attention and element-wise paths.

#[cfg(target_arch = "x86_64")]
use crate::amx;
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

/// Whether this CPU runs the AVX-512 paths of attention and the element-wise steps:
/// AVX-512F/BW/VL with FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}
