//! Booking each device's resident memory in its ledger: declared on a simulated GPU, measured
//! on a real one after the models load, and measured again when a device is idle after jobs
//! ran (the allocator's pool and the CUDA context grow after warm-up).

use std::sync::Arc;

use super::resident::{self, ResidentReading, ResidentSource};
use super::{Ledger, MemoryAdmission};
use crate::handlers::HandlerSet;

/// A context that moved by this much is said in the log (it changes what jobs are admitted).
const CONTEXT_CHANGE_WORTH_SAYING: u64 = 64 * 1024 * 1024;

impl MemoryAdmission {
    /// Books `declared` bytes as every device's resident memory (a simulated GPU: what the
    /// handlers declare with `model_memory`).
    pub fn book_declared_resident(&self, declared: u64) {
        for ledger in &self.ledgers {
            ledger.set_resident(declared);
            self.note_source(ledger.uuid(), ResidentSource::Declared);
        }
    }

    /// Measures and books what this process holds on every real device (call it when no job
    /// runs: after the models load). Blocking: it reads NVML.
    pub fn measure_resident(&self) -> Vec<(Arc<Ledger>, ResidentReading)> {
        crate::gpu::allocator::empty_cache();
        self.sampler.refresh();
        let sample = self.sampler.latest();
        self.ledgers
            .iter()
            .filter_map(|ledger| {
                let reading = sample.devices.iter().find(|d| d.uuid == ledger.uuid())?;
                let measured = resident::measure(
                    reading,
                    sample.allocator_of(ledger.uuid()),
                    self.context_of(ledger.uuid()),
                );
                ledger.set_resident(measured.bytes);
                self.note_source(ledger.uuid(), measured.source);
                Some((ledger.clone(), measured))
            })
            .collect()
    }

    /// Measures again the devices that are idle after running jobs (the pool and the context
    /// grow after warm-up), releasing the allocator's cache first. A device where a job was
    /// admitted meanwhile keeps its last figure. Blocking: call it off the job path.
    pub fn remeasure_idle(&self) {
        if self.sampler.probe().is_simulated() {
            return;
        }
        let due: Vec<(Arc<Ledger>, u64)> = self
            .ledgers
            .iter()
            .filter_map(|l| l.due_for_measure().map(|seen| (l.clone(), seen)))
            .collect();
        if due.is_empty() {
            return;
        }
        crate::gpu::allocator::empty_cache();
        self.sampler.refresh();
        let sample = self.sampler.latest();
        for (ledger, seen) in due {
            let Some(reading) = sample.devices.iter().find(|d| d.uuid == ledger.uuid()) else {
                continue;
            };
            let allocator = sample.allocator_of(ledger.uuid());
            // Inside a container the context was measured once, at start; it grows as kernels
            // load, and that growth would count as others' memory. Idle, it can be read again
            // where NVML lists this process alone (under its host pid).
            let context = resident::context_of_lone_process(reading, allocator);
            let context_bytes = context.unwrap_or_else(|| self.context_of(ledger.uuid()));
            let measured = resident::measure(reading, allocator, context_bytes);
            let before = ledger.resident_here();
            let idle = ledger.set_resident_if_idle(measured.bytes, seen);
            // Kept only from a reading taken while no job held memory there.
            if let (true, Some(context)) = (idle, context) {
                self.remeasured_context(ledger.device(), ledger.uuid(), context);
            }
            if idle && before != measured.bytes {
                tracing::debug!(
                    "GPU {}: resident memory re-measured idle: {} MB (was {} MB)",
                    ledger.device(),
                    measured.bytes / 1_000_000,
                    before / 1_000_000
                );
            }
        }
    }

    pub(super) fn context_of(&self, uuid: &str) -> u64 {
        self.contexts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(uuid)
            .copied()
            .unwrap_or(0)
    }

    /// Keeps a context size measured idle, saying so when it moved by more than a rounding.
    fn remeasured_context(&self, device: usize, uuid: &str, bytes: u64) {
        let mut contexts = self
            .contexts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = contexts.insert(uuid.to_owned(), bytes).unwrap_or(0);
        if before.abs_diff(bytes) >= CONTEXT_CHANGE_WORTH_SAYING {
            tracing::info!(
                "GPU {device}: CUDA context re-measured idle: {} MB (was {} MB); no longer \
                 counted as memory used by others",
                bytes / 1_000_000,
                before / 1_000_000
            );
        }
    }

    fn note_source(&self, uuid: &str, source: ResidentSource) {
        self.resident_sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(uuid.to_owned(), source);
    }

    /// Where device `uuid`'s resident figure came from, once booked.
    pub fn resident_source(&self, uuid: &str) -> Option<ResidentSource> {
        self.resident_sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(uuid)
            .copied()
    }

    /// The first GPU handler that cannot fit one job on any device beside the resident memory:
    /// `(handler, need, ledger with the most room)`.
    pub fn handler_without_room(
        &self,
        handlers: &HandlerSet,
    ) -> Option<(String, u64, Arc<Ledger>)> {
        let roomiest = self
            .ledgers
            .iter()
            .max_by_key(|l| l.budget().saturating_sub(l.resident()))?;
        let room = roomiest.budget().saturating_sub(roomiest.resident());
        handlers
            .entries()
            .filter(|e| e.on_gpu && (e.reservation.within(room) > room || room == 0))
            .map(|e| (e.name.clone(), e.reservation.within(room), roomiest.clone()))
            .next()
    }

    /// The ledgers, one per device.
    pub fn ledgers(&self) -> &[Arc<Ledger>] {
        &self.ledgers
    }
}
