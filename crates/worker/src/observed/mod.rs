//! The worker's observed state: where it is in its life ([`Phase`]), its job counters, the
//! recent-jobs log, and the parts of admission `/health` reads. The runner owns and updates
//! it; `/health`, `/metrics` and the console only read it, so this module imports neither.

pub mod recent;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::admission::{Limits, MemoryAdmission};
use crate::gpu::sampler::GpuSampler;
use crate::gpu::GpuAccess;
use crate::handlers::HandlerSet;
use crate::metrics::Metrics;

pub use recent::{RecentJobs, RecentState};

/// Where the worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Loading models.
    Starting = 0,
    /// Taking jobs.
    Ready = 1,
    /// SIGTERM received: answering the jobs in hand, taking no more.
    Draining = 2,
    /// Cannot serve (e.g. a CUDA context that no longer works).
    Unhealthy = 3,
}

/// An atomically updated [`Phase`].
#[derive(Debug, Default)]
pub struct PhaseCell(AtomicU8);

impl PhaseCell {
    /// Moves to `phase`.
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Release);
    }

    /// The current phase.
    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            2 => Phase::Draining,
            _ => Phase::Unhealthy,
        }
    }
}

/// Job counters since start.
#[derive(Debug, Default)]
pub struct JobCounters {
    /// Jobs received from the queue (valid or not).
    pub taken: AtomicU64,
    /// Answered with an output.
    pub completed: AtomicU64,
    /// Answered with an error result.
    pub failed: AtomicU64,
    /// Stopped through the stop channel (nothing posted, as the SDK does).
    pub cancelled: AtomicU64,
    /// Results the queue never accepted.
    pub undelivered: AtomicU64,
    /// Jobs without an id, which nobody can be answered for.
    pub unanswerable: AtomicU64,
    /// Jobs whose id was already in hand (a repeated id in a batch, or a job the queue sent
    /// again while it still ran here): not started twice.
    pub duplicates: AtomicU64,
}

impl JobCounters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What `/health`, `/ready` and `/metrics` read of a running worker. The runner owns and updates
/// it; it is shared, read-only here.
pub struct Observed {
    /// Where the worker is in its life.
    pub phase: PhaseCell,
    /// The handlers and their configuration.
    pub handlers: HandlerSet,
    /// Slots: global and per handler.
    pub limits: Arc<Limits>,
    /// GPU memory admission: ledgers, footprints, durations.
    pub memory: Arc<MemoryAdmission>,
    /// The latest GPU readings.
    pub sampler: Arc<GpuSampler>,
    /// What libtorch can do with the GPUs.
    pub gpu_access: GpuAccess,
    /// Job counters since start.
    pub counters: JobCounters,
    /// The Prometheus registry.
    pub metrics: Metrics,
    /// This worker's id (`RUNPOD_POD_ID`).
    pub worker_id: String,
    /// `[gpu] adaptive`.
    pub adaptive: bool,
    /// The latest jobs, for the console: ids, states, timings and error types only.
    pub recent: RecentJobs,
}

/// The worker, once it is built: empty while the models load.
pub type WorkerSlot = Arc<std::sync::OnceLock<Arc<Observed>>>;
