//! Prometheus metrics: counters updated on the job path, gauges read at scrape time.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The worker's metrics registry.
pub struct Metrics {
    registry: Registry,
    /// Jobs finished, by handler and outcome.
    pub jobs: IntCounterVec,
    /// Error results, by `error_type`.
    pub errors: IntCounterVec,
    /// Take requests, by result (`jobs`, `empty`, `error`, `rate_limited`).
    pub takes: IntCounterVec,
    /// Heartbeats, by result.
    pub pings: IntCounterVec,
    /// Jobs admitted to run, by handler.
    pub admissions: IntCounterVec,
    /// Retry signals, by reason (`ledger`, `measured_memory`, `local_wait`).
    pub retry_signals: IntCounterVec,
    /// GPU out-of-memory failures inside handlers, by handler.
    pub ooms: IntCounterVec,
    /// Results the queue never got, by fate (`gone`, `replaced`, `rejected`, `dropped`, `spooled`).
    pub undelivered: IntCounterVec,
    /// Per-handler gauges (`active`, `limit`, `max_limit`, `queued`, `footprint_bytes`).
    pub handler: IntGaugeVec,
    /// The batchers' histograms and counters.
    pub batches: BatchMetrics,
    /// Per-device memory gauges, bytes (`total`, `free`, `budget`, `resident`, `reserved`,
    /// `others_used`, `allocated`, `allocator_reserved`).
    pub gpu: IntGaugeVec,
}

/// `metric`, registered in `registry` (names are fixed here, so a clash is a bug).
fn registered<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric =
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registered(registry, metric)
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registered(registry, metric)
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let r = Registry::new();
        Self {
            jobs: counter(
                &r,
                "runpod_worker_jobs_total",
                "Jobs finished, by handler and outcome",
                &["handler", "outcome"],
            ),
            errors: counter(
                &r,
                "runpod_worker_error_results_total",
                "Error results, by error_type",
                &["error_type"],
            ),
            takes: counter(
                &r,
                "runpod_worker_take_requests_total",
                "job-take requests, by result",
                &["result"],
            ),
            pings: counter(
                &r,
                "runpod_worker_pings_total",
                "Heartbeats sent, by result",
                &["result"],
            ),
            admissions: counter(
                &r,
                "runpod_worker_admissions_total",
                "Jobs admitted to run, by handler",
                &["handler"],
            ),
            retry_signals: counter(
                &r,
                "runpod_worker_retry_signals_total",
                "Retry signals, by reason",
                &["reason"],
            ),
            ooms: counter(
                &r,
                "runpod_worker_ooms_total",
                "GPU out-of-memory failures in handlers",
                &["handler"],
            ),
            undelivered: counter(
                &r,
                "runpod_worker_undelivered_results_total",
                "Results the queue did not take, by fate (gone, replaced, rejected, dropped, spooled)",
                &["fate"],
            ),
            handler: gauge(
                &r,
                "runpod_worker_handler",
                "Per-handler state, by handler and field",
                &["handler", "field"],
            ),
            gpu: gauge(
                &r,
                "runpod_worker_gpu_memory_bytes",
                "GPU memory, by device and kind",
                &["device", "kind"],
            ),
            batches: BatchMetrics::register(&r),
            registry: r,
        }
    }

    /// The Prometheus text exposition (set the gauges first).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The batchers' Prometheus metrics, labelled by model and device; registered once per worker.
#[derive(Clone)]
pub struct BatchMetrics {
    rows: HistogramVec,
    padded_tokens: HistogramVec,
    wait: HistogramVec,
    tokens: IntCounterVec,
    splits: IntCounterVec,
}

impl BatchMetrics {
    /// The metrics, registered in `registry`.
    pub fn register(registry: &Registry) -> Self {
        let r = registry;
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            let metric =
                HistogramVec::new(opts, &["model", "device"]).expect("valid metric definition");
            registered(r, metric)
        };
        let powers = |from: f64, count: usize| prometheus::exponential_buckets(from, 2.0, count);
        Self {
            rows: histogram(
                "runpod_worker_batch_rows",
                "Rows (sequences) per forward pass",
                powers(1.0, 10).expect("valid buckets"),
            ),
            padded_tokens: histogram(
                "runpod_worker_batch_padded_tokens",
                "Padded tokens (rows x the longest row) per forward pass",
                powers(16.0, 12).expect("valid buckets"),
            ),
            wait: histogram(
                "runpod_worker_batch_wait_seconds",
                "Time a sequence waited in the batcher before its forward pass",
                powers(0.0001, 16).expect("valid buckets"),
            ),
            tokens: counter(
                r,
                "runpod_worker_batch_tokens_total",
                "Tokens through the batchers' forward passes, by kind (real, padding)",
                &["model", "device", "kind"],
            ),
            splits: counter(
                r,
                "runpod_worker_batch_splits_total",
                "Batches split and run again in halves, by cause (oom, model_error)",
                &["model", "device", "cause"],
            ),
        }
    }

    pub(crate) fn batch(&self, labels: [&str; 2], rows: usize, padded: usize, real: usize) {
        self.rows.with_label_values(&labels).observe(rows as f64);
        self.padded_tokens
            .with_label_values(&labels)
            .observe(padded as f64);
        let [model, device] = labels;
        self.tokens
            .with_label_values(&[model, device, "real"])
            .inc_by(real as u64);
        self.tokens
            .with_label_values(&[model, device, "padding"])
            .inc_by(padded.saturating_sub(real) as u64);
    }

    pub(crate) fn waited(&self, labels: [&str; 2], waited: Duration) {
        self.wait
            .with_label_values(&labels)
            .observe(waited.as_secs_f64());
    }

    pub(crate) fn split(&self, labels: [&str; 2], cause: &str) {
        let [model, device] = labels;
        self.splits.with_label_values(&[model, device, cause]).inc();
    }
}
