//! Numerically stable log-softmax and top-n log-probabilities, shared by the sampler and the
//! `logprobs` / `top_logprobs` APIs.

use sirocco_kernels::elementwise::{exp_nonpositive, sum_lanes};
use std::cmp::Ordering;

/// NaN carries no information about a token, so it is treated as "impossible".
pub(crate) fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Orders `(id, value)` pairs best first: higher value, then lower id, so ties are deterministic.
pub(crate) fn best_first(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The largest value, NaN counted as -inf (-inf when empty). Sixteen running maxima
/// (a vector's lanes) instead of one serial chain: this runs over the vocabulary for
/// every sampled token.
pub(crate) fn max_of(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = values.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            // A NaN compares false, so it never replaces a lane.
            *l = if v > *l { v } else { *l };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Index of the largest value, lowest index on ties, NaN counted as -inf; `None` when empty.
#[cfg(test)]
pub(crate) fn argmax(values: &[f32]) -> Option<usize> {
    (!values.is_empty()).then(|| first_index_of(values, max_of(values)))
}

/// Index of the first value equal to `max` (NaN counted as -inf), which must be
/// [`max_of`]`(values)` of non-empty `values`.
fn first_index_of(values: &[f32], max: f32) -> usize {
    // The first 16-value block holding the maximum, found without a branch per value.
    let block = values
        .chunks(16)
        .position(|c| c.iter().fold(false, |hit, &v| hit | (sanitize(v) == max)))
        .expect("the maximum is one of the values");
    let at = values[block * 16..].iter().position(|&v| sanitize(v) == max);
    block * 16 + at.expect("the block holds the maximum")
}

/// Greedy choice: `(argmax, log_softmax(values)[argmax])`, lowest index on ties, NaN
/// counted as -inf; `None` when empty. The maximum is found once for both.
pub(crate) fn argmax_with_log_prob(values: &[f32]) -> Option<(usize, f32)> {
    if values.is_empty() {
        return None;
    }
    let max = max_of(values);
    let i = first_index_of(values, max);
    Some((i, log_prob_at(values, i, max)))
}

/// `log(softmax(logits))`, computed stably (max-subtracted, summed in f64).
///
/// NaN is treated as -inf. If some logits are +inf they share all the probability equally. If
/// every logit is -inf (or NaN) there is no distribution and every entry is -inf.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = max_of(logits);
    if max == f32::NEG_INFINITY {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    if max == f32::INFINITY {
        let n_inf = logits.iter().filter(|&&x| x == f32::INFINITY).count();
        let lp = -(n_inf as f32).ln();
        return logits
            .iter()
            .map(|&x| if x == f32::INFINITY { lp } else { f32::NEG_INFINITY })
            .collect();
    }
    let log_sum = log_sum_exp_shifted(logits, max);
    logits.iter().map(|&x| shifted_log_prob(x, max, log_sum)).collect()
}

/// `ln Σ exp(x - max)` for a finite `max` that no logit exceeds. This runs over the
/// whole vocabulary for every sampled token, so the exponentials are a polynomial
/// the compiler vectorises (within 2 ulp of `expf`), summed in f32 lanes over
/// blocks of [`BLOCK`] and the blocks in f64.
fn log_sum_exp_shifted(logits: &[f32], max: f32) -> f64 {
    const BLOCK: usize = 512;
    logits
        .chunks(BLOCK)
        .map(|block| f64::from(sum_lanes(block, |x| exp_nonpositive(sanitize(x) - max))))
        .sum::<f64>()
        .ln()
}

fn shifted_log_prob(x: f32, max: f32, log_sum: f64) -> f32 {
    (f64::from(sanitize(x) - max) - log_sum) as f32
}

/// `log_softmax(logits)[i]` without the vector, `max` being [`max_of`]`(logits)`: what
/// greedy sampling reports.
fn log_prob_at(logits: &[f32], i: usize, max: f32) -> f32 {
    if max.is_infinite() {
        return log_softmax(logits)[i];
    }
    shifted_log_prob(logits[i], max, log_sum_exp_shifted(logits, max))
}

/// The `n` most likely `(token, logprob)` pairs under `log_softmax(logits)`, highest first (lower
/// id first on ties). Returns fewer than `n` pairs only when the vocabulary is smaller.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let mut pairs: Vec<(u32, f32)> = log_softmax(logits)
        .into_iter()
        .enumerate()
        .map(|(i, lp)| (i as u32, lp))
        .collect();
    if n < pairs.len() {
        pairs.select_nth_unstable_by(n - 1, best_first);
        pairs.truncate(n);
    }
    pairs.sort_unstable_by(best_first);
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn log_softmax_matches_definition() {
        let logits = [1.0f32, 2.0, 3.0, -1.0];
        let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        let lp = log_softmax(&logits);
        for (x, l) in logits.iter().zip(&lp) {
            assert!(close(*l, (f64::from(*x) - z.ln()) as f32));
        }
        let total: f64 = lp.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn log_softmax_is_stable_for_huge_logits() {
        let lp = log_softmax(&[1e30, 1e30 - 1e24, -1e30]);
        assert!(close(lp[0], 0.0));
        assert!(lp[1] < -1e20 && lp[2] < -1e29);
        let lp = log_softmax(&[1000.0, 1000.0]);
        assert!(close(lp[0], -(2.0f32).ln()) && close(lp[1], -(2.0f32).ln()));
    }

    #[test]
    fn log_softmax_edge_cases() {
        assert!(log_softmax(&[]).is_empty());
        let lp = log_softmax(&[f32::NAN, 0.0, f32::NEG_INFINITY]);
        assert_eq!(lp[0], f32::NEG_INFINITY);
        assert!(close(lp[1], 0.0));
        assert_eq!(lp[2], f32::NEG_INFINITY);
        let lp = log_softmax(&[f32::NAN, f32::NEG_INFINITY]);
        assert!(lp.iter().all(|&l| l == f32::NEG_INFINITY));
        let lp = log_softmax(&[f32::INFINITY, 5.0, f32::INFINITY]);
        assert!(close(lp[0], -(2.0f32).ln()) && close(lp[2], -(2.0f32).ln()));
        assert_eq!(lp[1], f32::NEG_INFINITY);
    }

    #[test]
    fn top_logprobs_sorted_with_ties_by_id() {
        let logits = [0.5f32, 3.0, f32::NAN, 3.0, -2.0, 1.0];
        let lp = log_softmax(&logits);
        let top = top_logprobs(&logits, 3);
        assert_eq!(top, vec![(1, lp[1]), (3, lp[3]), (5, lp[5])]);
        let all = top_logprobs(&logits, 100);
        let ids: Vec<u32> = all.iter().map(|p| p.0).collect();
        assert_eq!(ids, vec![1, 3, 5, 0, 4, 2]);
        assert!(top_logprobs(&logits, 0).is_empty());
        assert!(top_logprobs(&[], 5).is_empty());
    }

    #[test]
    fn argmax_lowest_index_on_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -5.0, f32::NAN]), Some(1));
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), Some(0), "all-NaN picks the first");
        assert_eq!(argmax(&[]), None);
        // Past the first block of sixteen, and ties split across blocks.
        let mut v: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        v[40] = 9.0;
        v[73] = 9.0;
        v[3] = f32::NAN;
        assert_eq!(argmax(&v), Some(40));
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY]), Some(0));
    }

    #[test]
    fn the_greedy_choice_reports_its_log_softmax() {
        let mut v: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.5).collect();
        v[40] = 9.0;
        v[73] = 9.0;
        v[3] = f32::NAN;
        let (i, lp) = argmax_with_log_prob(&v).unwrap();
        assert_eq!(i, 40);
        assert!((lp - log_softmax(&v)[40]).abs() < 1e-6, "{lp}");
        assert_eq!(
            argmax_with_log_prob(&[1.0, f32::INFINITY, f32::INFINITY]),
            Some((1, -(2f32.ln())))
        );
        assert_eq!(
            argmax_with_log_prob(&[f32::NAN, f32::NAN]),
            Some((0, f32::NEG_INFINITY))
        );
        assert_eq!(argmax_with_log_prob(&[]), None);
    }

    #[test]
    fn max_of_skips_nan_in_every_lane_and_the_tail() {
        for len in [0usize, 1, 15, 16, 17, 50] {
            let v: Vec<f32> = (0..len)
                .map(|i| {
                    if i % 3 == 0 {
                        f32::NAN
                    } else {
                        (i * 37 % 11) as f32 - 5.0
                    }
                })
                .collect();
            let want = v
                .iter()
                .copied()
                .filter(|x| !x.is_nan())
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&v), want, "{len} values");
        }
        assert_eq!(max_of(&[f32::NAN; 20]), f32::NEG_INFINITY);
        assert_eq!(max_of(&[1.0, f32::INFINITY, 2.0]), f32::INFINITY);
    }
}
