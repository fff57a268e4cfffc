//! Element-wise steps of the forward pass that are worth a pass of their own on the
//! CPU: SwiGLU's activation, read straight from the fused gate/up matmul's output.

use crate::attention::exp_nonpositive;
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
}
