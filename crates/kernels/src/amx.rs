//! Intel AMX (`amx_bf16`) matmul for bf16 weights: the process's permission to use
//! tile data, the tile configuration, the `tdpbf16ps` microkernels and the loop
//! that runs them over a task's weight panels.
//!
//! The packed bf16 panel (`[k/2][32][2]`, see [`crate::packed`]) already is the
//! "VNNI" layout `tdpbf16ps` wants for its B operand: 16 pair rows of one 16-column
//! half are 64 bytes each, 128 bytes apart. So the weights are used as packed; only
//! the activations are copied per call, into rows padded with zeros to whole tiles
//! (16 rows, 32 k values).

use crate::packed::{PackedMatrix, NR};
use std::arch::asm;
use std::sync::OnceLock;

/// Rows of an A or C tile.
pub(crate) const TILE_M: usize = 16;
/// k values per A row / B column of one `tdpbf16ps` (64 bytes of bf16).
pub(crate) const TILE_K: usize = 32;
/// Bytes between the pair rows of a packed panel: 32 columns of bf16 pairs.
const PANEL_ROW_BYTES: usize = NR * 4;
/// How far ahead of its B tiles the first row tile of a panel prefetches at decode
/// sizes: two k steps of 2 KiB (measured better than none; other distances not
/// tried).
const PREFETCH_BYTES: usize = 4096;
/// Bytes the activation block of a large-m call should keep in L2 (of the 2 MiB
/// per core measured), next to the weight panel that its row tiles share (not
/// tuned: prefill measured bound by tile loads, about 15 ns per `tileloadd` even
/// from L1 on the VM measured, one per `tdpbf16ps` in the 2 × 2 blocking).
const A_BLOCK_BYTES: usize = 1 << 20;

/// Whether this CPU has AMX-TILE and AMX-BF16 and the OS lets this process use
/// tile data (Linux grants it per process on request); asked once.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // `is_x86_feature_detected!` knows AMX only on nightly: CPUID.(7,0):EDX
        // bit 22 is AMX-BF16, bit 24 AMX-TILE.
        // SAFETY: CPUID leaf 7 exists on every CPU with AVX-512, which callers
        // checked first (the call is safe from Rust 1.89 on, unsafe before).
        #[allow(unused_unsafe)]
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && request_permission()
    })
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which xsave features
    // this process may use; it fails (non-zero) on kernels without AMX support.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// The `ldtilecfg` operand: palette 1, every tile 16 rows of 64 bytes. tmm0..3 are
/// C (2 × 2 blocks of 16 × 16 f32), tmm4/5 A (16 rows × 32 k), tmm6/7 B (16 pairs ×
/// 16 columns).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = TILE_M as u8;
        t += 1;
    }
    TileConfig(c)
};

