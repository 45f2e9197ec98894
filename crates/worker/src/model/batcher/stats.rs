//! What a batcher has done and learned, for `/health`, `/metrics` and the console.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::metrics::BatchMetrics;

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
