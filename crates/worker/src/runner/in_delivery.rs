//! The budget of results in delivery: how many, and how many bytes, may be posted (or retried,
//! for up to `delivery_retry_s`) at once. A result in delivery holds no job slot, so the next
//! job starts while the previous result is still on the wire; the budget is what keeps a queue
//! that is slow to take results from piling them up in memory: while it is spent, the take
//! loop asks for nothing.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::admission::Limits;

/// Results in delivery, bounded by count and by bytes.
#[derive(Debug)]
pub(crate) struct DeliveryBudget {
    count: Arc<Semaphore>,
    /// One permit per KiB of result body.
    kib: Arc<Semaphore>,
    total_kib: u32,
    /// Told when a result leaves delivery (the take loop waits on it when the budget is spent).
    limits: Arc<Limits>,
}

/// A result's place in the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct InDelivery {
    _count: OwnedSemaphorePermit,
    _kib: OwnedSemaphorePermit,
    limits: Arc<Limits>,
}

impl Drop for InDelivery {
    fn drop(&mut self) {
        self.limits.notify_freed();
    }
}

impl DeliveryBudget {
    /// At most `count` results and `bytes` of them in delivery at once.
    pub(crate) fn new(count: usize, bytes: u64, limits: Arc<Limits>) -> Self {
        let total_kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
        Self {
            count: Arc::new(Semaphore::new(count.max(1))),
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            limits,
        }
    }

    /// Whether another result could enter delivery now.
    pub(crate) fn has_room(&self) -> bool {
        self.count.available_permits() > 0 && self.kib.available_permits() > 0
    }

    /// Waits for room for a result of `bytes` (one larger than the whole budget goes alone).
    pub(crate) async fn enter(&self, bytes: usize) -> InDelivery {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_kib);
        let count = self.count.clone().acquire_owned().await;
        let kib = self.kib.clone().acquire_many_owned(kib).await;
        match (count, kib) {
            (Ok(count), Ok(kib)) => InDelivery {
                _count: count,
                _kib: kib,
                limits: self.limits.clone(),
            },
            _ => unreachable!("the delivery semaphores are never closed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(count: usize, bytes: u64) -> DeliveryBudget {
        DeliveryBudget::new(count, bytes, Arc::new(Limits::new(1, [])))
    }

    #[tokio::test]
    async fn the_count_bounds_results_in_delivery() {
        let budget = budget(2, 1 << 20);
        let a = budget.enter(10).await;
        assert!(budget.has_room());
        let _b = budget.enter(10).await;
        assert!(!budget.has_room());
        drop(a);
        assert!(budget.has_room());
    }

    #[tokio::test]
    async fn the_bytes_bound_results_in_delivery_and_a_larger_result_goes_alone() {
        let budget = budget(100, 10 * 1024);
        let first = budget.enter(6 * 1024).await;
        assert!(budget.has_room());
        let waiting = budget.enter(6 * 1024);
        tokio::pin!(waiting);
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "12 KiB do not fit 10"
        );
        drop(first);
        let second = waiting.await;
        drop(second);
        // Larger than the whole budget: waits for all of it, then goes.
        let huge = budget.enter(1 << 30).await;
        assert!(!budget.has_room());
        drop(huge);
        assert!(budget.has_room());
    }
}
