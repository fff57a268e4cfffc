//! Prometheus metrics: what the router ([`RouterMetrics`]) and each shard
//! ([`ShardMetrics`]) export, named `sirocco_*` with units in the name, plus build
//! info and process metrics, and a small HTTP server for `/metrics`.
//!
//! [`HistogramSnapshot`] reads a histogram for in-memory charts.
//!
//! Latency buckets span a millisecond to a minute, so the same histograms serve a
//! 2-core CPU box and an H100.

mod snapshot;

pub use snapshot::HistogramSnapshot;

use anyhow::Context;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::net::SocketAddr;
use std::time::Duration;

/// The Prometheus types the metric structs expose.
pub mod prometheus_reexport {
    pub use prometheus::{Histogram, HistogramVec, IntCounter, IntGauge};
}

/// Seconds, from 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0,
];

/// Sub-millisecond work on the router's own path (structured output), in seconds.
pub const MASK_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Token counts, from 1 to 32768.
pub fn token_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1.0, 2.0, 16).expect("valid buckets")
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid gauge");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn int_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid counter");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

/// `sirocco_build_info` and the process collector.
fn register_common(r: &Registry) {
    let features = if cfg!(feature = "cuda") { "cuda" } else { "cpu" };
    let info = IntGauge::with_opts(
        Opts::new(
            "sirocco_build_info",
            "Build of this process: version, git hash, features.",
        )
        .const_label("version", env!("CARGO_PKG_VERSION"))
        .const_label("git_hash", env!("SIROCCO_GIT_HASH"))
        .const_label("features", features),
    )
    .expect("valid gauge");
    info.set(1);
    r.register(Box::new(info)).expect("unique metric");
    #[cfg(target_os = "linux")]
    r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
        .expect("unique metric");
    r.register(Box::new(CpuTime::new())).expect("unique metric");
}

/// `sirocco_process_cpu_seconds_total`: the process's user and system CPU time to the
/// microsecond, read when scraped (the process collector's counter moves in whole
/// seconds, too coarse to divide by a run's tokens).
struct CpuTime {
    counter: prometheus::Counter,
}

impl CpuTime {
    fn new() -> Self {
        CpuTime {
            counter: prometheus::Counter::new(
                "sirocco_process_cpu_seconds_total",
                "User and system CPU time of this process, in seconds (microsecond resolution).",
            )
            .expect("valid counter"),
        }
    }

    /// The process's CPU time so far.
    fn now() -> f64 {
        let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one rusage into the pointer it is given, which
        // points at one; RUSAGE_SELF is a valid `who`.
        let u = unsafe {
            if libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) != 0 {
                return 0.0;
            }
            u.assume_init()
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        secs(u.ru_utime) + secs(u.ru_stime)
    }
}

impl prometheus::core::Collector for CpuTime {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.counter.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let delta = Self::now() - self.counter.get();
        if delta > 0.0 {
            self.counter.inc_by(delta);
        }
        self.counter.collect()
    }
}

