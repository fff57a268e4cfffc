//! Weights packed once at load into the layout the microkernels stream.
//!
//! A `[n, k]` weight is cut into panels of [`NR`] output rows (the last one padded
//! with zero rows). Inside a panel the values are ordered along k so that one
//! k step of all `NR` rows is contiguous: the microkernel loads it as two 16-lane
//! vectors. f32 and f16 store `[k][NR]`; bf16 stores pairs along k,
//! `[k/2][NR][2]`, which is what `vdpbf16ps` multiplies (k padded to even with a
//! zero). A panel's rows for a range of k are therefore one contiguous run, which
//! is what both the streaming (decode) and the cache-blocked (prefill) loops want.
//! Quantized weights (int8, int4) keep the panels but cut k into their groups, each
//! group's scales and zeros in front of its values (see [`crate::quant`]).

use half::{bf16, f16};

/// Output rows per panel: two 16-lane f32 vectors.
pub const NR: usize = 32;

/// How a packed weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    BF16,
    F16,
    /// 8-bit values with an f32 scale and a u8 zero per (row, group of k).
    Int8,
    /// 4-bit values (two per byte) with an f32 scale and a zero per (row, group).
    Int4,
}

impl WeightDtype {
    /// Bytes per element. Panics for [`WeightDtype::Int4`], whose elements are half
    /// a byte: use [`WeightDtype::bits`] (and, for quantized weights,
    /// [`PackedMatrix::storage_bytes`], which counts their scales and zeros too).
    pub fn size_in_bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::BF16 | WeightDtype::F16 => 2,
            WeightDtype::Int8 => 1,
            WeightDtype::Int4 => panic!("an Int4 element is half a byte: use WeightDtype::bits"),
        }
    }

    /// Bits per element of the values alone (no scales or zeros).
    pub fn bits(self) -> usize {
        match self {
            WeightDtype::F32 => 32,
            WeightDtype::BF16 | WeightDtype::F16 => 16,
            WeightDtype::Int8 => 8,
            WeightDtype::Int4 => 4,
        }
    }

    /// Whether the values are integers with per-group scales and zeros.
    pub fn is_quantized(self) -> bool {
        matches!(self, WeightDtype::Int8 | WeightDtype::Int4)
    }
}

/// Why [`PackedMatrix::try_new`] refused its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackError(pub(crate) String);

impl std::fmt::Display for PackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PackError {}

/// A zeroed heap buffer for weights that are streamed from DRAM.
///
/// Buffers of 2 MiB and more are aligned to 2 MiB and (on Linux) asked for
/// transparent huge pages before their first touch: streaming through 4 KiB pages
/// reached about 60% of the read bandwidth that 2 MiB pages reach on the machines
/// measured (page walks, and prefetchers that stop at every 4 KiB boundary).
/// Smaller ones are aligned to cache lines so that panel rows never straddle two.
///
/// On Linux the large ones are mapped fresh from the OS, not taken from the
/// allocator: after a model load has freed its staging buffers, the allocator
/// hands out recycled memory already backed by 4 KiB pages, which the advice no
/// longer changes. In the engine that left the smaller weight matrices (q/k/v, o,
/// down: a third of a 229M bf16 model) on 4 KiB pages, streaming at 24–26 GB/s
/// where the rest reached 34.
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    bytes: usize,
}

// SAFETY: the buffer is plain owned memory; shared access is read-only.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above.
unsafe impl Sync for AlignedBuf {}

const HUGE_PAGE: usize = 2 << 20;

