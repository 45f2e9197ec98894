//! Global and per-handler concurrency limits, as RAII slots on tokio semaphores.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// One handler's slots and counters.
#[derive(Debug)]
struct HandlerSlots {
    semaphore: Arc<Semaphore>,
    limit: usize,
    /// Taken jobs routed to this handler that have no slot yet.
    queued: AtomicUsize,
    /// Jobs running in this handler.
    active: AtomicUsize,
}

/// What `/health` and the logs show of one handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerSnapshot {
    /// Jobs running.
    pub active: usize,
    /// The configured limit.
    pub limit: usize,
    /// Taken jobs waiting for a slot.
    pub queued: usize,
}

/// The worker's concurrency limits: `[handler].max_concurrency` jobs in the worker, and each
/// handler's `max_concurrency` running at once.
#[derive(Debug)]
pub struct Limits {
    global: Arc<Semaphore>,
    global_limit: usize,
    handlers: BTreeMap<String, HandlerSlots>,
    /// Signalled whenever a slot is released, so the take loop can ask for more work.
    freed: Arc<Notify>,
}

impl Limits {
    /// Limits for `global_limit` jobs in the worker and the given per-handler limits.
    pub fn new(global_limit: usize, handlers: impl IntoIterator<Item = (String, usize)>) -> Self {
        let handlers = handlers
            .into_iter()
            .map(|(name, limit)| {
                let slots = HandlerSlots {
                    semaphore: Arc::new(Semaphore::new(limit)),
                    limit,
                    queued: AtomicUsize::new(0),
                    active: AtomicUsize::new(0),
                };
                (name, slots)
            })
            .collect();
        Self {
            global: Arc::new(Semaphore::new(global_limit)),
            global_limit,
            handlers,
            freed: Arc::new(Notify::new()),
        }
    }

    /// How many jobs to ask the queue for now: the free global slots, but no more than the
    /// largest number any one handler could start now (its free slots minus the jobs already
    /// waiting for them). A job's task is only known once it is taken, so this is the most
    /// that can run at once whatever the jobs turn out to be.
    pub fn takeable(&self) -> usize {
        let best_handler = self
            .handlers
            .values()
            .map(|h| {
                h.semaphore
                    .available_permits()
                    .saturating_sub(h.queued.load(Ordering::Acquire))
            })
            .max()
            .unwrap_or(0);
        self.global.available_permits().min(best_handler)
    }

    /// Waits until some slot is released (returns at once if one was released since the last
    /// call: the notification is stored).
    pub async fn slot_freed(&self) {
        self.freed.notified().await;
    }

    /// A global slot now, if one is free.
    pub fn try_global(&self) -> Option<GlobalSlot> {
        let permit = self.global.clone().try_acquire_owned().ok()?;
        Some(GlobalSlot {
            permit: Some(permit),
            freed: self.freed.clone(),
        })
    }

    /// A global slot, waiting for one (for jobs the queue sent beyond what was asked).
    pub async fn global(&self) -> GlobalSlot {
        let permit = self
            .global
            .clone()
            .acquire_owned()
            .await
            .expect("the global semaphore is never closed");
        GlobalSlot {
            permit: Some(permit),
            freed: self.freed.clone(),
        }
    }

    /// Marks a taken job as waiting for `handler`; `None` for an unknown handler.
    pub fn enqueue(self: &Arc<Self>, handler: &str) -> Option<QueuedTicket> {
        let slots = self.handlers.get(handler)?;
        slots.queued.fetch_add(1, Ordering::AcqRel);
        Some(QueuedTicket {
            limits: self.clone(),
            handler: handler.to_owned(),
        })
    }

    /// Waits for a slot of the ticket's handler.
    pub async fn acquire(self: &Arc<Self>, ticket: QueuedTicket) -> HandlerPermit {
        let slots = &self.handlers[&ticket.handler];
        let permit = slots
            .semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("handler semaphores are never closed");
        let active = slots.active.fetch_add(1, Ordering::AcqRel) + 1;
        let handler = ticket.handler.clone();
        drop(ticket);
        HandlerPermit {
            limits: self.clone(),
            handler,
            active,
            permit: Some(permit),
        }
    }

