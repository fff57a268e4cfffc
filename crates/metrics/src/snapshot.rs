//! A histogram read at one moment, and the quantiles of what it observed between
//! two such readings, interpolated within buckets as Prometheus'
//! `histogram_quantile` does: what the router's in-memory traffic charts draw.

use prometheus::core::Metric;
use prometheus::Histogram;

/// A histogram's cumulative bucket counts (finite upper bounds, ascending) and
/// its total count, at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
}

impl HistogramSnapshot {
    pub fn of(h: &Histogram) -> Self {
        let m = h.metric();
        let p = m.get_histogram();
        HistogramSnapshot {
            buckets: p
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect(),
            count: p.get_sample_count(),
        }
    }

    /// The `q` quantile (0..=1) of the observations made after `earlier` was read;
    /// `None` when there were none. Past the last finite bound it is that bound.
    pub fn quantile_since(&self, earlier: &HistogramSnapshot, q: f64) -> Option<f64> {
        let total = self.count.checked_sub(earlier.count).filter(|&n| n > 0)?;
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut lower = 0.0;
        let mut below = 0u64;
        for (i, &(upper, cum)) in self.buckets.iter().enumerate() {
            let before = earlier.buckets.get(i).map_or(0, |b| b.1);
            let upto = cum.saturating_sub(before);
            if upto as f64 >= rank && upto > below {
                let within = (rank - below as f64) / (upto - below) as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            lower = upper;
            below = upto;
        }
        Some(lower)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::HistogramOpts;

    #[test]
    fn quantiles_come_from_the_observations_between_two_readings() {
        let h = Histogram::with_opts(HistogramOpts::new("t", "t").buckets(vec![1.0, 2.0, 4.0])).unwrap();
        let empty = HistogramSnapshot::of(&h);
        assert_eq!(HistogramSnapshot::of(&h).quantile_since(&empty, 0.5), None);
        for _ in 0..10 {
            h.observe(0.5);
        }
        let first = HistogramSnapshot::of(&h);
        assert_eq!(first.count, 10);
        // All ten fell in [0, 1]: the median interpolates to the bucket's middle.
        assert_eq!(first.quantile_since(&empty, 0.5), Some(0.5));
        for _ in 0..4 {
            h.observe(3.0);
        }
        let second = HistogramSnapshot::of(&h);
        // Since `first`, only the four in (2, 4] count.
        assert_eq!(second.quantile_since(&first, 0.5), Some(3.0));
        assert_eq!(second.quantile_since(&first, 1.0), Some(4.0));
        h.observe(100.0);
        let third = HistogramSnapshot::of(&h);
        assert_eq!(third.quantile_since(&second, 0.99), Some(4.0), "past the last bound");
        assert_eq!(third.quantile_since(&third, 0.5), None);
    }
}