/// `c[16·MT × 32] (+)= a[16·MT rows × 32·steps] · b`, with `c` a row-major
/// `[16·MT][32]` f32 buffer that is loaded first when `load_c` (a later k range
/// of the same tile) and stored at the end.
///
/// # Safety
/// The thread's tiles are configured with [`CONFIG`]; `a` has `16·MT` rows `lda`
/// bytes apart, each with `32·steps` bf16 values; `b` holds `steps` blocks of 16
/// rows of `128` bytes (a packed panel's pair rows); `c` is valid for `16·MT`
/// rows of 32 f32. With `pf`, prefetches the B stream
/// [`PREFETCH_BYTES`] ahead (harmless past its end: prefetches never fault).
#[inline(always)]
unsafe fn kernel<const MT: usize>(
    a: *const u16,
    lda: usize,
    b: *const u16,
    steps: usize,
    c: *mut f32,
    load_c: bool,
    pf: bool,
) {
    const LDC: usize = NR * 4;
    if MT == 1 {
        asm!(
            "test {lc}, {lc}",
            "jz 2f",
            "tileloadd tmm0, [{c} + {ldc}*1]",
            "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
            "jmp 3f",
            "2:",
            "tilezero tmm0",
            "tilezero tmm1",
            "3:",
            "test {steps}, {steps}",
            "jz 5f",
            "4:",
            "test {pf}, {pf}",
            "jz 6f",
            ".irp off, 0,64,128,192,256,320,384,448,512,576,640,704,768,832,896,960,1024,1088,1152,1216,1280,1344,1408,1472,1536,1600,1664,1728,1792,1856,1920,1984",
            "prefetcht0 [{b} + {ahead} + \\off]",
            ".endr",
            "6:",
            "tileloadd tmm4, [{a} + {lda}*1]",
            "tileloadd tmm6, [{b} + {ldb}*1]",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "add {a}, 64",
            "add {b}, {bstep}",
            "dec {steps}",
            "jnz 4b",
            "5:",
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            lc = in(reg) usize::from(load_c),
            pf = in(reg) usize::from(pf),
            ahead = const PREFETCH_BYTES,
            c = in(reg) c,
            ldc = in(reg) LDC,
            a = inout(reg) a => _,
            lda = in(reg) lda,
            b = inout(reg) b => _,
            ldb = in(reg) PANEL_ROW_BYTES,
            steps = inout(reg) steps => _,
            bstep = const TILE_M * PANEL_ROW_BYTES,
            options(nostack),
        );
    } else {
        asm!(
            "test {lc}, {lc}",
            "jz 2f",
            "tileloadd tmm0, [{c} + {ldc}*1]",
            "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
            "tileloadd tmm2, [{c2} + {ldc}*1]",
            "tileloadd tmm3, [{c2} + {ldc}*1 + 64]",
            "jmp 3f",
            "2:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "3:",
            "test {steps}, {steps}",
            "jz 5f",
            "4:",
            "test {pf}, {pf}",
            "jz 6f",
            ".irp off, 0,64,128,192,256,320,384,448,512,576,640,704,768,832,896,960,1024,1088,1152,1216,1280,1344,1408,1472,1536,1600,1664,1728,1792,1856,1920,1984",
            "prefetcht0 [{b} + {ahead} + \\off]",
            ".endr",
            "6:",
            "tileloadd tmm4, [{a} + {lda}*1]",
            "tileloadd tmm6, [{b} + {ldb}*1]",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
            "tileloadd tmm5, [{a2} + {lda}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 64",
            "add {a2}, 64",
            "add {b}, {bstep}",
            "dec {steps}",
            "jnz 4b",
            "5:",
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            "tilestored [{c2} + {ldc}*1], tmm2",
            "tilestored [{c2} + {ldc}*1 + 64], tmm3",
            lc = in(reg) usize::from(load_c),
            pf = in(reg) usize::from(pf),
            ahead = const PREFETCH_BYTES,
            c = in(reg) c,
            c2 = in(reg) c.add(TILE_M * NR),
            ldc = in(reg) LDC,
            a = inout(reg) a => _,
            a2 = inout(reg) a.add(TILE_M * lda / 2) => _,
            lda = in(reg) lda,
            b = inout(reg) b => _,
            ldb = in(reg) PANEL_ROW_BYTES,
            steps = inout(reg) steps => _,
            bstep = const TILE_M * PANEL_ROW_BYTES,
            options(nostack),
        );
    }
}

/// A tile's f32 results, aligned for `tilestored`.
#[repr(C, align(64))]
struct CBuf([f32; 2 * TILE_M * NR]);

/// The last, partial k block of a panel: its pair rows followed by zero rows, so
/// that a whole B tile reads only this panel.
#[repr(C, align(64))]
struct TailBuf([u16; TILE_M * 2 * NR]);

/// Computes output columns of `panels` for all `m` rows.
///
/// `x` is the activations as bf16, `ldx` values per row (a multiple of
/// [`TILE_K`], zero past k), with rows up to `m` rounded up to [`TILE_M`]
/// (the extra ones zero). `out` is `[m, w.n()]`. `stream`: the call is decode-sized
/// (the matmul driver streams the weights from DRAM once).
///
/// # Safety
/// [`available`] is true; `x` and `out` are valid as described; tasks running at
/// the same time write disjoint panels.
pub(crate) unsafe fn panels(
    x: *const u16,
    ldx: usize,
    m: usize,
    w: &PackedMatrix,
    panels: std::ops::Range<usize>,
    out: *mut f32,
    stream: bool,
) {
    // Configured per call and released at its end rather than once per thread:
    // nothing else on the thread (another library's tiles) can leave a different
    // configuration behind, and a thread between calls carries no tile state
    // through context switches. Measured no slower on the model sweep.
    // SAFETY: `available()` (the caller's contract) means the instruction exists
    // and the process may use tile data; the operand is a valid configuration.
    asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    // Quantized panels are dequantized into a per-thread buffer (with room to start
    // it on a cache line); float ones are read as packed.
    let qlen = if w.quant().is_some() { ldx * NR + 32 } else { 0 };
    crate::gemm::with_scratch(&QPANEL, qlen, |buf| {
        let skip = buf.as_ptr().align_offset(64).min(buf.len());
        run_panels(x, ldx, m, w, panels, out, stream, &mut buf[skip..])
    });
    // SAFETY: as for `ldtilecfg`; the tiles hold nothing that is still needed.
    asm!("tilerelease", options(nostack, nomem));
}

