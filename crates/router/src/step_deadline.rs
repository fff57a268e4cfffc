//! How long a replica's step may run before the replica counts as hung. The bound
//! follows the replica's own recent step times, so a rank that stalls without
//! leaving the membership (a stuck collective, a paused process in a cluster without
//! etcd) is found within seconds instead of at the fixed `--step-timeout`.

use std::collections::VecDeque;
use std::time::Duration;

/// Steps whose pace is remembered.
const WINDOW: usize = 64;
/// What a step costs beyond its tokens, in tokens: launching it, the collective's
/// round trips, sampling.
const OVERHEAD_TOKENS: f64 = 8.0;
/// How many times slower than the slowest recent pace a step may be. Prefill is
/// cheaper per token than decode and most recent steps decode, so scaling a decode
/// pace to a prefill chunk already errs long; the slack covers a busy machine and a
/// growing context.
const SLACK: f64 = 20.0;

pub(crate) struct StepDeadline {
    /// Seconds per cost unit of the most recent steps.
    recent: VecDeque<f64>,
    floor: Duration,
    ceiling: Duration,
}

impl StepDeadline {
    /// Deadlines stay within `floor..=ceiling`; before any step was seen, `ceiling`.
    pub(crate) fn new(floor: Duration, ceiling: Duration) -> Self {
        StepDeadline {
            recent: VecDeque::with_capacity(WINDOW),
            floor: floor.min(ceiling),
            ceiling,
        }
    }

    fn cost(tokens: usize) -> f64 {
        tokens as f64 + OVERHEAD_TOKENS
    }

    /// Records that a step of `tokens` tokens took `took`.
    pub(crate) fn observe(&mut self, tokens: usize, took: Duration) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(took.as_secs_f64() / Self::cost(tokens));
    }

    /// The longest a step of `tokens` tokens may take.
    pub(crate) fn deadline(&self, tokens: usize) -> Duration {
        let Some(pace) = self.recent.iter().copied().reduce(f64::max) else {
            return self.ceiling;
        };
        let d = pace * Self::cost(tokens) * SLACK;
        Duration::try_from_secs_f64(d)
            .unwrap_or(self.ceiling)
            .clamp(self.floor, self.ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_secs(2);
    const CEILING: Duration = Duration::from_secs(120);

    #[test]
    fn unknown_pace_allows_the_ceiling() {
        assert_eq!(StepDeadline::new(FLOOR, CEILING).deadline(512), CEILING);
    }

    #[test]
    fn a_fast_replica_gets_the_floor_and_long_chunks_scale() {
        let mut d = StepDeadline::new(FLOOR, CEILING);
        for _ in 0..10 {
            d.observe(16, Duration::from_millis(24)); // 1 ms per cost unit
        }
        assert_eq!(d.deadline(1), FLOOR);
        // 512 + 8 units at 1 ms, 20 times over.
        let long = d.deadline(512);
        assert!((long.as_secs_f64() - 10.4).abs() < 1e-6, "{long:?}");
    }

    #[test]
    fn the_slowest_recent_pace_counts_and_old_ones_age_out() {
        let mut d = StepDeadline::new(Duration::ZERO, CEILING);
        d.observe(0, Duration::from_millis(800)); // 100 ms per unit
        for _ in 0..WINDOW - 1 {
            d.observe(8, Duration::from_millis(16));
        }
        assert!((d.deadline(0).as_secs_f64() - 16.0).abs() < 1e-6);
        d.observe(8, Duration::from_millis(16));
        assert!((d.deadline(0).as_secs_f64() - 0.16).abs() < 1e-6);
    }

    #[test]
    fn a_floor_above_the_ceiling_yields_to_it() {
        let mut d = StepDeadline::new(Duration::from_secs(9), Duration::from_secs(3));
        d.observe(1, Duration::from_millis(1));
        assert_eq!(d.deadline(1), Duration::from_secs(3));
    }
}
