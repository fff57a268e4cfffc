//! Element-wise steps of the forward pass that are worth a pass of their own on the
//! CPU: RMSNorm; splitting the fused q/k/v output into heads with RoPE applied to q
//! and k; SwiGLU's activation, read straight from the fused gate/up matmul's output;
//! and the exponential that softmaxes here and in sampling share. Small calls (a
//! decode step's rows) run on the calling thread: a fork costs more than they do.

use crate::parallel::{for_each_chunk_mut, SendPtr};

/// Rows of `width` values per task: enough to pay for handing a task out, so that a
/// decode step's few rows run on the calling thread.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// `Σ f(x[i])` in sixteen partial sums (a vector's lanes, not one serial chain of
/// adds), then the lanes and the tail.
#[inline]
pub fn sum_lanes(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `out[r][j] = silu(gate[r][j]) · up[r][j]` where row `r` of `gate_up` is `[gate;
/// up]`, each `width` long; `silu(g) = g / (1 + e^−g)`.
///
/// Panics if `gate_up` is not `out.len() * 2` long or `width` does not divide `out`.
pub fn swiglu(gate_up: &[f32], width: usize, out: &mut [f32]) {
    assert!(
        width > 0 && out.len().is_multiple_of(width),
        "out is not [rows, {width}]"
    );
    assert_eq!(gate_up.len(), 2 * out.len(), "gate_up is not [rows, 2 × {width}]");
    let per_task = rows_per_task(width);
    for_each_chunk_mut(out, per_task * width, |i, out| {
        let src = &gate_up[i * per_task * 2 * width..];
        for (r, o) in out.chunks_exact_mut(width).enumerate() {
            let (g, u) = src[r * 2 * width..(r + 1) * 2 * width].split_at(width);
            swiglu_row(g, u, o);
        }
    });
}

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) · weight` for each `weight.len()`-long
/// row `r` (Mistral's RMSNorm, in f32).
///
/// Panics if `weight` is empty, does not divide `x`, or `out` is not `x`'s length.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    assert!(width > 0 && x.len().is_multiple_of(width), "x is not [rows, {width}]");
    assert_eq!(out.len(), x.len(), "out is not x's shape");
    let per_task = rows_per_task(width);
    for_each_chunk_mut(out, per_task * width, |i, out| {
        let x = &x[i * per_task * width..];
        for (x, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            norm_row(x, weight, eps, o);
        }
    });
}

/// `sum = x + delta`, then `out` = [`rms_norm`] of `sum`: a residual connection and
/// the norm that follows it in one pass over the rows.
///
/// Panics if `weight` is empty or does not divide `x`, or the others are not `x`'s
/// length.
pub fn add_rms_norm(x: &[f32], delta: &[f32], weight: &[f32], eps: f32, sum: &mut [f32], out: &mut [f32]) {
    let width = weight.len();
    assert!(width > 0 && x.len().is_multiple_of(width), "x is not [rows, {width}]");
    assert!(
        delta.len() == x.len() && sum.len() == x.len() && out.len() == x.len(),
        "delta, sum or out is not x's shape"
    );
    let per_task = rows_per_task(width);
    let sums = SendPtr(sum.as_mut_ptr());
    for_each_chunk_mut(out, per_task * width, |i, out| {
        let at = i * per_task * width;
        // SAFETY: this task's rows of `sum` are those of its `out` chunk: inside
        // `sum` (checked to be as long as `out`), and no other task touches them.
        let sum = unsafe { std::slice::from_raw_parts_mut(sums.get().add(at), out.len()) };
        let rows = x[at..].chunks_exact(width).zip(delta[at..].chunks_exact(width));
        for ((s, o), (x, d)) in sum.chunks_exact_mut(width).zip(out.chunks_exact_mut(width)).zip(rows) {
            for ((s, &x), &d) in s.iter_mut().zip(x).zip(d) {
                *s = x + d;
            }
            norm_row(s, weight, eps, o);
        }
    });
}

fn norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let sum = sum_lanes(x, |v| v * v);
    let inv = 1.0 / (sum / weight.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// Rotary position embedding in the rotate-half form Mistral uses: value `j` of the
/// first half of a head pairs with value `j` of the second,
/// `(a, b) → (a·cos − b·sin, a·sin + b·cos)` with `cos[j]`, `sin[j]` of the token's
/// position.
#[inline]
fn rope_head(src: &[f32], cos: &[f32], sin: &[f32], dst: &mut [f32]) {
    let half = src.len() / 2;
    let (a, b) = src.split_at(half);
    let (da, db) = dst.split_at_mut(half);
    for j in 0..half {
        da[j] = a[j] * cos[j] - b[j] * sin[j];
        db[j] = a[j] * sin[j] + b[j] * cos[j];
    }
}

/// The shapes of a fused q/k/v projection's output: `heads` query heads and
/// `kv_heads` key and value heads of `head_dim` each, per row.
#[derive(Clone, Copy, Debug)]
pub struct QkvShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Splits `qkv` (`[n, (heads + 2·kv_heads) · head_dim]`, the fused projection's
/// output) into `q` `[n, heads, head_dim]` and `k`, `v` `[n, kv_heads, head_dim]`,
/// applying RoPE to q and k with row `r`'s `cos`/`sin` (`[n, head_dim / 2]`): one
/// pass over the projection instead of a copy per part and another per rotation.
///
/// Panics if the lengths do not match those shapes or `head_dim` is odd.
pub fn split_qkv_rope(
    qkv: &[f32],
    shape: QkvShape,
    cos: &[f32],
    sin: &[f32],
    q: &mut [f32],
    k: &mut [f32],
    v: &mut [f32],
) {
    let QkvShape {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    assert!(hd > 0 && hd.is_multiple_of(2), "head_dim {hd} is not even");
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let row = qw + 2 * kw;
    assert!(qkv.len().is_multiple_of(row), "qkv is not [n, {row}]");
    let n = qkv.len() / row;
    assert_eq!(cos.len(), n * hd / 2, "cos is not [{n}, {}]", hd / 2);
    assert_eq!(sin.len(), cos.len(), "sin is not cos's shape");
    assert!(
        q.len() == n * qw && k.len() == n * kw && v.len() == n * kw,
        "outputs are not [{n}, heads, {hd}]"
    );
    let (qp, kp, vp) = (
        SendPtr(q.as_mut_ptr()),
        SendPtr(k.as_mut_ptr()),
        SendPtr(v.as_mut_ptr()),
    );
    let per_task = rows_per_task(row);
    crate::parallel::for_each_index(n.div_ceil(per_task), |t| {
        for r in t * per_task..((t + 1) * per_task).min(n) {
            let src = &qkv[r * row..(r + 1) * row];
            let (c, s) = (&cos[r * hd / 2..(r + 1) * hd / 2], &sin[r * hd / 2..(r + 1) * hd / 2]);
            // SAFETY: each row index is handed out once, and row r's parts of q, k and v
            // (in bounds, checked above) are only written here.
            let (q, k, v) = unsafe {
                (
                    std::slice::from_raw_parts_mut(qp.get().add(r * qw), qw),
                    std::slice::from_raw_parts_mut(kp.get().add(r * kw), kw),
                    std::slice::from_raw_parts_mut(vp.get().add(r * kw), kw),
                )
            };
            for (src, dst) in src[..qw].chunks_exact(hd).zip(q.chunks_exact_mut(hd)) {
                rope_head(src, c, s, dst);
            }
            for (src, dst) in src[qw..qw + kw].chunks_exact(hd).zip(k.chunks_exact_mut(hd)) {
                rope_head(src, c, s, dst);
            }
            v.copy_from_slice(&src[qw + kw..]);
        }
    });
}

fn swiglu_row(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::avx512() {
        // SAFETY: the CPU has the features the copy is compiled for.
        return unsafe { swiglu_row_avx512(g, u, o) };
    }
    swiglu_body(g, u, o)
}

/// # Safety
/// The CPU has AVX-512F/BW/VL and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
unsafe fn swiglu_row_avx512(g: &[f32], u: &[f32], o: &mut [f32]) {
    swiglu_body(g, u, o)
}

#[inline(always)]
fn swiglu_body(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        // e^−|g| never overflows: silu(g) = g / (1 + e^−g) for g ≥ 0 and
        // g·e^g / (1 + e^g) below.
        let e = exp_nonpositive(-g.abs());
        let num = if g >= 0.0 { g } else { g * e };
        *o = num / (1.0 + e) * u;
    }
}

/// Where [`exp_nonpositive`] clamps its argument: `e^x` leaves the normal range
/// below it.
const EXP_MIN: f32 = -87.3;
/// ln 2 split in two so that `x − n·ln 2` is exact in f32.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for `e^r`, `|r| ≤ ln 2 / 2`: `1 + r + r²·p(r)` with these
/// coefficients of `p`, highest first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` for `x ≤ 0` within 2 ulp (Cephes' polynomial on `x − n·ln 2`), in plain
/// arithmetic that vectorises, unlike a call to `expf`. Below [`EXP_MIN`] it returns
/// `e^EXP_MIN`, which is 0 to any softmax.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer (for |t| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(EXP_MIN);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * r + c);
    let y = p * r * r + r + 1.0;
    // `t` shares ROUND's exponent, so its bits minus ROUND's are `n` as an integer:
    // `n as i32` would saturate lane by lane in scalar code.
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    y * f32::from_bits(biased << 23)
}