thread_local! {
    /// A quantized panel dequantized to bf16, on each worker.
    static QPANEL: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`panels`] once the tiles are configured; `qpanel` has room for a quantized
/// panel's bf16 values, `ldx · NR` (nothing for float weights).
///
/// # Safety
/// As for [`panels`], with the tiles configured.
#[allow(clippy::too_many_arguments)]
unsafe fn run_panels(
    x: *const u16,
    ldx: usize,
    m: usize,
    w: &PackedMatrix,
    panels: std::ops::Range<usize>,
    out: *mut f32,
    stream: bool,
    qpanel: &mut [u16],
) {
    let n = w.n();
    let quant = w.quant().copied();
    // B is `steps` whole k blocks and `tail_pairs` pairs past them: a quantized panel
    // is dequantized zero-padded to `ldx` (no tail).
    let (steps, tail_pairs) = match quant {
        Some(_) => (ldx / TILE_K, 0),
        None => (w.kp() / TILE_K, (w.kp() % TILE_K) / 2),
    };
    let lda = ldx * 2;
    // Row tiles of one block share each weight panel from L2; the block's
    // activations stay there for all the panels.
    let mc = (A_BLOCK_BYTES / lda).max(2 * TILE_M) / (2 * TILE_M) * (2 * TILE_M);
    let mut cbuf = CBuf([0.0; 2 * TILE_M * NR]);
    let mut tail = TailBuf([0; TILE_M * 2 * NR]);
    for m0 in (0..m).step_by(mc) {
        let mb = mc.min(m - m0);
        for p in panels.clone() {
            let b = match quant {
                Some(q) => {
                    q.dequant_panel_bf16(w.data_ptr::<u8>(), p, w.k(), ldx, qpanel);
                    qpanel.as_ptr()
                }
                None => w.data_ptr::<u16>().add(w.panel_offset(p, 0)),
            };
            if tail_pairs > 0 {
                let src = b.add(steps * TILE_K * NR);
                std::ptr::copy_nonoverlapping(src, tail.0.as_mut_ptr(), tail_pairs * 2 * NR);
            }
            let ncols = NR.min(n - p * NR);
            // Every A tile reads whole rows of the padded `x` (tiles of 32 rows
            // only where more than 16 real rows are left, so that the padding
            // covers them), B reads `steps` blocks inside the panel (the partial
            // one comes from `tail`), and C is `cbuf`.
            let mut i0 = m0;
            while i0 < m0 + mb {
                let rows = (m0 + mb - i0).min(2 * TILE_M);
                let a = x.add(i0 * ldx);
                let c = cbuf.0.as_mut_ptr();
                // At decode sizes the first row tile streams the panel from DRAM
                // (the later ones find it in L2); prefill's first tiles measured
                // no better for prefetching.
                let pf = stream && i0 == m0 && quant.is_none();
                if rows > TILE_M {
                    kernel::<2>(a, lda, b, steps, c, false, pf);
                    if tail_pairs > 0 {
                        kernel::<2>(a.add(steps * TILE_K), lda, tail.0.as_ptr(), 1, c, true, false);
                    }
                } else {
                    kernel::<1>(a, lda, b, steps, c, false, pf);
                    if tail_pairs > 0 {
                        kernel::<1>(a.add(steps * TILE_K), lda, tail.0.as_ptr(), 1, c, true, false);
                    }
                }
                // Through a buffer rather than `tilestored` straight into `out`,
                // which measured slower at m = 2048 (down 900 -> 780 GFLOP/s;
                // its rows of `out` are 4 KiB apart, likely one L1 set). A copy of
                // known length compiles to a few vector moves (memcpy calls per
                // row cost gate 15%).
                for r in 0..rows {
                    let dst = out.add((i0 + r) * n + p * NR);
                    let src = cbuf.0.as_ptr().add(r * NR);
                    if ncols == NR {
                        (dst as *mut [f32; NR]).write_unaligned(*(src as *const [f32; NR]));
                    } else {
                        std::ptr::copy_nonoverlapping(src, dst, ncols);
                    }
                }
                i0 += rows;
            }
        }
    }
}
