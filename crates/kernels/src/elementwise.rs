//! Element-wise steps of the forward pass that are worth a pass of their own on the
//! CPU: SwiGLU's activation, read straight from the fused gate/up matmul's output;
//! and the exponential that softmaxes here and in sampling share.

use crate::parallel::for_each_chunk_mut;

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
    let rows = out.len() / width;
    // Enough rows per task to pay for handing it out.
    let per_task = (16_384 / width).clamp(1, rows.max(1));
    for_each_chunk_mut(out, per_task * width, |i, out| {
        let src = &gate_up[i * per_task * 2 * width..];
        for (r, o) in out.chunks_exact_mut(width).enumerate() {
            let (g, u) = src[r * 2 * width..(r + 1) * 2 * width].split_at(width);
            swiglu_row(g, u, o);
        }
    });
}

fn swiglu_row(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::attention::avx512() {
        // SAFETY: the CPU has the features the copy is compiled for.
        return unsafe { swiglu_row_avx512(g, u, o) };
    }
    swiglu_body(g, u, o)
}

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
pub(crate) const EXP_MIN: f32 = -87.3;
/// ln 2 split in two so that `x − n·ln 2` is exact in f32.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for `e^r`, `|r| ≤ ln 2 / 2`: `1 + r + r²·p(r)` with these
/// coefficients of `p`, highest first.
pub(crate) const EXP_POLY: [f32; 6] = [
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
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * r + c);
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