/// [`exp_nonpositive`] in 16 lanes, with its constants: Cephes' polynomial, then
/// `scalef` for the power of two (attention's softmaxes).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_nonpositive_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(y, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_matches_its_definition() {
        let width = 37;
        let rows = 600;
        let gate_up: Vec<f32> = (0..rows * 2 * width)
            .map(|i| ((i * 7919 % 2001) as f32 - 1000.0) * 0.03)
            .collect();
        let mut out = vec![0f32; rows * width];
        swiglu(&gate_up, width, &mut out);
        for r in 0..rows {
            for j in 0..width {
                let (g, u) = (
                    gate_up[r * 2 * width + j] as f64,
                    gate_up[r * 2 * width + width + j] as f64,
                );
                let want = g / (1.0 + (-g).exp()) * u;
                let got = out[r * width + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "row {r} col {j}: {got} vs {want}"
                );
            }
        }
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 % 2001) as f32 - 1000.0) * 0.003)
            .collect()
    }

    #[test]
    fn rms_norm_matches_its_definition() {
        // Widths off and on the 16-lane blocks; row counts below and above one task.
        for (width, rows) in [(1, 3), (37, 600), (64, 16), (1024, 40)] {
            let (x, w) = (values(rows * width, 1), values(width, 5));
            let mut out = vec![f32::NAN; x.len()];
            rms_norm(&x, &w, 1e-5, &mut out);
            for r in 0..rows {
                let row = &x[r * width..(r + 1) * width];
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
                let inv = 1.0 / (ms + 1e-5).sqrt();
                for j in 0..width {
                    let want = row[j] as f64 * inv * w[j] as f64;
                    let got = out[r * width + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
                        "width {width} row {r} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn add_rms_norm_is_the_sum_then_the_norm() {
        for (width, rows) in [(1, 3), (37, 600), (1024, 40)] {
            let (x, d, w) = (values(rows * width, 1), values(rows * width, 9), values(width, 5));
            let (mut sum, mut out) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
            add_rms_norm(&x, &d, &w, 1e-5, &mut sum, &mut out);
            let want_sum: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
            let mut want = vec![0f32; x.len()];
            rms_norm(&want_sum, &w, 1e-5, &mut want);
            // Bit for bit: the engine's results must not move when the add is fused.
            assert_eq!(sum, want_sum, "width {width}");
            assert_eq!(out, want, "width {width}");
        }
    }

    #[test]
    fn split_qkv_rope_rotates_q_and_k_and_copies_v() {
        for (heads, kv_heads, hd, n) in [(4, 2, 8, 3), (16, 4, 64, 40), (3, 3, 2, 1)] {
            let shape = QkvShape {
                heads,
                kv_heads,
                head_dim: hd,
            };
            let row = (heads + 2 * kv_heads) * hd;
            let qkv = values(n * row, 3);
            let angle = |r: usize, j: usize| (r as f64 + 1.0) * 0.37 / (1.0 + j as f64);
            let cos: Vec<f32> = (0..n * hd / 2)
                .map(|i| angle(i / (hd / 2), i % (hd / 2)).cos() as f32)
                .collect();
            let sin: Vec<f32> = (0..n * hd / 2)
                .map(|i| angle(i / (hd / 2), i % (hd / 2)).sin() as f32)
                .collect();
            let (mut q, mut k, mut v) = (
                vec![f32::NAN; n * heads * hd],
                vec![f32::NAN; n * kv_heads * hd],
                vec![0f32; n * kv_heads * hd],
            );
            split_qkv_rope(&qkv, shape, &cos, &sin, &mut q, &mut k, &mut v);
            let half = hd / 2;
            for r in 0..n {
                let src = &qkv[r * row..(r + 1) * row];
                let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
                // Query heads, then key heads, as they lie in the row.
                for (h, got) in q[r * heads * hd..(r + 1) * heads * hd]
                    .chunks(hd)
                    .chain(k[r * kv_heads * hd..(r + 1) * kv_heads * hd].chunks(hd))
                    .enumerate()
                {
                    let x = &src[h * hd..(h + 1) * hd];
                    for j in 0..half {
                        let (a, b) = (x[j] as f64, x[j + half] as f64);
                        let (cj, sj) = (c[j] as f64, s[j] as f64);
                        let want = [a * cj - b * sj, a * sj + b * cj];
                        for (g, w) in [got[j], got[j + half]].iter().zip(want) {
                            assert!(
                                (*g as f64 - w).abs() <= 1e-6,
                                "n{n} row {r} head {h} pair {j}: {g} vs {w}"
                            );
                        }
                    }
                }
                assert_eq!(
                    &v[r * kv_heads * hd..(r + 1) * kv_heads * hd],
                    &src[(heads + kv_heads) * hd..]
                );
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulp <= 2, "e^{x}: {got} vs {want} ({ulp} ulp)");
            x += 0.013_7;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e4) < 1e-37);
    }
}