impl AlignedBuf {
    pub(crate) fn zeroed(bytes: usize) -> Self {
        use rayon::prelude::*;
        let huge = bytes >= HUGE_PAGE;
        let align = if huge { HUGE_PAGE } else { 64 };
        let size = if huge {
            bytes.next_multiple_of(HUGE_PAGE)
        } else {
            bytes.max(1)
        };
        let layout = std::alloc::Layout::from_size_align(size, align).expect("buffer size overflows");
        if !huge {
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            let ptr = std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
            return AlignedBuf { ptr, layout, bytes };
        }
        let ptr = alloc_huge(layout);
        // SAFETY: the allocation is `size` bytes long and nothing else refers to it.
        let all = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), size) };
        // First touch in parallel: the page faults are most of the cost.
        all.par_chunks_mut(HUGE_PAGE).for_each(|c| c.fill(0));
        AlignedBuf { ptr, layout, bytes }
    }

    pub(crate) fn as_ptr<T>(&self) -> *const T {
        self.ptr.as_ptr() as *const T
    }

    pub(crate) fn as_slice<T: Copy>(&self) -> &[T] {
        // SAFETY: the buffer holds `bytes` initialised (zeroed or written) bytes,
        // aligned to at least 64 (enough for f32/u16/u64), and every bit pattern is
        // a valid value of the plain numeric types used here.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const T, self.bytes / std::mem::size_of::<T>()) }
    }

    pub(crate) fn as_mut_slice<T: Copy>(&mut self) -> &mut [T] {
        // SAFETY: as for `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr() as *mut T, self.bytes / std::mem::size_of::<T>()) }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.layout.align() == HUGE_PAGE {
            // SAFETY: allocated by `alloc_huge` with this layout.
            return unsafe { free_huge(self.ptr, self.layout) };
        }
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// `layout.size()` bytes (a multiple of 2 MiB) at a 2 MiB boundary, not yet touched,
/// advised to be backed by huge pages.
#[cfg(target_os = "linux")]
fn alloc_huge(layout: std::alloc::Layout) -> std::ptr::NonNull<u8> {
    let (size, len) = (layout.size(), layout.size() + HUGE_PAGE);
    // SAFETY: a fresh private anonymous mapping; no existing memory is involved.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        std::alloc::handle_alloc_error(layout);
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    // SAFETY: the head before the boundary and the tail after `size` bytes are parts
    // of the mapping just made, which nothing refers to; the advice only changes how
    // the pages are backed (an error leaves 4 KiB pages).
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let tail = start + len - (aligned + size);
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    std::ptr::NonNull::new(aligned as *mut u8).expect("mmap returned a mapping at address 0")
}

/// # Safety
/// `ptr` came from [`alloc_huge`] with `layout`.
#[cfg(target_os = "linux")]
unsafe fn free_huge(ptr: std::ptr::NonNull<u8>, layout: std::alloc::Layout) {
    libc::munmap(ptr.as_ptr() as *mut libc::c_void, layout.size());
}

#[cfg(not(target_os = "linux"))]
fn alloc_huge(layout: std::alloc::Layout) -> std::ptr::NonNull<u8> {
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc(layout) };
    std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
}

/// # Safety
/// `ptr` came from [`alloc_huge`] with `layout`.
#[cfg(not(target_os = "linux"))]
unsafe fn free_huge(ptr: std::ptr::NonNull<u8>, layout: std::alloc::Layout) {
    std::alloc::dealloc(ptr.as_ptr(), layout)
}

/// The data of a weight in row-major `[n, k]` order, as it comes from a checkpoint.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    /// Weight-only quantization, as the loaders produce it: `q[i*k + j]` in
    /// `[0, 2^bits)`; k cut into groups of `group_size` (which divides k;
    /// `group_size == k` is per output channel); row i, group g has
    /// `scales[i*(k/group_size) + g]` and `zeros[..]` (usually integers in
    /// `[0, 2^bits)`: symmetric int8 has 128, int4 8; any finite value, as a
    /// min/max format's `−min/scale`, packs with f32 zeros); the weight is
    /// `w[i][j] = (q[i*k+j] - zero) * scale`. `bits` is 8 or 4.
    Quantized {
        bits: u8,
        group_size: usize,
        q: &'a [u8],
        zeros: &'a [f32],
        scales: &'a [f32],
    },
}

/// A `[n, k]` weight (n outputs, k inputs) packed for [`crate::matmul`].
pub struct PackedMatrix {
    n: usize,
    k: usize,
    /// k rounded up to the storage's k granularity (2 for bf16 pairs).
    kp: usize,
    dtype: WeightDtype,
    /// The group layout of quantized weights.
    quant: Option<crate::quant::Layout>,
    data: AlignedBuf,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("dtype", &self.dtype)
            .field("group_size", &self.quant.map(|q| q.group_size))
            .finish()
    }
}

impl PackedMatrix {
    /// Packs row-major `[n, k]` f32 values rounded to `dtype` (benchmarks and probes
    /// that make their weights in f32).
    pub fn rounded_from_f32(w: &[f32], dtype: WeightDtype, n: usize, k: usize) -> Self {
        match dtype {
            WeightDtype::F32 => Self::new(WeightData::F32(w), n, k),
            WeightDtype::BF16 => {
                let v: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                Self::new(WeightData::BF16(&v), n, k)
            }
            WeightDtype::F16 => {
                let v: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                Self::new(WeightData::F16(&v), n, k)
            }
            WeightDtype::Int8 | WeightDtype::Int4 => {
                let bits = dtype.bits() as u8;
                let group_size = if k.is_multiple_of(128) { 128 } else { k.max(1) };
                let (q, zeros, scales) = crate::quant::quantize(w, n, k, bits, group_size);
                Self::new(
                    WeightData::Quantized {
                        bits,
                        group_size,
                        q: &q,
                        zeros: &zeros,
                        scales: &scales,
                    },
                    n,
                    k,
                )
            }
        }
    }

