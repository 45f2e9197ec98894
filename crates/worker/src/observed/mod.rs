//! The worker's observed state: where it is in its life ([`Phase`]), its job counters, the
//! recent-jobs log, and the parts of admission `/health` reads. The runner owns and updates
//! it; `/health`, `/metrics` and the console only read it, so this module imports neither.

pub mod recent;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::admission::{Limits, MemoryAdmission};
use crate::gpu::sampler::GpuSampler;
use crate::gpu::GpuAccess;
use crate::handlers::HandlerSet;
use crate::metrics::Metrics;
use crate::outcome::JobError;

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

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Something that happened to a job. [`Observed::record`] is the one place it is counted: the
/// counters `/health` shows, the Prometheus metrics and the console's recent-jobs log all hear
/// of it from there, so a new outcome is added in one match, not at every call site.
#[derive(Debug, Clone, Copy)]
pub enum JobEvent<'a> {
    /// A take brought an item (a valid job or not).
    Taken,
    /// An item without an id: nobody can be answered for it.
    Unanswerable,
    /// An id already in hand (a repeated id, or a job sent again while it ran): not started
    /// twice.
    Duplicate,
    /// Routed to `handler`; waiting for its slots.
    Queued {
        /// The job.
        job_id: &'a str,
        /// Its handler.
        handler: &'a str,
    },
    /// Holding its slots: running.
    Started {
        /// The job.
        job_id: &'a str,
    },
    /// Its GPU memory reserved too: the model work starts.
    Admitted {
        /// Its handler.
        handler: &'a str,
    },
    /// Answered with `result`, as posted (after the size check): every answer counts in
    /// `/health`'s counters and, when an error, in `error_results_total`.
    Answered {
        /// The job.
        job_id: &'a str,
        /// Its handler, when the handler ran it (`jobs_total` counts only those: a job refused
        /// before routing, given the retry signal or interrupted before it ran has none).
        ran_by: Option<&'a str>,
        /// The output or the error result.
        result: &'a Result<Value, JobError>,
    },
    /// The queue refused the answer recorded for the job, and `by` goes in its place: the job
    /// counts as what it became.
    Replaced {
        /// The job.
        job_id: &'a str,
        /// The refused answer was an output (counted `completed` until now).
        was_output: bool,
        /// The error result posted instead.
        by: &'a JobError,
    },
    /// Answered with the retry signal, for `reason` (`local_wait`, `ledger`,
    /// `measured_memory`).
    RetrySignal {
        /// The metrics label.
        reason: &'a str,
    },
    /// Stopped through the stop channel: nothing is posted.
    Cancelled {
        /// The job.
        job_id: &'a str,
    },
    /// Ran out of GPU memory.
    OutOfMemory {
        /// Its handler.
        handler: &'a str,
    },
    /// A result the queue did not take, and what became of it (`gone`, `replaced`,
    /// `rejected`, `dropped`, `spooled`, `lost`: neither delivered nor spooled).
    Undelivered {
        /// The metrics label.
        fate: &'a str,
    },
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

impl Observed {
    /// Records `event` in every sink that counts it.
    pub fn record(&self, event: JobEvent<'_>) {
        let counters = &self.counters;
        let metrics = &self.metrics;
        match event {
            JobEvent::Taken => bump(&counters.taken),
            JobEvent::Unanswerable => bump(&counters.unanswerable),
            JobEvent::Duplicate => bump(&counters.duplicates),
            JobEvent::Queued { job_id, handler } => self.recent.taken(job_id, handler),
            JobEvent::Started { job_id } => self.recent.started(job_id),
            JobEvent::Admitted { handler } => {
                metrics.admissions.with_label_values(&[handler]).inc();
            }
            JobEvent::Answered {
                job_id,
                ran_by,
                result,
            } => {
                self.recent.finished(job_id, result);
                let outcome = match result {
                    Ok(_) => {
                        bump(&counters.completed);
                        "completed"
                    }
                    Err(error) => {
                        bump(&counters.failed);
                        metrics
                            .errors
                            .with_label_values(&[error.error_type.as_str()])
                            .inc();
                        "failed"
                    }
                };
                if let Some(handler) = ran_by {
                    metrics.jobs.with_label_values(&[handler, outcome]).inc();
                }
            }
            JobEvent::Replaced {
                job_id,
                was_output,
                by,
            } => {
                if was_output {
                    counters.completed.fetch_sub(1, Ordering::Relaxed);
                    bump(&counters.failed);
                }
                metrics
                    .errors
                    .with_label_values(&[by.error_type.as_str()])
                    .inc();
                self.recent.finished(job_id, &Err(by.clone()));
            }
            JobEvent::RetrySignal { reason } => {
                metrics.retry_signals.with_label_values(&[reason]).inc();
            }
            JobEvent::Cancelled { job_id } => {
                bump(&counters.cancelled);
                self.recent.cancelled(job_id);
            }
            JobEvent::OutOfMemory { handler } => {
                metrics.ooms.with_label_values(&[handler]).inc();
            }
            JobEvent::Undelivered { fate } => {
                bump(&counters.undelivered);
                metrics.undelivered.with_label_values(&[fate]).inc();
            }
        }
    }
}
