//! What a batcher has done and learned, for `/health`, `/metrics` and the console.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Serialize;

/// The batcher's counters (read without stopping it).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) batches: AtomicU64,
    pub(super) rows: AtomicU64,
    pub(super) padded_tokens: AtomicU64,
    pub(super) real_tokens: AtomicU64,
    pub(super) oom_splits: AtomicU64,
    pub(super) error_splits: AtomicU64,
    pub(super) token_limit: AtomicUsize,
    pub(super) pending_rows: AtomicUsize,
    /// Bytes per padded token, learned from the allocator's peaks (0: not yet).
    pub(super) bytes_per_token: AtomicU64,
    pub(super) peak_samples: AtomicU64,
    pub(super) largest_per_token: AtomicU64,
}

/// One batcher as `/health` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchReport {
    /// The model.
    pub model: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Forward passes run.
    pub batches: u64,
    /// Rows (sequences) embedded.
    pub rows: u64,
    /// Mean rows per pass.
    pub mean_rows: f64,
    /// Share of the padded tokens that were padding.
    pub padding_waste: f64,
    /// The padded-token limit a batch forms under now (halved on a CUDA OOM, grown back after).
    pub token_limit: usize,
    /// The configured limits.
    pub max_batch_tokens: usize,
    /// The configured limit of rows.
    pub max_batch_rows: usize,
    /// Bytes per padded token learned from the allocator's peaks; `None` until learned (a
    /// batch then books the declared `gpu_memory_per_request` per job in it).
    pub learned_bytes_per_token: Option<u64>,
    /// Batches split because of a CUDA OOM.
    pub oom_splits: u64,
    /// Batches split to find the input a model error came from.
    pub error_splits: u64,
    /// Rows waiting now.
    pub pending_rows: usize,
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
        let labels = &["model", "device"];
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric names are unique");
            metric
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric names are unique");
            metric
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
                "runpod_worker_batch_tokens_total",
                "Tokens through the batchers' forward passes, by kind (real, padding)",
                &["model", "device", "kind"],
            ),
            splits: counter(
                "runpod_worker_batch_splits_total",
                "Batches split and run again in halves, by cause (oom, model_error)",
                &["model", "device", "cause"],
            ),
        }
    }

    pub(super) fn batch(&self, labels: [&str; 2], rows: usize, padded: usize, real: usize) {
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

    pub(super) fn waited(&self, labels: [&str; 2], waited: Duration) {
        self.wait
            .with_label_values(&labels)
            .observe(waited.as_secs_f64());
    }

    pub(super) fn split(&self, labels: [&str; 2], cause: &str) {
        let [model, device] = labels;
        self.splits.with_label_values(&[model, device, cause]).inc();
    }
}

/// Where a batcher's metrics go once its worker has registered them.
#[derive(Default)]
pub(super) struct MetricsSlot(Mutex<Option<BatchMetrics>>);

impl MetricsSlot {
    pub(super) fn set(&self, metrics: BatchMetrics) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(metrics);
    }

    pub(super) fn get(&self) -> Option<BatchMetrics> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Counters {
    pub(super) fn load(value: &AtomicU64) -> u64 {
        value.load(Ordering::Relaxed)
    }

    pub(super) fn add(value: &AtomicU64, by: u64) {
        value.fetch_add(by, Ordering::Relaxed);
    }
}