/// The router's metrics.
#[derive(Clone)]
pub struct RouterMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub queue_depth: IntGauge,
    pub running_sequences: IntGauge,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_duration: Histogram,
    pub queue_time: Histogram,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub request_prompt_tokens: Histogram,
    pub request_generated_tokens: Histogram,
    pub batch_size: Histogram,
    pub step_tokens: Histogram,
    pub ready_replicas: IntGauge,
    pub replica_failures: IntCounter,
    pub readmitted_requests: IntCounter,
    /// Running requests that gave their place to more urgent ones (to resume later).
    pub preempted_requests: IntCounter,
    /// Prompt tokens of requests looked up in the prefix cache, and of those, the
    /// ones found cached: their ratio is the hit rate.
    pub prefix_cache_queried_tokens: IntCounter,
    pub prefix_cache_hit_tokens: IntCounter,
    /// Input tokens the replicas computed in prefill chunks (what the prefix cache
    /// and forks spared is not counted).
    pub prefill_tokens: IntCounter,
    /// Samples of a request of several that started as a fork of a sibling's
    /// prefilled prompt, and the prompt tokens they shared that way.
    pub forked_samples: IntCounter,
    pub forked_prompt_tokens: IntCounter,
    /// Structured output: requests accepted with a constraint, by kind; time
    /// compiling constraints; time computing the allowed tokens of a step's
    /// constrained sequences (what constraints add to each step).
    pub structured_requests: IntCounterVec,
    pub structured_compile: Histogram,
    pub structured_mask: Histogram,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RouterMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        register_common(&r);
        let requests = IntCounterVec::new(
            Opts::new(
                "sirocco_requests_total",
                "Requests ended, by outcome and finish reason.",
            ),
            &["outcome", "finish_reason"],
        )
        .expect("valid counter");
        r.register(Box::new(requests.clone())).expect("unique metric");
        let structured_requests = IntCounterVec::new(
            Opts::new(
                "sirocco_structured_requests_total",
                "Requests accepted with a structured-output constraint, by kind.",
            ),
            &["kind"],
        )
        .expect("valid counter");
        r.register(Box::new(structured_requests.clone()))
            .expect("unique metric");
        RouterMetrics {
            requests,
            structured_requests,
            structured_compile: histogram(
                &r,
                "sirocco_structured_compile_seconds",
                "Compiling a request's constraint (JSON Schema, regex, choice, grammar).",
                MASK_BUCKETS.to_vec(),
            ),
            structured_mask: histogram(
                &r,
                "sirocco_structured_mask_seconds",
                "Computing the allowed tokens of one step's constrained sequences.",
                MASK_BUCKETS.to_vec(),
            ),
            queue_depth: int_gauge(&r, "sirocco_queue_depth", "Requests waiting for a replica."),
            running_sequences: int_gauge(&r, "sirocco_running_sequences", "Sequences in running batches."),
            time_to_first_token: histogram(
                &r,
                "sirocco_time_to_first_token_seconds",
                "From request arrival to its first token.",
                LATENCY_BUCKETS.to_vec(),
            ),
            inter_token_latency: histogram(
                &r,
                "sirocco_inter_token_latency_seconds",
                "Between consecutive tokens of a request.",
                LATENCY_BUCKETS.to_vec(),
            ),
            request_duration: histogram(
                &r,
                "sirocco_request_duration_seconds",
                "From request arrival to its last event.",
                LATENCY_BUCKETS.to_vec(),
            ),
            queue_time: histogram(
                &r,
                "sirocco_queue_time_seconds",
                "From request arrival to its admission into a batch.",
                LATENCY_BUCKETS.to_vec(),
            ),
            prompt_tokens: int_counter(&r, "sirocco_prompt_tokens_total", "Prompt tokens of admitted requests."),
            prefix_cache_queried_tokens: int_counter(
                &r,
                "sirocco_prefix_cache_queried_tokens_total",
                "Input tokens of sequences looked up in the prefix cache.",
            ),
            prefix_cache_hit_tokens: int_counter(
                &r,
                "sirocco_prefix_cache_hit_tokens_total",
                "Input tokens whose KV the prefix cache held (not prefilled).",
            ),
            prefill_tokens: int_counter(
                &r,
                "sirocco_prefill_tokens_total",
                "Input tokens computed in prefill chunks (not those the prefix cache or a fork supplied).",
            ),
            forked_samples: int_counter(
                &r,
                "sirocco_forked_samples_total",
                "Samples that started from a sibling sample's prefilled prompt (num_samples, n, best_of).",
            ),
            forked_prompt_tokens: int_counter(
                &r,
                "sirocco_forked_prompt_tokens_total",
                "Prompt tokens samples shared from a sibling's prefill instead of computing them.",
            ),
            generated_tokens: int_counter(&r, "sirocco_generated_tokens_total", "Tokens sent to clients."),
            request_prompt_tokens: histogram(
                &r,
                "sirocco_request_prompt_tokens",
                "Prompt tokens per request.",
                token_buckets(),
            ),
            request_generated_tokens: histogram(
                &r,
                "sirocco_request_generated_tokens",
                "Generated tokens per finished request.",
                token_buckets(),
            ),
            batch_size: histogram(&r, "sirocco_batch_size", "Sequences per step.", token_buckets()),
            step_tokens: histogram(
                &r,
                "sirocco_step_tokens",
                "Tokens (prefill and decode) per step.",
                token_buckets(),
            ),
            ready_replicas: int_gauge(
                &r,
                "sirocco_ready_replicas",
                "Replicas that completed a forward step and collective recently.",
            ),
            replica_failures: int_counter(
                &r,
                "sirocco_replica_failures_total",
                "Replicas taken out after a failure.",
            ),
            readmitted_requests: int_counter(
                &r,
                "sirocco_readmitted_requests_total",
                "Requests re-queued to resume on another replica.",
            ),
            preempted_requests: int_counter(
                &r,
                "sirocco_preempted_requests_total",
                "Running requests preempted for more urgent ones (their KV freed; they resume from their stream).",
            ),
            registry: r,
        }
    }

    pub fn request_ended(&self, outcome: &str, finish_reason: &str) {
        self.requests.with_label_values(&[outcome, finish_reason]).inc();
    }
}

