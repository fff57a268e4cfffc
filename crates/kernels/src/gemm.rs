//! The matmul driver: prepares the activations once per call, splits the weight
//! panels over rayon's pool and walks each task's panels in cache-sized blocks,
//! handing `mr × 32` tiles to the microkernels.
//!
//! Small m (decode) takes all rows per weight panel over (nearly) all of k, so every
//! weight byte comes from DRAM once and straight into registers; the tiles after the
//! first find the panel slice in L2. Large m (prefill) blocks m by [`MC`] and k by
//! [`KC`]: a panel's `KC × 32` slice stays in L1 while every tile of the `MC × KC`
//! activation block (in L2) runs over it.

use crate::packed::{PackedMatrix, WeightDtype, NR};
use crate::{portable, Input, Isa, Out};
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;

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
}

/// Runs `f` with a thread-local buffer of at least `len` values, or a fresh one if
/// the buffer is already in use further up this thread's stack (a matmul called
/// from inside a task of another matmul on the same worker).
fn with_scratch<T: Copy + Default, R>(
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
    /// bf16 bits, row stride even (padded with zeros) so that pairs line up.
    Bf16(Shared<u16>, usize),
}

struct Job<'a> {
    isa: Isa,
    x: XOp,
    m: usize,
    w: &'a PackedMatrix,
    out: Shared<f32>,
}

