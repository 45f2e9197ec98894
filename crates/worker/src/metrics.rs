//! Prometheus metrics: counters updated on the job path, gauges read at scrape time.

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

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
    pub batches: crate::model::BatchMetrics,
    /// Per-device memory gauges, bytes (`total`, `free`, `budget`, `resident`, `reserved`,
    /// `others_used`, `allocated`, `allocator_reserved`).
    pub gpu: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric =
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
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
            batches: crate::model::BatchMetrics::register(&r),
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
