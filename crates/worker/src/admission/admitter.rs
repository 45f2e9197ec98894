//! Admission's one owner, one per worker: how many jobs to take, the admit stage of a job's
//! life (a global slot, then its handler's slot, then GPU memory, in that one order, within the
//! local queue's bound, with one cancel arm for everything that can end the wait: the queue
//! stopping the job, the drain's grace running out), the retry signal of a job that ran out of
//! GPU memory, and the probe of a job's real peak.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{GlobalSlot, HandlerPermit, Limits, MemoryAdmission, QueuedTicket, Reservation};
use crate::handlers::HandlerEntry;
use crate::outcome::{ErrorType, JobError};

/// `retry_after` of the retry signal given to a CPU job that waited too long for its handler.
const LOCAL_WAIT_RETRY_AFTER_S: u64 = 10;

/// The slots an admitted job holds while it runs; each is released when dropped.
#[derive(Debug)]
pub struct Admitted {
    /// Held until the job is answered.
    pub slot: GlobalSlot,
    /// The handler's slot.
    pub permit: HandlerPermit,
}

/// Why a job was not admitted.
#[derive(Debug)]
pub enum Refusal {
    /// The queue stopped the job: nothing is posted.
    Stopped,
    /// The drain's grace ran out first: answered `Interrupted`.
    Interrupted,
    /// The local queue's bound passed, or memory is used by others: the retry signal.
    Retry(RetrySignal),
}

/// A retry signal, and the reason as `/metrics` counts it (`local_wait`, `ledger`,
/// `measured_memory`).
#[derive(Debug)]
pub struct RetrySignal {
    /// The metrics label.
    pub reason: &'static str,
    /// The error result.
    pub error: JobError,
}

/// Measures a real GPU job's peak from libtorch's allocator. The allocator's counters are per
/// device, so a job's peak is only its own when it ran alone there: measured then, skipped
/// otherwise (its footprint is learned from the jobs that did).
pub struct PeakProbe {
    device: usize,
    baseline: u64,
}

/// Admits jobs against the worker's limits and GPU memory: one per worker.
pub struct Admitter {
    limits: Arc<Limits>,
    memory: Arc<MemoryAdmission>,
}

impl Admitter {
    /// An admitter over these limits and this memory.
    pub fn new(limits: Arc<Limits>, memory: Arc<MemoryAdmission>) -> Self {
        Self { limits, memory }
    }

    /// How many jobs could start now: free slots, global and per handler, where their memory
    /// fits (what the take loop asks the queue for).
    pub fn takeable(&self) -> usize {
        self.limits
            .takeable_with(|handler, slots| self.memory.startable(handler, slots))
    }

    /// Gives a job that ran out of GPU memory the retry signal's `retry_after`: when memory
    /// should free up, as for an admission refusal.
    pub fn oom_retry_signal(&self, result: &mut Result<serde_json::Value, JobError>) {
        if let Err(error) = result {
            if error.is_out_of_memory() {
                error.retry_after = Some(self.memory.retry_after());
            }
        }
    }

    /// Starts measuring a job's peak, where it can be its own (a real GPU, alone there).
    pub fn peak_probe(
        &self,
        reservation: Option<&Reservation>,
        simulated: bool,
    ) -> Option<PeakProbe> {
        let device = reservation?.device();
        if simulated || !self.alone_on(device) {
            return None;
        }
        let baseline = crate::gpu::allocator::stats(device)?.allocated;
        crate::gpu::allocator::reset_peak(device).then_some(PeakProbe { device, baseline })
    }

    /// The job's peak, if it still ran alone when it ended.
    pub fn peak(&self, probe: PeakProbe) -> Option<u64> {
        let stats = crate::gpu::allocator::stats(probe.device)?;
        self.alone_on(probe.device)
            .then(|| stats.peak_allocated.saturating_sub(probe.baseline))
    }

    fn alone_on(&self, device: usize) -> bool {
        self.memory
            .ledgers()
            .iter()
            .find(|l| l.device() == device)
            .is_some_and(|l| l.entries().len() == 1)
    }

    /// Waits for a global slot and `entry`'s slot, for at most `max_wait` from `taken_at` (the
    /// local queue's bound, counted from the take), unless `stop` or `interrupt` comes first. `slot` is the
    /// global slot taken with the job, if one was free then. One acquisition order everywhere:
    /// global, handler, then (in [`Admitter::reserve`]) memory.
    #[allow(clippy::too_many_arguments)] // the stage's inputs, each a different thing
    pub async fn admit(
        &self,
        entry: &HandlerEntry,
        ticket: QueuedTicket,
        slot: Option<GlobalSlot>,
        taken_at: Instant,
        max_wait: Duration,
        stop: &CancellationToken,
        interrupt: &CancellationToken,
    ) -> Result<Admitted, Refusal> {
        let wait_until = taken_at + max_wait;
        let acquire = async {
            let local_wait = || {
                Refusal::Retry(RetrySignal {
                    reason: "local_wait",
                    error: self.local_wait_error(entry, max_wait),
                })
            };
            let slot = match slot {
                Some(slot) => slot,
                None => tokio::time::timeout_at(wait_until.into(), self.limits.global())
                    .await
                    .map_err(|_| local_wait())?,
            };
            let permit = tokio::time::timeout_at(wait_until.into(), self.limits.acquire(ticket))
                .await
                .map_err(|_| local_wait())?;
            Ok(Admitted { slot, permit })
        };
        tokio::select! {
            admitted = acquire => admitted,
            () = stop.cancelled() => Err(Refusal::Stopped),
            () = interrupt.cancelled() => Err(Refusal::Interrupted),
        }
    }

    /// The GPU memory `entry`'s job needs (none on the CPU), waiting for it until `wait_until`
    /// (the local queue's bound). The caller bounds the wait by the job's deadline too.
    pub async fn reserve(
        &self,
        entry: &HandlerEntry,
        wait_until: Instant,
    ) -> Result<Option<Reservation>, RetrySignal> {
        self.memory
            .admit(&entry.name, wait_until)
            .await
            .map_err(|(shortage, error)| RetrySignal {
                reason: shortage.as_str(),
                error,
            })
    }

    /// The retry signal for a job that waited its whole local-queue time.
    fn local_wait_error(&self, entry: &HandlerEntry, max_wait: Duration) -> JobError {
        if entry.on_gpu {
            return JobError::gpu_memory_exhausted(self.memory.retry_after());
        }
        let snapshot = self.limits.handler(&entry.name);
        let (active, limit) = snapshot.map_or((0, 0), |s| (s.active, s.limit));
        JobError {
            retry_after: Some(LOCAL_WAIT_RETRY_AFTER_S),
            ..JobError::new(
                ErrorType::Timeout,
                format!(
                    "no {} slot became free within {} s ({active}/{limit} busy), retry shortly",
                    entry.name,
                    max_wait.as_secs()
                ),
            )
        }
    }
}