pub(crate) fn matmul(isa: Isa, x: Input<'_>, m: usize, w: &PackedMatrix, out: &mut [f32]) {
    let (n, k) = (w.n(), w.k());
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!(out.len(), m * n, "out is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let out = Shared(out.as_mut_ptr());
    if w.dtype() == WeightDtype::BF16 && isa == Isa::Avx512Bf16 {
        let kp = w.kp();
        if let (Input::BF16(xb), true) = (x, kp == k) {
            let x = XOp::Bf16(Shared(xb.as_ptr() as *mut u16), kp);
            return run(&Job { isa, x, m, w, out });
        }
        with_scratch(&X_U16, m * kp, |buf| {
            convert_rows(x, k, buf, kp, |src, dst| match src {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: Avx512Bf16 is only chosen when the CPU has these features;
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
            });
            run(&Job {
                isa,
                x: XOp::Bf16(Shared(buf.as_mut_ptr()), kp),
                m,
                w,
                out,
            })
        })
    } else if let Input::F32(xf) = x {
        run(&Job {
            isa,
            x: XOp::F32(Shared(xf.as_ptr() as *mut f32), k),
            m,
            w,
            out,
        })
    } else {
        with_scratch(&X_F32, m * k, |buf| {
            convert_rows(x, k, buf, k, |src, dst| half_to_f32(isa, src, dst));
            run(&Job {
                isa,
                x: XOp::F32(Shared(buf.as_mut_ptr()), k),
                m,
                w,
                out,
            })
        })
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

fn run(job: &Job<'_>) {
    let panels = job.w.panels();
    let threads = rayon::current_num_threads();
    // Decode: more tasks than threads so that a worker slowed by other work (another
    // tensor-parallel rank, the OS) hands its share over. Prefill: fewer, larger
    // tasks, since each re-reads its activation blocks.
    let per_thread = if job.m <= SMALL_M { 4 } else { 2 };
    let tasks = (threads * per_thread).min(panels).max(1);
    if tasks == 1 || threads == 1 {
        job.panels(0..panels);
    } else {
        (0..tasks)
            .into_par_iter()
            .for_each(|t| job.panels(t * panels / tasks..(t + 1) * panels / tasks));
    }
}

impl Job<'_> {
    /// Computes the output columns of `panels`, all rows.
    fn panels(&self, panels: std::ops::Range<usize>) {
        if panels.is_empty() {
            return;
        }
        let (m, n, k) = (self.m, self.w.n(), self.w.k());
        let (mc, kc_blk) = if m <= SMALL_M { (m, KC_SMALL) } else { (MC, KC) };
        let mr_max = self.isa.mr_max();
        let native = matches!(self.x, XOp::Bf16(..));
        let convert = !native && self.w.dtype() != WeightDtype::F32;
        // Room for a bf16 block's odd last pair.
        let scratch_len = if convert { (kc_blk + 1) * NR } else { 0 };
        with_scratch(&W_F32, scratch_len, |scratch| {
            for m0 in (0..m).step_by(mc) {
                let mb = mc.min(m - m0);
                let blocks = mb.div_ceil(mr_max);
                for k0 in (0..k).step_by(kc_blk) {
                    let kc = kc_blk.min(k - k0);
                    for p in panels.clone() {
                        let ncols = NR.min(n - p * NR);
                        let off = self.w.panel_offset(p, k0);
                        let wf32 = match self.w.dtype() {
                            WeightDtype::F32 => self.w.data_ptr::<f32>().wrapping_add(off),
                            _ if native => std::ptr::null(),
                            dt => {
                                self.convert_panel(dt, off, kc, scratch);
                                scratch.as_ptr()
                            }
                        };
                        let mut i0 = m0;
                        for b in 0..blocks {
                            let mr = mb / blocks + usize::from(b < mb % blocks);
                            // SAFETY: i0 + mr <= m, k0 + kc <= k (kp for bf16, whose
                            // padding is zero), p < panels, ncols <= n - p*NR: every
                            // pointer below stays inside x, the packed weight (or the
                            // converted slice) and out, and tasks write disjoint columns.
                            unsafe {
                                let c = Out {
                                    ptr: self.out.0.add(i0 * n + p * NR),
                                    ldc: n,
                                    ncols,
                                    accumulate: k0 > 0,
                                };
                                match self.x {
                                    XOp::F32(x, ld) => self.tile_f32(mr, kc, x.0.add(i0 * ld + k0), ld, wf32, c),
                                    XOp::Bf16(x, ld) => self.tile_bf16(
                                        mr,
                                        kc.div_ceil(2),
                                        x.0.add(i0 * ld + k0),
                                        ld,
                                        self.w.data_ptr::<u16>().add(off),
                                        c,
                                    ),
                                }
                            }
                            i0 += mr;
                        }
                    }
                }
            }
        })
    }

    /// Converts `kc` k steps of a half-precision panel at `off` to f32 `[kc][32]`.
    fn convert_panel(&self, dt: WeightDtype, off: usize, kc: usize, scratch: &mut [f32]) {
        let pairs = kc.div_ceil(2);
        // SAFETY: the packed buffer holds kp*32 values per panel from `off` on, and
        // kc (rounded up to a pair for bf16) <= kp - k0; the slice is in bounds.
        let src = unsafe {
            let len = if dt == WeightDtype::BF16 {
                pairs * 2 * NR
            } else {
                kc * NR
            };
            std::slice::from_raw_parts(self.w.data_ptr::<u16>().add(off), len)
        };
        match (self.isa, dt) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the AVX-512 ISAs imply AVX-512F; `scratch` holds (KC+1)*32 values.
            (Isa::Avx512 | Isa::Avx512Bf16, WeightDtype::F16) => unsafe {
                crate::x86::f16_panel_to_f32(src.as_ptr(), scratch.as_mut_ptr(), kc)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Isa::Avx512 | Isa::Avx512Bf16, WeightDtype::BF16) => unsafe {
                crate::x86::bf16_panel_to_f32(src.as_ptr(), scratch.as_mut_ptr(), pairs)
            },
            (_, WeightDtype::F16) => portable::f16_panel_to_f32(src, scratch),
            (_, _) => portable::bf16_panel_to_f32(src, scratch),
        }
    }

    unsafe fn tile_f32(&self, mr: usize, kc: usize, x: *const f32, ldx: usize, w: *const f32, c: Out) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => crate::x86::gemm_tile_f32(mr, kc, x, ldx, w, c),
            _ => portable::gemm_tile_f32(mr, kc, x, ldx, w, c),
        }
    }

    unsafe fn tile_bf16(&self, mr: usize, pairs: usize, x: *const u16, ldx: usize, w: *const u16, c: Out) {
        #[cfg(target_arch = "x86_64")]
        crate::x86::gemm_tile_bf16(mr, pairs, x, ldx, w, c);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 tiles on {:?}", (mr, pairs, x, ldx, w, c));
    }
}
