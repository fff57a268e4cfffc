//! The router's recent traffic (`/v1/traffic`), kept in memory for the console's
//! charts: every few seconds its own metrics are read, and what changed since the
//! last reading (throughput, TTFT and ITL percentiles, prefix-cache hit rate) is
//! kept with the queue depth and running sequences of the moment, for a window of
//! minutes. No Prometheus is needed to see it.

use serde::Serialize;
use sirocco_metrics::{HistogramSnapshot, RouterMetrics};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the metrics are read, and how long samples are kept.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);
pub(crate) const WINDOW: Duration = Duration::from_secs(15 * 60);

/// The samples of the window, oldest first.
pub(crate) struct Traffic {
    samples: Mutex<VecDeque<Sample>>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct Sample {
    pub(crate) time_unix_ms: u64,
    pub(crate) requests_per_s: f64,
    pub(crate) output_tokens_per_s: f64,
    pub(crate) prompt_tokens_per_s: f64,
    pub(crate) ttft_ms: Option<Percentiles>,
    pub(crate) itl_ms: Option<Percentiles>,
    pub(crate) queue_depth: usize,
    pub(crate) running: i64,
    pub(crate) prefix_cache_hit_rate: Option<f64>,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
}

/// `/v1/traffic`'s body.
#[derive(Debug, Serialize)]
pub(crate) struct TrafficView {
    pub(crate) interval_s: u64,
    pub(crate) window_s: u64,
    pub(crate) samples: Vec<Sample>,
}

/// The counters a sample is the difference of.
#[derive(Clone, Default)]
struct Reading {
    at: Option<Instant>,
    finished: u64,
    output_tokens: u64,
    prompt_tokens: u64,
    queried: u64,
    hit: u64,
    ttft: HistogramSnapshot,
    itl: HistogramSnapshot,
}

impl Reading {
    fn of(m: &RouterMetrics) -> Self {
        Reading {
            at: Some(Instant::now()),
            finished: m.request_duration.get_sample_count(),
            output_tokens: m.generated_tokens.get(),
            prompt_tokens: m.prompt_tokens.get(),
            queried: m.prefix_cache_queried_tokens.get(),
            hit: m.prefix_cache_hit_tokens.get(),
            ttft: HistogramSnapshot::of(&m.time_to_first_token),
            itl: HistogramSnapshot::of(&m.inter_token_latency),
        }
    }

    /// What happened between `earlier` and this reading, per second.
    fn since(&self, earlier: &Reading, queue_depth: usize, running: i64) -> Sample {
        let secs = match (self.at, earlier.at) {
            (Some(now), Some(then)) => now.duration_since(then).as_secs_f64().max(1e-3),
            _ => INTERVAL.as_secs_f64(),
        };
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        let percentiles = |now: &HistogramSnapshot, then: &HistogramSnapshot| {
            let q = |q| now.quantile_since(then, q).map(|s| s * 1e3);
            Some(Percentiles {
                p50: q(0.5)?,
                p90: q(0.9)?,
                p99: q(0.99)?,
            })
        };
        let queried = self.queried.saturating_sub(earlier.queried);
        Sample {
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            requests_per_s: rate(self.finished, earlier.finished),
            output_tokens_per_s: rate(self.output_tokens, earlier.output_tokens),
            prompt_tokens_per_s: rate(self.prompt_tokens, earlier.prompt_tokens),
            ttft_ms: percentiles(&self.ttft, &earlier.ttft),
            itl_ms: percentiles(&self.itl, &earlier.itl),
            queue_depth,
            running,
            prefix_cache_hit_rate: (queried > 0).then(|| self.hit.saturating_sub(earlier.hit) as f64 / queried as f64),
        }
    }
}

impl Traffic {
    pub(crate) fn new() -> Self {
        Traffic {
            samples: Mutex::default(),
        }
    }

    fn push(&self, s: Sample) {
        let mut samples = self.samples.lock().unwrap();
        samples.push_back(s);
        let keep = (WINDOW.as_secs() / INTERVAL.as_secs()) as usize;
        while samples.len() > keep {
            samples.pop_front();
        }
    }

    pub(crate) fn view(&self) -> TrafficView {
        TrafficView {
            interval_s: INTERVAL.as_secs(),
            window_s: WINDOW.as_secs(),
            samples: self.samples.lock().unwrap().iter().cloned().collect(),
        }
    }

    /// Reads `metrics` every [`INTERVAL`] (and `queue_depth` then) for as long as
    /// the router runs.
    pub(crate) fn record(
        self: Arc<Self>,
        metrics: Arc<RouterMetrics>,
        queue_depth: impl Fn() -> usize + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last = Reading::of(&metrics);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + INTERVAL, INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = Reading::of(&metrics);
                self.push(now.since(&last, queue_depth(), metrics.running_sequences.get()));
                last = now;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_what_changed_since_the_last_reading() {
        let m = RouterMetrics::new();
        let mut first = Reading::of(&m);
        first.at = Some(Instant::now() - Duration::from_secs(2));
        let empty = Reading::of(&m).since(&first, 0, 0);
        assert_eq!(
            (empty.ttft_ms, empty.itl_ms, empty.prefix_cache_hit_rate),
            (None, None, None)
        );
        m.generated_tokens.inc_by(100);
        m.prompt_tokens.inc_by(40);
        m.prefix_cache_queried_tokens.inc_by(40);
        m.prefix_cache_hit_tokens.inc_by(30);
        for _ in 0..4 {
            m.time_to_first_token.observe(0.2);
            m.request_duration.observe(1.0);
        }
        let s = Reading::of(&m).since(&first, 3, 2);
        // About two seconds passed.
        assert!((45.0..=50.0).contains(&s.output_tokens_per_s), "{s:?}");
        assert!((1.8..=2.0).contains(&s.requests_per_s), "{s:?}");
        assert_eq!(s.prefix_cache_hit_rate, Some(0.75));
        let ttft = s.ttft_ms.unwrap();
        assert!(ttft.p50 > 100.0 && ttft.p50 <= 250.0, "{ttft:?}");
        assert_eq!((s.queue_depth, s.running), (3, 2));
    }

    #[test]
    fn the_window_keeps_the_latest_samples() {
        let t = Traffic::new();
        let m = RouterMetrics::new();
        let r = Reading::of(&m);
        let keep = (WINDOW.as_secs() / INTERVAL.as_secs()) as usize;
        for i in 0..keep + 5 {
            t.push(r.since(&r, i, 0));
        }
        let v = t.view();
        assert_eq!(v.samples.len(), keep);
        assert_eq!(v.samples.first().unwrap().queue_depth, 5);
        assert_eq!(v.samples.last().unwrap().queue_depth, keep + 4);
    }
}