    /// Packs row-major `[n, k]` data. Panics where [`PackedMatrix::try_new`] returns
    /// an error.
    pub fn new(data: WeightData<'_>, n: usize, k: usize) -> Self {
        Self::try_new(data, n, k).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Packs row-major `[n, k]` data, or says what is wrong with it: a slice of the
    /// wrong length; for quantized data, bits other than 8 or 4, a group size that
    /// does not divide k, a value outside `[0, 2^bits)`, a zero or scale that is
    /// not finite.
    pub fn try_new(data: WeightData<'_>, n: usize, k: usize) -> Result<Self, PackError> {
        let check_len = |len: usize| {
            if Some(len) == n.checked_mul(k) {
                Ok(())
            } else {
                Err(PackError(format!("weight data has {len} values, not [{n}, {k}]")))
            }
        };
        Ok(match data {
            WeightData::F32(d) => {
                check_len(d.len())?;
                Self::pack(d, n, k, WeightDtype::F32, |v: f32| v)
            }
            WeightData::BF16(d) => {
                check_len(d.len())?;
                Self::pack(d, n, k, WeightDtype::BF16, |v: bf16| v.to_bits())
            }
            WeightData::F16(d) => {
                check_len(d.len())?;
                Self::pack(d, n, k, WeightDtype::F16, |v: f16| v.to_bits())
            }
            WeightData::Quantized {
                bits,
                group_size,
                q,
                zeros,
                scales,
            } => {
                let layout = crate::quant::Layout::validate(n, k, bits, group_size, q, zeros, scales)?;
                let data = crate::quant::pack(&layout, n, k, q, zeros, scales);
                let dtype = if bits == 8 {
                    WeightDtype::Int8
                } else {
                    WeightDtype::Int4
                };
                PackedMatrix {
                    n,
                    k,
                    kp: k,
                    dtype,
                    quant: Some(layout),
                    data,
                }
            }
        })
    }

    fn pack<S: Copy + Sync, D: Copy + Send + Sync>(
        src: &[S],
        n: usize,
        k: usize,
        dtype: WeightDtype,
        conv: impl Fn(S) -> D + Sync,
    ) -> Self {
        use rayon::prelude::*;
        assert_eq!(src.len(), n * k, "weight data is not [{n}, {k}]");
        let kp = if dtype == WeightDtype::BF16 {
            k.next_multiple_of(2)
        } else {
            k
        };
        let panels = n.div_ceil(NR);
        let panel_len = kp * NR;
        let mut data = AlignedBuf::zeroed(panels * panel_len * dtype.size_in_bytes());
        let dst: &mut [D] = data.as_mut_slice();
        let pairs = dtype == WeightDtype::BF16;
        // Packing a large model is a memory-bound pass over all of it: spread the
        // panels over the pool.
        dst.par_chunks_mut(panel_len.max(1)).enumerate().for_each(|(p, panel)| {
            for j in 0..NR.min(n - p * NR) {
                let row = &src[(p * NR + j) * k..(p * NR + j + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    let at = if pairs {
                        (kk / 2) * 2 * NR + 2 * j + kk % 2
                    } else {
                        kk * NR + j
                    };
                    panel[at] = conv(v);
                }
            }
        });
        PackedMatrix {
            n,
            k,
            kp,
            dtype,
            quant: None,
            data,
        }
    }

    /// Output features (rows of the original weight).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features (columns of the original weight).
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    /// Elements of the original `[n, k]` weight.
    pub fn elem_count(&self) -> usize {
        self.n * self.k
    }

    /// Bytes the packed storage takes (padding included), which is also what one
    /// matmul reads of the weight: quantized weights count their scales and zeros,
    /// stored among their values.
    pub fn storage_bytes(&self) -> usize {
        self.data.bytes()
    }

    /// The k group of quantized weights (`None` for float weights).
    pub fn group_size(&self) -> Option<usize> {
        self.quant.map(|q| q.group_size)
    }

    /// Lets a quantized weight multiply in bf16 where that is faster: on CPUs with
    /// AMX, calls of [`crate::gemm::AMX_MIN_M_INT8`] (int4: [`crate::gemm::AMX_MIN_M_INT4`])
    /// rows or more dequantize each
    /// panel to bf16 once and multiply it in AMX tiles with the activations rounded
    /// to bf16 (as bf16 weights do), instead of in f32 FMAs that re-read the
    /// integer codes for every four rows. Without it (and for fewer rows, and on
    /// other CPUs) a quantized weight computes exactly in f32: its codes times its
    /// scales, f32 activations. Float weights ignore it.
    pub fn with_bf16_compute(mut self, on: bool) -> Self {
        if let Some(q) = self.quant.as_mut() {
            q.bf16_compute = on;
        }
        self
    }

    pub(crate) fn quant(&self) -> Option<&crate::quant::Layout> {
        self.quant.as_ref()
    }

    pub(crate) fn kp(&self) -> usize {
        self.kp
    }

    pub(crate) fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Start of panel `p` at k offset `k0` (even for bf16), in elements of the storage type.
    pub(crate) fn panel_offset(&self, p: usize, k0: usize) -> usize {
        p * self.kp * NR + k0 * NR
    }

    pub(crate) fn data_ptr<T>(&self) -> *const T {
        self.data.as_ptr()
    }

    /// Writes row `r` of the original weight as f32 into `out` (`k` values): an
    /// embedding lookup on a tied lm_head, which keeps only this packed copy.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.n, "row {r} out of {}", self.n);
        assert_eq!(out.len(), self.k);
        let (p, j) = (r / NR, r % NR);
        if let Some(q) = &self.quant {
            return q.row_f32(self.storage::<u8>(), p, j, out);
        }
        let base = self.panel_offset(p, 0);
        match self.dtype {
            WeightDtype::F32 => {
                let d: &[f32] = self.storage();
                for (kk, o) in out.iter_mut().enumerate() {
                    *o = d[base + kk * NR + j];
                }
            }
            WeightDtype::F16 => {
                let d: &[u16] = self.storage();
                for (kk, o) in out.iter_mut().enumerate() {
                    *o = f16::from_bits(d[base + kk * NR + j]).to_f32();
                }
            }
            WeightDtype::BF16 => {
                let d: &[u16] = self.storage();
                for (kk, o) in out.iter_mut().enumerate() {
                    *o = bf16::from_bits(d[base + (kk / 2) * 2 * NR + 2 * j + kk % 2]).to_f32();
                }
            }
            WeightDtype::Int8 | WeightDtype::Int4 => unreachable!("quantized rows returned above"),
        }
    }

    fn storage<T: Copy>(&self) -> &[T] {
        self.data.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_fresh_zeroed_and_huge_page_aligned() {
        // Dirty the allocator's free memory first: a recycled block would not be
        // zero unless `zeroed` zeroed it, and would not be 2 MiB aligned by chance.
        for _ in 0..4 {
            drop(vec![0xa5u8; 5 << 20]);
        }
        for bytes in [HUGE_PAGE, 3 * HUGE_PAGE + 4096, 7 << 20] {
            let mut b = AlignedBuf::zeroed(bytes);
            assert_eq!(b.as_ptr::<u8>() as usize % HUGE_PAGE, 0, "{bytes} bytes");
            assert!(b.as_slice::<u8>().iter().all(|&x| x == 0), "{bytes} bytes");
            let s = b.as_mut_slice::<u8>();
            assert_eq!(s.len(), bytes);
            s[bytes - 1] = 7;
            assert_eq!(b.as_slice::<u8>()[bytes - 1], 7);
        }
        let small = AlignedBuf::zeroed(1000);
        assert_eq!(small.as_ptr::<u8>() as usize % 64, 0);
        assert!(small.as_slice::<u8>().iter().all(|&x| x == 0));
    }

    #[test]
    fn rows_round_trip_in_every_dtype() {
        let (n, k) = (37, 19);
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let mut row = vec![0f32; k];
        for (pm, want) in [
            (PackedMatrix::new(WeightData::F32(&w), n, k), w.clone()),
            (
                PackedMatrix::new(WeightData::BF16(&wb), n, k),
                wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            ),
            (
                PackedMatrix::new(WeightData::F16(&wh), n, k),
                wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            ),
        ] {
            for r in 0..n {
                pm.row_f32(r, &mut row);
                assert_eq!(row, want[r * k..(r + 1) * k], "{:?} row {r}", pm.dtype());
            }
        }
    }
}
