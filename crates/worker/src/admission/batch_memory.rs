//! Memory booked per batch: a batcher's batches book in their device's ledger as jobs do, so
//! batched jobs (which reserve nothing at admission) and unbatched ones share one budget.

use std::sync::Arc;

use super::MemoryAdmission;
use crate::handlers::HandlerSet;
use crate::model::{BatchAttachment, BatchMemory, BatchMetrics};

/// The name a batch's booking has in the ledger (and in `/health`'s reservations).
const BATCH_ENTRY: &str = "batch";

/// One device's ledger, as a batcher sees it.
struct LedgerBooking {
    memory: Arc<MemoryAdmission>,
    device: usize,
    /// A real GPU, whose allocator peaks can be read.
    real: bool,
}

impl LedgerBooking {
    fn ledger(&self) -> Option<&Arc<super::Ledger>> {
        self.memory
            .ledgers
            .iter()
            .find(|l| l.device() == self.device)
    }
}

impl BatchMemory for LedgerBooking {
    fn room(&self) -> u64 {
        let Some(ledger) = self.ledger() else {
            return 0;
        };
        // Peers book in a host-wide ledger without telling us: read it fresh (this runs on
        // the batcher's own thread, never on the async runtime).
        ledger.refresh_host();
        ledger
            .available()
            .saturating_sub(self.memory.others_used(self.device))
    }

    fn book(&self, bytes: u64) -> Option<Box<dyn Send>> {
        let others = self.memory.others_used(self.device);
        let reservation = self.ledger()?.try_reserve(bytes, BATCH_ENTRY, others)?;
        Some(Box::new(reservation.keeping_cache()))
    }

    fn retry_after(&self) -> u64 {
        self.memory.retry_after()
    }

    fn idle(&self) {
        // What the passes cached goes back to the card for peers sharing the host ledger.
        if self.real && self.ledger().is_some_and(|l| l.host().is_some()) {
            crate::gpu::allocator::empty_cache();
        }
    }

    fn measurable(&self) -> Option<usize> {
        let ledger = self.ledger()?;
        // Alone: the batch's own booking is the only one that holds memory (batched jobs'
        // admissions book none).
        let holding = ledger.entries().iter().filter(|e| e.bytes > 0).count();
        (self.real && holding == 1).then_some(self.device)
    }
}

/// Connects every batcher of `handlers` to this worker: batchers used by a GPU handler book
/// their batches in the ledger of the device they compute on (device 0 of a simulated GPU,
/// where models compute on the CPU), declaring per job the largest reservation of those
/// handlers until bytes per token are learned; all report to `metrics`.
pub fn attach_batchers(
    handlers: &HandlerSet,
    memory: &Arc<MemoryAdmission>,
    metrics: &BatchMetrics,
) {
    let real = !memory.sampler.probe().is_simulated();
    for used in handlers.batchers() {
        let on_gpu: Vec<_> = used
            .handlers
            .iter()
            .map(|id| handlers.entry(*id))
            .filter(|e| e.on_gpu)
            .collect();
        let declared = on_gpu
            .iter()
            .map(|e| memory.resolve(e.reservation.bytes()))
            .max()
            .unwrap_or(0);
        let booking = (!on_gpu.is_empty()).then(|| {
            Arc::new(LedgerBooking {
                memory: memory.clone(),
                device: used.batcher.cuda_device().unwrap_or(0),
                real,
            }) as Arc<dyn BatchMemory>
        });
        used.batcher.attach(BatchAttachment {
            memory: booking,
            declared_per_job: declared,
            metrics: metrics.clone(),
        });
    }
}
