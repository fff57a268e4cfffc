//! The matmul driver: prepares the activations once per call, splits the weight
//! panels over rayon's pool and walks each task's panels in cache-sized blocks,
//! handing `mr × 32` tiles to the microkernels.
//!
//! Small m (decode) takes all rows per weight panel over (nearly) all of k, so every
//! weight byte comes from DRAM once and straight into registers; the tiles after the
//! first find the panel slice in L2. Large m (prefill) blocks m by [`MC`] and k by
//! [`KC`]: a panel's `KC × 32` slice stays in L1 while every tile of the `MC × KC`
//! activation block (in L2) runs over it. AMX calls hand their panels to
//! [`crate::amx`], which blocks for its own tiles.

use crate::isa::Isa;
use crate::operands::{Input, Out};
use crate::packed::{PackedMatrix, WeightDtype, NR};
use crate::portable;
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Up to this many rows the call is a decode-style stream over the weights.
pub(crate) const SMALL_M: usize = 64;
/// k steps per block for small m: a panel slice of 4096 × 32 f32 (512 KiB) still
/// sits in L2 for the second and later tiles of the rows.
const KC_SMALL: usize = 4096;
/// Rows per activation block for large m (a multiple of the AVX-512 tile height).
const MC: usize = 192;
/// k steps per block for large m: a 256 × 32 f32 panel slice (32 KiB) fits L1.
const KC: usize = 256;

thread_local! {
    /// Activations converted for the kernels, on the calling thread.
    static X_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static X_U16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// A weight panel slice converted to f32, on each worker.
    static W_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-group sums of the activations, for quantized decode tiles.
    static X_SUM: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Activations quantized to int8, for the VNNI int4 tiles.
    static X_I8: RefCell<Vec<i8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a thread-local buffer of at least `len` values, or a fresh one if
/// the buffer is already in use further up this thread's stack (a matmul called
/// from inside a task of another matmul on the same worker).
pub(crate) fn with_scratch<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, T::default());
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// A raw pointer that tasks share; each task touches a disjoint part of it.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: the driver hands each task a disjoint set of output columns and only
// reads through the activation pointers; the pointees outlive the parallel section.
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Shared<T> {}

/// Activations as the chosen kernel reads them: row-major with a row stride.
#[derive(Clone, Copy)]
enum XOp {
    F32(Shared<f32>, usize),
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    /// bf16 bits for `vdpbf16ps` and AMX, row stride even (padded with zeros) so
    /// that pairs line up.
    Bf16(Shared<u16>, usize),
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    /// int8 codes for the VNNI int4 tiles ([`crate::quant::quantize_rows_i8`]),
    /// their scales and sums in the job's `xsum`.
    I8(Shared<i8>, usize),
}

#[derive(Clone, Copy)]
struct Job<'a> {
    isa: Isa,
    x: XOp,
    m: usize,
    w: &'a PackedMatrix,
    out: Shared<f32>,
    /// Row sums of x per k group (`[m][groups]`), for the quantized decode tiles
    /// (with `XOp::I8`: scales, then sums of codes, `[m][2·groups]`); null otherwise.
    xsum: Shared<f32>,
}

impl Job<'_> {
    /// Whether quantized panels are read in registers by the AVX-512 decode tiles
    /// (rather than dequantized to f32 blocks first).
    fn quant_stream(&self) -> bool {
        self.w.quant().is_some() && self.isa != Isa::Portable && self.m <= SMALL_M
    }
}

/// The ISA for an `m`-row call: bf16 weights multiply in AMX tiles from
/// [`AMX_MIN_M`] rows on (on CPUs that have it), in `vdpbf16ps` up to
/// [`DP_MAX_M`] rows (on CPUs that have it); otherwise they widen to f32 in
/// registers and multiply in FMAs, which retire twice the flops per cycle of
/// `vdpbf16ps` on the cores measured. `SIROCCO_KERNELS_AMX_MIN_M` and
/// `SIROCCO_KERNELS_DP_MAX_M` override the limits. Weights that [`quant_vnni`]
/// takes keep the bf16 ISA it needs.
pub(crate) fn auto_isa(m: usize, w: &PackedMatrix) -> Isa {
    match Isa::detect() {
        Isa::Amx if m >= amx_min_m() => Isa::Amx,
        Isa::Amx | Isa::Avx512Bf16 if m > dp_max_m() && !quant_vnni(Isa::Avx512Bf16, m, w) => Isa::Avx512,
        Isa::Amx => Isa::Avx512Bf16,
        isa => isa,
    }
}

