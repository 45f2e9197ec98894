//! Prometheus metrics: counters updated on the job path, gauges read at scrape time.

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use serde_json::Value;

use crate::admission::HandlerSnapshot;
use crate::gpu::GpuSnapshot;
use crate::outcome::JobError;

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
    handler_active: IntGaugeVec,
    handler_limit: IntGaugeVec,
    handler_queued: IntGaugeVec,
    gpu_bytes: IntGaugeVec,
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
            handler_active: gauge(
                &r,
                "runpod_worker_handler_active",
                "Jobs running, by handler",
                &["handler"],
            ),
            handler_limit: gauge(
                &r,
                "runpod_worker_handler_limit",
                "Concurrency limit, by handler",
                &["handler"],
            ),
            handler_queued: gauge(
                &r,
                "runpod_worker_handler_queued",
                "Taken jobs waiting for their handler",
                &["handler"],
            ),
            gpu_bytes: gauge(
                &r,
                "runpod_worker_gpu_memory_bytes",
                "GPU memory, by kind (total, free)",
                &["kind"],
            ),
            registry: r,
        }
    }

    /// Counts a finished job.
    pub fn job_finished(&self, handler: &str, result: &Result<Value, JobError>) {
        let outcome = match result {
            Ok(_) => "completed",
            Err(e) => {
                self.errors
                    .with_label_values(&[e.error_type.as_str()])
                    .inc();
                "failed"
            }
        };
        self.jobs.with_label_values(&[handler, outcome]).inc();
    }

    /// The Prometheus text exposition, with the gauges set from the given readings.
    pub fn render<'a>(
        &self,
        handlers: impl IntoIterator<Item = (&'a String, &'a HandlerSnapshot)>,
        gpu: Option<&GpuSnapshot>,
    ) -> String {
        for (name, h) in handlers {
            self.handler_active
                .with_label_values(&[name])
                .set(h.active as i64);
            self.handler_limit
                .with_label_values(&[name])
                .set(h.limit as i64);
            self.handler_queued
                .with_label_values(&[name])
                .set(h.queued as i64);
        }
        if let Some(gpu) = gpu {
            self.gpu_bytes
                .with_label_values(&["total"])
                .set(gpu.total as i64);
            self.gpu_bytes
                .with_label_values(&["free"])
                .set(gpu.free as i64);
        }
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