    /// Counters of every handler.
    pub fn snapshot(&self) -> BTreeMap<String, HandlerSnapshot> {
        self.handlers
            .iter()
            .map(|(name, h)| {
                let snapshot = HandlerSnapshot {
                    active: h.active.load(Ordering::Acquire),
                    limit: h.limit,
                    queued: h.queued.load(Ordering::Acquire),
                };
                (name.clone(), snapshot)
            })
            .collect()
    }

    /// Jobs in the worker (taken and not yet answered), and the global limit.
    pub fn global_usage(&self) -> (usize, usize) {
        (
            self.global_limit - self.global.available_permits(),
            self.global_limit,
        )
    }
}

/// A place in the worker, held from the take until the job is answered.
#[derive(Debug)]
pub struct GlobalSlot {
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for GlobalSlot {
    fn drop(&mut self) {
        // Release before waking the take loop: woken first, it could read the semaphore while
        // the permit is still held, see nothing free, and sleep through the only wake-up.
        drop(self.permit.take());
        self.freed.notify_one();
    }
}

/// A taken job waiting for its handler; counted in `queued` until dropped.
#[derive(Debug)]
pub struct QueuedTicket {
    limits: Arc<Limits>,
    handler: String,
}

impl Drop for QueuedTicket {
    fn drop(&mut self) {
        self.limits.handlers[&self.handler]
            .queued
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// A running job's handler slot.
#[derive(Debug)]
pub struct HandlerPermit {
    limits: Arc<Limits>,
    handler: String,
    active: usize,
    permit: Option<OwnedSemaphorePermit>,
}

impl HandlerPermit {
    /// Jobs running in this handler when this one started, itself included.
    pub fn active_at_start(&self) -> usize {
        self.active
    }
}

impl Drop for HandlerPermit {
    fn drop(&mut self) {
        // Release before waking the take loop (see `GlobalSlot`).
        drop(self.permit.take());
        self.limits.handlers[&self.handler]
            .active
            .fetch_sub(1, Ordering::AcqRel);
        self.limits.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Arc<Limits> {
        Arc::new(Limits::new(
            4,
            [("extract".to_owned(), 4), ("classify".to_owned(), 1)],
        ))
    }

    #[tokio::test]
    async fn takeable_is_bounded_by_global_slots_and_the_best_handler() {
        let limits = limits();
        assert_eq!(limits.takeable(), 4);
        let _slots: Vec<_> = (0..3).map(|_| limits.try_global().unwrap()).collect();
        assert_eq!(limits.takeable(), 1);
    }

    #[tokio::test]
    async fn queued_jobs_count_against_their_handler() {
        let limits = Arc::new(Limits::new(
            8,
            [("extract".to_owned(), 4), ("classify".to_owned(), 1)],
        ));
        let tickets: Vec<_> = (0..4).map(|_| limits.enqueue("extract").unwrap()).collect();
        assert_eq!(limits.takeable(), 1, "only classify could still start");
        let _running = limits.acquire(limits.enqueue("classify").unwrap()).await;
        assert_eq!(limits.takeable(), 0);
        drop(tickets);
        assert_eq!(limits.takeable(), 4);
        assert!(limits.enqueue("nope").is_none());
    }

    #[tokio::test]
    async fn permits_track_active_jobs_and_release_on_drop() {
        let limits = limits();
        let a = limits.acquire(limits.enqueue("extract").unwrap()).await;
        let b = limits.acquire(limits.enqueue("extract").unwrap()).await;
        assert_eq!((a.active_at_start(), b.active_at_start()), (1, 2));
        assert_eq!(
            limits.snapshot()["extract"],
            HandlerSnapshot {
                active: 2,
                limit: 4,
                queued: 0
            }
        );
        drop(a);
        assert_eq!(limits.snapshot()["extract"].active, 1);
        // The release was stored for the take loop.
        tokio::time::timeout(std::time::Duration::from_secs(1), limits.slot_freed())
            .await
            .unwrap();
    }
}