fn dp_max_m() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| env_or("SIROCCO_KERNELS_DP_MAX_M", DP_MAX_M))
}

fn amx_min_m() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| env_or("SIROCCO_KERNELS_AMX_MIN_M", AMX_MIN_M))
}

/// [`AMX_MIN_M_INT8`] or [`AMX_MIN_M_INT4`] for `bits`, or
/// `SIROCCO_KERNELS_AMX_MIN_M_QUANT` for both.
pub(crate) fn amx_min_m_quant(bits: u8) -> usize {
    static V: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let env = *V.get_or_init(|| {
        std::env::var("SIROCCO_KERNELS_AMX_MIN_M_QUANT")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    env.unwrap_or(if bits == 8 { AMX_MIN_M_INT8 } else { AMX_MIN_M_INT4 })
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
const DP_MAX_M: usize = 0;
/// AMX tiles are 16 rows, so below a few rows most of their work is padding: on
/// the 2-vCPU VM measured (24 gate-sized bf16 weights, 176 MB, per pass) they won
/// from 5 rows on in every quiet run and nearly every run beside a compile
/// (m = 5: 5.7 vs 7.0 ms quiet), and lost at 2 to 4 rows while the cores were
/// shared (m = 4: 12.8 vs 12.1 ms).
const AMX_MIN_M: usize = 5;
/// From this many rows an int8 weight that may compute in bf16
/// ([`PackedMatrix::with_bf16_compute`]) is dequantized panel by panel into AMX
/// tiles; below it the f32 decode tiles, which read the codes in registers, are
/// faster. Measured on the quiet 2-vCPU Xeon (`quantized_decode_speed`, 14336 × 4096
/// and 4096 × 4096, groups of 128): AMX 4.04 vs 4.25 ms at 5 rows, 4.2 vs 5.6 ms
/// at 8 (the f32 tiles' time grows with the rows, the dequantization's does not).
pub(crate) const AMX_MIN_M_INT8: usize = 5;
/// As [`AMX_MIN_M_INT8`] for int4, whose f32 tiles are cheaper per row: AMX lost at
/// 5 rows (3.45 vs 3.06 ms), won from 6 (3.26 vs 3.43 ms; 3.36 vs 4.04 at 8).
pub(crate) const AMX_MIN_M_INT4: usize = 6;

/// Writes every element of `out` (never reads one it has not written), so `out` need
/// not be initialised.
pub(crate) fn matmul(isa: Isa, x: Input<'_>, m: usize, w: &PackedMatrix, out: &mut [MaybeUninit<f32>]) {
    let (n, k) = (w.n(), w.k());
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!(out.len(), m * n, "out is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(MaybeUninit::new(0.0));
        return;
    }
    // AMX multiplies bf16 weights, and quantized ones allowed to compute in bf16
    // at their own threshold; other weights take the AVX-512 path the automatic
    // choice would.
    let amx_quant =
        isa == Isa::Amx && w.quant().is_some_and(|q| q.bf16_compute) && m >= amx_min_m_quant(w.dtype().bits() as u8);
    let vnni4 = !amx_quant && quant_vnni(isa, m, w);
    let isa = if isa == Isa::Amx && w.dtype() != WeightDtype::BF16 && !amx_quant {
        Isa::Avx512
    } else {
        isa
    };
    let out = Shared(out.as_mut_ptr().cast::<f32>());
    // Rows padded to the packed k, so that a bf16 pair never reads past a row.
    let kp = w.kp();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx {
        // Whole A tiles: rows up to a multiple of 16, k up to a multiple of 32,
        // zeros in both paddings.
        use crate::amx::{TILE_K, TILE_M};
        let (ld, rows) = (kp.next_multiple_of(TILE_K), m.next_multiple_of(TILE_M));
        return with_scratch(&X_U16, rows * ld, |buf| {
            let (real, pad) = buf.split_at_mut(m * ld);
            convert_rows(x, k, real, ld, to_bf16);
            pad.fill(0);
            run(&Job {
                isa,
                x: XOp::Bf16(Shared(buf.as_mut_ptr()), ld),
                m,
                w,
                out,
                xsum: Shared(std::ptr::null_mut()),
            })
        });
    }
    if vnni4 {
        // int4 decode in `vpdpbusd` on activations quantized to int8 per group
        // (see `x86_quant::qtile_vnni4`).
        let q = w.quant().expect("quantized");
        return with_scratch(&X_F32, m * k, |xf| {
            convert_rows(x, k, xf, k, |src, dst| half_to_f32(isa, src, dst));
            with_scratch(&X_I8, m * k, |xq| {
                with_scratch(&X_SUM, m * 2 * q.groups, |xs| {
                    crate::quant::quantize_rows_i8(xf, m, k, q.group_size, xq, xs);
                    run_panels(&Job {
                        isa: Isa::Avx512Bf16,
                        x: XOp::I8(Shared(xq.as_mut_ptr()), k),
                        m,
                        w,
                        out,
                        xsum: Shared(xs.as_mut_ptr()),
                    })
                })
            })
        });
    }
    if w.dtype() == WeightDtype::BF16 && isa == Isa::Avx512Bf16 {
        if let (Input::BF16(xb), true) = (x, kp == k) {
            let x = XOp::Bf16(Shared(xb.as_ptr() as *mut u16), kp);
            let xsum = Shared(std::ptr::null_mut());
            return run(&Job {
                isa,
                x,
                m,
                w,
                out,
                xsum,
            });
        }
        with_scratch(&X_U16, m * kp, |buf| {
            convert_rows(x, k, buf, kp, to_bf16);
            run(&Job {
                isa,
                x: XOp::Bf16(Shared(buf.as_mut_ptr()), kp),
                m,
                w,
                out,
                xsum: Shared(std::ptr::null_mut()),
            })
        })
    } else if let (Input::F32(xf), true) = (x, kp == k) {
        run(&Job {
            isa,
            x: XOp::F32(Shared(xf.as_ptr() as *mut f32), k),
            m,
            w,
            out,
            xsum: Shared(std::ptr::null_mut()),
        })
    } else {
        with_scratch(&X_F32, m * kp, |buf| {
            convert_rows(x, k, buf, kp, |src, dst| half_to_f32(isa, src, dst));
            run(&Job {
                isa,
                x: XOp::F32(Shared(buf.as_mut_ptr()), kp),
                m,
                w,
                out,
                xsum: Shared(std::ptr::null_mut()),
            })
        })
    }
}

/// Whether an `m`-row call on `w` takes the int4 VNNI decode tiles, which quantize
/// the activations to int8: int4 weights that may compute in reduced precision
/// ([`PackedMatrix::with_bf16_compute`]), in groups of a multiple of 8 k steps, on
/// the bf16 ISAs (the caller keeps AMX for the rows where it pays) of a CPU with
/// AVX-512 VNNI and VBMI.
pub(crate) fn quant_vnni(isa: Isa, m: usize, w: &PackedMatrix) -> bool {
    w.quant().is_some_and(|q| {
        q.bits == 4 && q.group_size.is_multiple_of(8) && m <= SMALL_M && vnni_int4(isa, q.bf16_compute)
    })
}

/// Whether int4 weights that may compute in bf16 (`bf16_compute`) take the VNNI
/// tiles on `isa` at all: the bf16 ISAs, on a CPU with VNNI and VBMI.
pub(crate) fn vnni_int4(isa: Isa, bf16_compute: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    let vnni = crate::x86_quant::vnni_available();
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    vnni && bf16_compute && matches!(isa, Isa::Avx512Bf16 | Isa::Amx)
}

/// Activations as bf16 bits, for the kernels that multiply bf16 pairs (only
/// chosen on CPUs with AVX512_BF16).
fn to_bf16(src: Input<'_>, dst: &mut [u16]) {
    match src {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the bf16 ISAs are only chosen when the CPU has these features;
        // the slices bound both pointers.
        Input::F32(s) => unsafe { crate::x86::f32_to_bf16(s.as_ptr(), dst.as_mut_ptr(), s.len()) },
        #[cfg(not(target_arch = "x86_64"))]
        Input::F32(s) => dst
            .iter_mut()
            .zip(s)
            .for_each(|(d, &v)| *d = bf16::from_f32(v).to_bits()),
        Input::BF16(s) => dst.iter_mut().zip(s).for_each(|(d, v)| *d = v.to_bits()),
        Input::F16(s) => dst
            .iter_mut()
            .zip(s)
            .for_each(|(d, v)| *d = bf16::from_f32(v.to_f32()).to_bits()),
    }
}

fn half_to_f32(isa: Isa, src: Input<'_>, dst: &mut [f32]) {
    match src {
        Input::F32(s) => dst.copy_from_slice(s),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 ISAs are only chosen when the CPU has AVX-512F; the
        // slices bound both pointers.
        Input::BF16(s) if isa != Isa::Portable => unsafe {
            crate::x86::half_to_f32(s.as_ptr() as *const u16, dst.as_mut_ptr(), s.len(), true)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Input::F16(s) if isa != Isa::Portable => unsafe {
            crate::x86::half_to_f32(s.as_ptr() as *const u16, dst.as_mut_ptr(), s.len(), false)
        },
        Input::BF16(s) => dst.iter_mut().zip(s).for_each(|(d, v)| *d = v.to_f32()),
        Input::F16(s) => dst.iter_mut().zip(s).for_each(|(d, v)| *d = v.to_f32()),
    }
    let _ = isa;
}

/// Converts the `[m, k]` activations row by row into `dst` with row stride `ld`
/// (zeroing the padding), over the pool when there is enough of it to pay.
fn convert_rows<T: Copy + Default + Send>(
    x: Input<'_>,
    k: usize,
    dst: &mut [T],
    ld: usize,
    conv: impl Fn(Input<'_>, &mut [T]) + Sync,
) {
    let row = |(i, d): (usize, &mut [T])| {
        conv(x.row(i, k), &mut d[..k]);
        d[k..].fill(T::default());
    };
    if dst.len() >= 1 << 16 {
        dst.par_chunks_mut(ld).enumerate().for_each(row);
    } else {
        dst.chunks_mut(ld).enumerate().for_each(row);
    }
}

/// Splits the call's panels into chunks for the calling thread and the pool (see
/// [`crate::parallel`]).
fn run(job: &Job<'_>) {
    if let (true, Some(q), XOp::F32(x, ld)) = (job.quant_stream(), job.w.quant(), job.x) {
        let (m, k) = (job.m, job.w.k());
        return with_scratch(&X_SUM, m * q.groups, |sums| {
            crate::quant::group_sums(x.0, ld, m, k, q.group_size, sums);
            run_panels(&Job {
                xsum: Shared(sums.as_mut_ptr()),
                ..*job
            })
        });
    }
    run_panels(job)
}

fn run_panels(job: &Job<'_>) {
    let panels = job.w.panels();
    if job.m <= SMALL_M {
        // Decode streams the weights: each claim takes a share of what is left, down
        // to single panels at the end, so that the threads finish within a panel's
        // time of each other and a helper that starts late or runs slowly (another
        // tensor-parallel rank, the OS) costs little. Fixed chunks of 1/16 left a core
        // idle for half a chunk per call on average (~16 µs per call).
        return crate::parallel::for_each_guided(panels, 1, |r| job.panels(r));
    }
    // Prefill: two chunks per thread, since each re-reads its activation blocks.
    let chunks = (rayon::current_num_threads() * 2).min(panels).max(1);
    crate::parallel::for_each_index(chunks, |c| job.panels(c * panels / chunks..(c + 1) * panels / chunks));
}

impl Job<'_> {
    /// Computes the output columns of `panels`, all rows.
    fn panels(&self, panels: std::ops::Range<usize>) {
        if panels.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let (Isa::Amx, XOp::Bf16(x, ld)) = (self.isa, self.x) {
            // SAFETY: Amx is only chosen when `amx::available()`; `matmul` padded x
            // as `amx::panels` wants it; out is `[m, n]` and tasks get disjoint
            // panels.
            return unsafe { crate::amx::panels(x.0, ld, self.m, self.w, panels, self.out.0, self.m <= SMALL_M) };
        }
        let (m, n, k) = (self.m, self.w.n(), self.w.k());
        let small = m <= SMALL_M;
        let quant = self.w.quant().copied();
        // Quantized decode tiles take whole groups: all of k in one go (a panel of
        // 14336 int8 steps is 450 KiB, still in L2 for the later row tiles).
        let qstream = self.quant_stream();
        let (mc, kc_blk) = if small {
            (m, if qstream { k } else { KC_SMALL })
        } else {
            (MC, KC)
        };
        let half = self.w.dtype() != WeightDtype::F32;
        // Half-precision panels are widened to f32 in memory by the portable path,
        // and by the AVX-512 path for large m, where a widened block serves many
        // tiles; AVX-512 at small m widens in registers and streams the weights
        // once at their own size. Quantized ones likewise, dequantized.
        let convert = if quant.is_some() {
            !qstream
        } else {
            half && (self.isa == Isa::Portable || (!small && matches!(self.x, XOp::F32(..))))
        };
        let mr_max = match self.isa {
            Isa::Portable => portable::MR_MAX,
            #[cfg(target_arch = "x86_64")]
            _ if qstream => crate::x86_quant::MR_MAX_Q,
            #[cfg(target_arch = "x86_64")]
            _ if half && !convert && matches!(self.x, XOp::F32(..)) => crate::x86::MR_MAX_WIDEN,
            #[cfg(target_arch = "x86_64")]
            _ if small && !half && matches!(self.x, XOp::F32(..)) => crate::x86::MR_MAX_STREAM,
            #[cfg(target_arch = "x86_64")]
            _ => crate::x86::MR_MAX,
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!(),
        };
        // Room for a bf16 block's odd last pair.
        let scratch_len = if convert { (kc_blk + 1) * NR } else { 0 };
        with_scratch(&W_F32, scratch_len, |scratch| {
            for m0 in (0..m).step_by(mc) {
                let mb = mc.min(m - m0);
                let blocks = mb.div_ceil(mr_max);
                for k0 in (0..k).step_by(kc_blk) {
                    let kc = kc_blk.min(k - k0);
                    for p in panels.clone() {
                        // Quantized panels: the byte offset of the panel (whose
                        // groups the tiles and the dequantization find in it).
                        let off = match quant {
                            Some(q) => p * q.panel_bytes(),
                            None => self.w.panel_offset(p, k0),
                        };
                        if let (true, Some(q)) = (convert, quant) {
                            let simd = self.isa != Isa::Portable;
                            q.dequant_block(simd, self.w.data_ptr::<u8>(), p, k0, kc, scratch);
                        } else if convert {
                            self.convert_panel(off, kc, scratch);
                        }
                        let mut i0 = m0;
                        for b in 0..blocks {
                            // Decode: full tiles first, so that the streaming tile
                            // carries as many rows as it can (see
                            // `x86::MR_MAX_STREAM`). Prefill: even tiles.
                            let mr = if small {
                                mr_max.min(mb - (i0 - m0))
                            } else {
                                mb / blocks + usize::from(b < mb % blocks)
                            };
                            let c = Out {
                                // SAFETY: i0 < m and p*NR < n: inside out.
                                ptr: unsafe { self.out.0.add(i0 * n + p * NR) },
                                ldc: n,
                                ncols: NR.min(n - p * NR),
                                accumulate: k0 > 0,
                            };
                            // The first row block of a streaming pass brings the
                            // panel in from DRAM; the later ones find it in cache.
                            let pf = small && b == 0;
                            let w = if convert { Some(&scratch[..]) } else { None };
                            // SAFETY: i0 + mr <= m, k0 + kc <= k (a bf16 pair may
                            // reach kp, where x and the weight are zero-padded),
                            // p < panels: every pointer stays inside x, the packed
                            // weight (or the converted slice) and out, and tasks
                            // write disjoint columns.
                            unsafe { self.tile(mr, pf, i0, k0, kc, off, w, c) };
                            i0 += mr;
                        }
                    }
                }
            }
        })
    }

    /// One tile: rows `i0..i0+mr`, k steps `k0..k0+kc` of the panel at `off`.
    ///
    /// # Safety
    /// Rows `i0..i0+mr` and k steps `k0..k0+kc` lie inside the input and the packed
    /// weight (a bf16 pair may reach the zero padding), `off` is a panel's offset,
    /// `c` points into the output at this tile's rows and columns, which no other task
    /// writes; the ISA chosen at construction is this CPU's.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        mr: usize,
        pf: bool,
        i0: usize,
        k0: usize,
        kc: usize,
        off: usize,
        widened: Option<&[f32]>,
        c: Out,
    ) {
        match (self.x, self.isa) {
            #[cfg(target_arch = "x86_64")]
            (XOp::I8(x, ld), _) => {
                debug_assert!(k0 == 0 && kc == self.w.k(), "quantized tiles take all of k");
                let t = self.qtile(x.0.add(i0 * ld), ld, i0, 2, off);
                crate::x86_quant::gemm_tile_q4_vnni(mr, pf, t, c)
            }
            #[cfg(target_arch = "x86_64")]
            (XOp::Bf16(x, ld), _) => crate::x86::gemm_tile_dp(
                mr,
                pf,
                kc.div_ceil(2),
                x.0.add(i0 * ld + k0),
                ld,
                self.w.data_ptr::<u16>().add(off),
                c,
            ),
            #[cfg(target_arch = "x86_64")]
            (XOp::F32(x, ld), Isa::Avx512 | Isa::Avx512Bf16) => {
                use crate::x86::{gemm_tile, Bf16Panel, F16Panel, F32Panel};
                let xp = x.0.add(i0 * ld + k0);
                if let Some(w) = widened {
                    return gemm_tile::<F32Panel>(mr, pf, kc, xp, ld, w.as_ptr() as _, c);
                }
                match self.w.dtype() {
                    WeightDtype::F32 => {
                        gemm_tile::<F32Panel>(mr, pf, kc, xp, ld, self.w.data_ptr::<f32>().add(off) as _, c)
                    }
                    WeightDtype::F16 => {
                        gemm_tile::<F16Panel>(mr, pf, kc, xp, ld, self.w.data_ptr::<u16>().add(off) as _, c)
                    }
                    WeightDtype::BF16 => gemm_tile::<Bf16Panel>(
                        mr,
                        pf,
                        kc.div_ceil(2),
                        xp,
                        ld,
                        self.w.data_ptr::<u16>().add(off) as _,
                        c,
                    ),
                    WeightDtype::Int8 | WeightDtype::Int4 => {
                        let q = self.w.quant().expect("quantized weights have a layout");
                        debug_assert!(k0 == 0 && kc == self.w.k(), "quantized tiles take all of k");
                        let t = self.qtile(xp, ld, i0, 1, off);
                        crate::x86_quant::gemm_tile_q(q.bits, mr, pf, t, c)
                    }
                }
            }
            (XOp::F32(x, ld), _) => {
                let w = match widened {
                    Some(w) => w.as_ptr(),
                    None => self.w.data_ptr::<f32>().add(off),
                };
                // The portable tiles leave prefetching to the hardware.
                let _ = pf;
                portable::gemm_tile_f32(mr, kc, x.0.add(i0 * ld + k0), ld, w, c)
            }
            #[cfg(not(target_arch = "x86_64"))]
            (XOp::Bf16(..) | XOp::I8(..), _) => unreachable!("vdpbf16ps and VNNI tiles off x86"),
        }
    }

    /// A quantized decode tile's operands: the panel at `off`, activations `x` from
    /// row `i0` (stride `ld`), and `per_group` values per group and row in `xsum`.
    #[cfg(target_arch = "x86_64")]
    fn qtile<X>(&self, x: *const X, ld: usize, i0: usize, per_group: usize, off: usize) -> crate::x86_quant::QTile<X> {
        let q = self.w.quant().expect("quantized weights have a layout");
        let lds = per_group * q.groups;
        crate::x86_quant::QTile {
            groups: q.groups,
            gs: q.group_size,
            group_bytes: q.group_bytes,
            values: q.values,
            float_zeros: q.float_zeros,
            x,
            ldx: ld,
            xs: self.xsum.0.wrapping_add(i0 * lds),
            lds,
            w: self.w.data_ptr::<u8>().wrapping_add(off),
        }
    }

    /// Converts `kc` k steps of a half-precision panel at `off` to f32 `[kc][32]`.
    fn convert_panel(&self, off: usize, kc: usize, scratch: &mut [f32]) {
        let bf = self.w.dtype() == WeightDtype::BF16;
        let len = if bf { kc.div_ceil(2) * 2 * NR } else { kc * NR };
        // SAFETY: the packed buffer holds kp*32 values per panel from `off` on, and
        // kc (rounded up to a pair for bf16) <= kp - k0; the slice is in bounds.
        let src = unsafe { std::slice::from_raw_parts(self.w.data_ptr::<u16>().add(off), len) };
        match (self.isa, bf) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX-512 ISAs imply AVX-512F/BW; `scratch` holds
            // (KC+1)*32 values, enough for the slice widened.
            (Isa::Avx512 | Isa::Avx512Bf16, true) => unsafe {
                use crate::x86::{widen_panel, Bf16Panel};
                widen_panel::<Bf16Panel>(src.as_ptr() as _, scratch.as_mut_ptr(), kc.div_ceil(2))
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Isa::Avx512 | Isa::Avx512Bf16, false) => unsafe {
                use crate::x86::{widen_panel, F16Panel};
                widen_panel::<F16Panel>(src.as_ptr() as _, scratch.as_mut_ptr(), kc)
            },
            (_, true) => portable::bf16_panel_to_f32(src, scratch),
            (_, false) => portable::f16_panel_to_f32(src, scratch),
        }
    }
}
