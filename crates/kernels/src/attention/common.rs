//! What attention's paths share (the portable decode in `attention.rs`, its AVX-512
//! version in `x86` and prefill): the pool's element types ([`Elem`], and
//! [`Wide`] for 16 lanes at a time), one decode task's slots ([`Heads`]) and the
//! prefetching of pool rows.

use half::{bf16, f16};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Off x86 there are no wide loads to ask of an element type.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait Wide {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> Wide for T {}

/// A pool element type as 16 lanes of f32.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Wide {
    /// # Safety
    /// AVX-512F/BW/VL must be available; `p` holds 16 values.
    unsafe fn load16(p: *const Self) -> __m512;
}

#[cfg(target_arch = "x86_64")]
impl Wide for f32 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

#[cfg(target_arch = "x86_64")]
impl Wide for bf16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load16(p: *const bf16) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

#[cfg(target_arch = "x86_64")]
impl Wide for f16 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// A pool element, widened to f32 as it is read.
pub(crate) trait Elem: Copy + Send + Sync + Wide {
    fn f(self) -> f32;
}
impl Elem for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn f(self) -> f32 {
        // A bf16 is the top half of an f32 (written out so that it vectorises).
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn f(self) -> f32 {
        self.to_f32()
    }
}

/// The slots `from..from + held` of one sequence, every KV head with its group of
/// query heads.
pub(super) struct Heads<'a> {
    /// `[heads * group, hd]`.
    pub(super) q: &'a [f32],
    pub(super) tables: &'a [u32],
    pub(super) block_size: usize,
    /// The slots `from..from + held` of the sequence.
    pub(super) from: usize,
    pub(super) held: usize,
    /// KV heads: all of a pool row.
    pub(super) heads: usize,
    pub(super) hd: usize,
    pub(super) group: usize,
    pub(super) scale: f32,
}

impl Heads<'_> {
    /// Pool offset of slot `j`'s row.
    #[inline(always)]
    pub(super) fn slot(&self, j: usize) -> usize {
        let (bs, j) = (self.block_size, self.from + j);
        (self.tables[j / bs] as usize * bs + j % bs) * self.heads * self.hd
    }
}

/// Asks for `data` in L1 ahead of its use.
#[inline(always)]
pub(super) fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }, T>(data);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Asks for `data` in L2 ahead of its use.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_l2<T>(data: &[T]) {
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T1 }, T>(data);
}

/// A prefetch with `HINT` for each cache line of `data`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_lines<const HINT: i32, T>(data: &[T]) {
    let (p, bytes) = (data.as_ptr() as *const i8, std::mem::size_of_val(data));
    for off in (0..bytes).step_by(64) {
        // SAFETY: prefetching is a hint: it never faults and the address is inside
        // `data`.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p.add(off)) };
    }
}