/// One shard's metrics; every series carries its replica and rank.
#[derive(Clone)]
pub struct ShardMetrics {
    pub registry: Registry,
    pub step_duration: HistogramVec,
    pub allreduce_duration: Histogram,
    pub kv_tokens_used: IntGauge,
    pub kv_tokens_capacity: IntGauge,
    pub kv_blocks_used: IntGauge,
    pub kv_wrapped_sequences: IntGauge,
    pub prefix_cache_blocks: IntGauge,
    pub prefix_cache_evictions: IntCounter,
    pub sequences: IntGauge,
    pub model_load_seconds: Gauge,
}

impl ShardMetrics {
    pub fn new(replica: &str, rank: usize) -> Self {
        let labels = [
            ("replica".to_string(), replica.to_string()),
            ("rank".to_string(), rank.to_string()),
        ]
        .into_iter()
        .collect();
        let r = Registry::new_custom(None, Some(labels)).expect("valid registry");
        register_common(&r);
        let step_duration = HistogramVec::new(
            HistogramOpts::new("sirocco_shard_step_duration_seconds", "Forward steps, by kind.")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["kind"],
        )
        .expect("valid histogram");
        r.register(Box::new(step_duration.clone())).expect("unique metric");
        let model_load_seconds =
            Gauge::new("sirocco_shard_model_load_seconds", "Time to load this shard's slice.").expect("valid gauge");
        r.register(Box::new(model_load_seconds.clone())).expect("unique metric");
        ShardMetrics {
            step_duration,
            allreduce_duration: histogram(
                &r,
                "sirocco_shard_allreduce_duration_seconds",
                "All-reduce calls of the collective.",
                vec![
                    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
                ],
            ),
            kv_tokens_used: int_gauge(&r, "sirocco_shard_kv_tokens_used", "Positions held in the KV cache."),
            kv_tokens_capacity: int_gauge(
                &r,
                "sirocco_shard_kv_tokens_capacity",
                "Positions the KV cache can hold.",
            ),
            kv_blocks_used: int_gauge(&r, "sirocco_shard_kv_blocks_used", "KV cache blocks allocated."),
            kv_wrapped_sequences: int_gauge(
                &r,
                "sirocco_shard_kv_wrapped_sequences",
                "Sequences longer than the sliding window (their cache has wrapped).",
            ),
            prefix_cache_blocks: int_gauge(
                &r,
                "sirocco_shard_prefix_cache_blocks",
                "Full KV blocks in the prefix cache (shared, or free to evict).",
            ),
            prefix_cache_evictions: int_counter(
                &r,
                "sirocco_shard_prefix_cache_evictions_total",
                "Cached KV blocks evicted to make room.",
            ),
            sequences: int_gauge(&r, "sirocco_shard_sequences", "Sequences holding KV cache."),
            model_load_seconds,
            registry: r,
        }
    }
}

/// The text exposition of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("exposition is UTF-8")
}

/// An axum route serving `registry` at `/metrics`.
pub fn metrics_route(registry: Registry) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let r = registry.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    encode(&r),
                )
            }
        }),
    )
}

/// Limits of an HTTP server's connections.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// A client must send a request's whole head (request line and headers) within
    /// this time after the connection opens or the previous response; else the
    /// connection is closed.
    pub header_read_timeout: Duration,
    /// A larger request head is answered 431 Request Header Fields Too Large.
    pub max_header_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
        }
    }
}

/// Serves `app` on `addr` (HTTP/1.1) with the default [`HttpLimits`] until `shutdown`
/// resolves.
pub async fn serve(
    addr: SocketAddr,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(addr, app, HttpLimits::default(), shutdown).await
}

/// Serves `app` on `addr` (HTTP/1.1) until `shutdown` resolves, then lets open
/// connections finish.
pub async fn serve_with(
    addr: SocketAddr,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "HTTP serving");
    // axum::serve sets no timer, so hyper enforces no header read timeout, and it
    // cannot bound the size of a request head.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // No Nagle: SSE token events must not wait for the client's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
