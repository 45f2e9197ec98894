//! Global and per-handler concurrency limits as RAII slots, on tokio's (FIFO) semaphores. A
//! handler's limit can move at run time (adaptive concurrency): raised, it adds permits;
//! lowered, it forgets free permits, and permits still held by running jobs are forgotten as
//! those jobs end (a debt), so running jobs are never cut short.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::handlers::{HandlerId, HandlerSet};

/// One handler's slots and counters.
#[derive(Debug)]
struct HandlerSlots {
    /// One permit per slot of the current limit.
    semaphore: Arc<Semaphore>,
    state: Mutex<SlotState>,
    /// The configured limit: adaptive changes never go above it.
    max_limit: usize,
}

#[derive(Debug, Clone, Copy)]
struct SlotState {
    limit: usize,
    active: usize,
    queued: usize,
    /// Permits to forget as running jobs end (the limit was lowered below what ran).
    debt: usize,
}

/// What `/health` and the logs show of one handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerSnapshot {
    /// Jobs running.
    pub active: usize,
    /// The current limit (below the configured one after an OOM, with adaptive concurrency).
    pub limit: usize,
    /// The configured limit.
    pub max_limit: usize,
    /// Taken jobs waiting for a slot.
    pub queued: usize,
}

/// The worker's concurrency limits: `[handler].max_concurrency` jobs in the worker, and each
/// handler's `max_concurrency` running at once.
#[derive(Debug)]
pub struct Limits {
    global: Arc<Semaphore>,
    global_limit: usize,
    /// Per handler, in [`HandlerId`] order.
    handlers: Vec<(String, HandlerSlots)>,
    /// Signalled whenever a slot is released, so the take loop can ask for more work.
    freed: Arc<Notify>,
}

fn lock(slots: &HandlerSlots) -> MutexGuard<'_, SlotState> {
    slots.state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Limits {
    /// Limits for `global_limit` jobs in the worker and each of `handlers`' own: both in name
    /// order, so a handler's [`HandlerId`] is its place here too.
    pub fn for_handlers(global_limit: usize, handlers: &HandlerSet) -> Self {
        Self::new(
            global_limit,
            handlers.entries().map(|e| (e.name.clone(), e.limit)),
        )
    }

    /// Limits for `global_limit` jobs in the worker and the given per-handler limits, kept in
    /// name order (a repeated name keeps its last limit), the order in which a [`HandlerSet`]
    /// numbers its handlers.
    pub fn new(global_limit: usize, handlers: impl IntoIterator<Item = (String, usize)>) -> Self {
        let by_name: BTreeMap<String, usize> = handlers.into_iter().collect();
        let handlers = by_name
            .into_iter()
            .map(|(name, limit)| {
                let slots = HandlerSlots {
                    semaphore: Arc::new(Semaphore::new(limit)),
                    state: Mutex::new(SlotState {
                        limit,
                        active: 0,
                        queued: 0,
                        debt: 0,
                    }),
                    max_limit: limit,
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

    /// The id of the handler called `name`, if it has limits here (tests: the job path gets
    /// its ids from the `HandlerSet`).
    #[cfg(test)]
    pub(crate) fn id(&self, name: &str) -> Option<HandlerId> {
        let index = self.handlers.iter().position(|(n, _)| n == name)?;
        Some(HandlerId::at(index))
    }

    fn slots(&self, name: &str) -> Option<&HandlerSlots> {
        self.handlers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    fn slots_of(&self, id: HandlerId) -> &HandlerSlots {
        &self.handlers[id.index()].1
    }

    /// Free slots of `handler` minus the jobs already waiting for them.
    pub fn startable(&self, handler: &str) -> usize {
        self.slots(handler).map_or(0, |h| {
            let s = lock(h);
            s.limit.saturating_sub(s.active).saturating_sub(s.queued)
        })
    }

    /// How many jobs to ask the queue for, given how many each handler could start now
    /// (`startable` per handler, possibly reduced further by memory): the free global slots,
    /// but no more than the largest number any one handler could start. A job's task is only
    /// known once it is taken, so this is the most that can run at once whatever they are.
    pub fn takeable_with(&self, startable: impl Fn(&str, usize) -> usize) -> usize {
        let best = self
            .handlers
            .iter()
            .map(|(name, _)| startable(name, self.startable(name)))
            .max()
            .unwrap_or(0);
        self.global.available_permits().min(best)
    }

    /// [`Limits::takeable_with`] without memory limits.
    pub fn takeable(&self) -> usize {
        self.takeable_with(|_, slots| slots)
    }

    /// Waits until some slot is released (returns at once if one was released since the last
    /// call: the notification is stored).
    pub async fn slot_freed(&self) {
        self.freed.notified().await;
    }

    /// Wakes the take loop (memory was released, a limit grew).
    pub fn notify_freed(&self) {
        self.freed.notify_one();
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

    /// Marks a taken job as waiting for `handler`.
    pub fn enqueue(self: &Arc<Self>, handler: HandlerId) -> QueuedTicket {
        lock(self.slots_of(handler)).queued += 1;
        QueuedTicket {
            limits: self.clone(),
            handler,
            taken: false,
        }
    }

    /// Waits for a slot of the ticket's handler (first come, first served).
    pub async fn acquire(self: &Arc<Self>, mut ticket: QueuedTicket) -> HandlerPermit {
        let slots = self.slots_of(ticket.handler);
        let permit = slots
            .semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("handler semaphores are never closed");
        let mut s = lock(slots);
        s.active += 1;
        s.queued -= 1;
        ticket.taken = true;
        HandlerPermit {
            limits: self.clone(),
            handler: ticket.handler,
            active: s.active,
            permit: Some(permit),
        }
    }

    /// Sets `handler`'s current limit, clamped to `1..=configured`; returns the new limit.
    pub fn set_limit(&self, handler: &str, limit: usize) -> usize {
        let Some(slots) = self.slots(handler) else {
            return 0;
        };
        let limit = limit.clamp(1, slots.max_limit);
        let grew = {
            let mut s = lock(slots);
            if limit < s.limit {
                let fewer = s.limit - limit;
                let forgotten = slots.semaphore.forget_permits(fewer);
                s.debt += fewer - forgotten;
            } else {
                let more = limit - s.limit;
                let repaid = more.min(s.debt);
                s.debt -= repaid;
                slots.semaphore.add_permits(more - repaid);
            }
            let grew = limit > s.limit;
            s.limit = limit;
            grew
        };
        if grew {
            self.freed.notify_one();
        }
        limit
    }

    /// Counters of one handler.
    pub fn handler(&self, name: &str) -> Option<HandlerSnapshot> {
        self.slots(name).map(|h| {
            let s = *lock(h);
            HandlerSnapshot {
                active: s.active,
                limit: s.limit,
                max_limit: h.max_limit,
                queued: s.queued,
            }
        })
    }

    /// Counters of every handler.
    pub fn snapshot(&self) -> BTreeMap<String, HandlerSnapshot> {
        self.handlers
            .iter()
            .filter_map(|(name, _)| Some((name.clone(), self.handler(name)?)))
            .collect()
    }

    /// Jobs in the worker (taken and not yet answered), and the global limit.
    pub fn global_usage(&self) -> (usize, usize) {
        (
            self.global_limit - self.global.available_permits(),
            self.global_limit,
        )
    }

    fn release(&self, handler: HandlerId, permit: OwnedSemaphorePermit) {
        let slots = self.slots_of(handler);
        {
            let mut s = lock(slots);
            s.active -= 1;
            if s.debt > 0 {
                // The limit was lowered while this ran: this slot goes with it.
                s.debt -= 1;
                permit.forget();
            } else {
                drop(permit);
            }
        }
        self.freed.notify_one();
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

/// A taken job waiting for its handler; counted in `queued` until it gets a slot or is dropped.
#[derive(Debug)]
pub struct QueuedTicket {
    limits: Arc<Limits>,
    handler: HandlerId,
    taken: bool,
}

impl Drop for QueuedTicket {
    fn drop(&mut self) {
        if !self.taken {
            lock(self.limits.slots_of(self.handler)).queued -= 1;
        }
    }
}

/// A running job's handler slot.
#[derive(Debug)]
pub struct HandlerPermit {
    limits: Arc<Limits>,
    handler: HandlerId,
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
        if let Some(permit) = self.permit.take() {
            self.limits.release(self.handler, permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        assert_eq!(
            limits.takeable_with(|name, n| if name == "extract" { 0 } else { n }),
            1
        );
        assert_eq!(limits.takeable_with(|_, _| 0), 0);
    }

    #[tokio::test]
    async fn queued_jobs_count_against_their_handler() {
        let limits = Arc::new(Limits::new(
            8,
            [("extract".to_owned(), 4), ("classify".to_owned(), 1)],
        ));
        let tickets: Vec<_> = (0..4)
            .map(|_| limits.enqueue(limits.id("extract").unwrap()))
            .collect();
        assert_eq!(limits.takeable(), 1, "only classify could still start");
        let _running = limits
            .acquire(limits.enqueue(limits.id("classify").unwrap()))
            .await;
        assert_eq!(limits.takeable(), 0);
        drop(tickets);
        assert_eq!(limits.takeable(), 4);
        assert!(limits.id("nope").is_none());
    }

    #[tokio::test]
    async fn permits_track_active_jobs_and_release_on_drop() {
        let limits = limits();
        let a = limits
            .acquire(limits.enqueue(limits.id("extract").unwrap()))
            .await;
        let b = limits
            .acquire(limits.enqueue(limits.id("extract").unwrap()))
            .await;
        assert_eq!((a.active_at_start(), b.active_at_start()), (1, 2));
        let snapshot = limits.snapshot()["extract"];
        assert_eq!(
            (snapshot.active, snapshot.limit, snapshot.queued),
            (2, 4, 0)
        );
        drop(a);
        assert_eq!(limits.snapshot()["extract"].active, 1);
        // The release was stored for the take loop.
        tokio::time::timeout(Duration::from_secs(1), limits.slot_freed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_lowered_limit_holds_new_jobs_until_running_ones_finish_and_raising_it_wakes_them() {
        let limits = limits();
        let mut running: Vec<_> = futures::future::join_all(
            (0..3).map(|_| limits.acquire(limits.enqueue(limits.id("extract").unwrap()))),
        )
        .await;
        assert_eq!(limits.set_limit("extract", 2), 2);
        assert_eq!(limits.set_limit("extract", 0), 1, "never below 1");
        assert_eq!(
            limits.set_limit("extract", 99),
            4,
            "never above the configured limit"
        );
        limits.set_limit("extract", 2);
        let waiting = tokio::spawn({
            let limits = limits.clone();
            async move {
                limits
                    .acquire(limits.enqueue(limits.id("extract").unwrap()))
                    .await
            }
        });
        let _still_running = running.pop();
        // 3 running, limit 2: the first that ends pays the debt, the second lets the waiter in.
        drop(running);
        // 1 running, limit 2: the waiter gets in.
        let permit = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(permit.active_at_start(), 2);
    }

    #[tokio::test]
    async fn a_limit_lowered_below_the_running_jobs_is_paid_as_they_end_and_raising_it_repays() {
        let limits = Arc::new(Limits::new(8, [("gpu".to_owned(), 2)]));
        let first = limits
            .acquire(limits.enqueue(limits.id("gpu").unwrap()))
            .await;
        let second = limits
            .acquire(limits.enqueue(limits.id("gpu").unwrap()))
            .await;
        assert_eq!(limits.set_limit("gpu", 1), 1, "both keep running");
        let waiting = tokio::spawn({
            let limits = limits.clone();
            async move {
                limits
                    .acquire(limits.enqueue(limits.id("gpu").unwrap()))
                    .await
            }
        });
        drop(first);
        // The freed slot paid the debt: one runs, the limit is one, the waiter still waits.
        assert_eq!(
            limits.slots("gpu").unwrap().semaphore.available_permits(),
            0
        );
        assert_eq!(limits.handler("gpu").unwrap().active, 1);
        drop(second);
        let third = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(third.active_at_start(), 1);
        assert_eq!(limits.set_limit("gpu", 2), 2);
        let fourth = tokio::time::timeout(
            Duration::from_secs(1),
            limits.acquire(limits.enqueue(limits.id("gpu").unwrap())),
        )
        .await
        .unwrap();
        assert_eq!(fourth.active_at_start(), 2);
        // Lowered while both run, then raised before either ends: the debt is repaid, no
        // permit is added on top of the two in use.
        assert_eq!(limits.set_limit("gpu", 1), 1);
        assert_eq!(limits.set_limit("gpu", 2), 2);
        let fifth = tokio::spawn({
            let limits = limits.clone();
            async move {
                limits
                    .acquire(limits.enqueue(limits.id("gpu").unwrap()))
                    .await
            }
        });
        let free = |limits: &Limits| limits.slots("gpu").unwrap().semaphore.available_permits();
        assert_eq!(free(&limits), 0, "two running, limit two: nothing free");
        drop(third);
        let fifth = tokio::time::timeout(Duration::from_secs(1), fifth)
            .await
            .unwrap()
            .unwrap();
        drop((fourth, fifth));
        assert_eq!(limits.snapshot()["gpu"].active, 0);
        assert_eq!(
            free(&limits),
            2,
            "as many permits as the limit, none lost or added"
        );
        let a = limits
            .acquire(limits.enqueue(limits.id("gpu").unwrap()))
            .await;
        let b = limits
            .acquire(limits.enqueue(limits.id("gpu").unwrap()))
            .await;
        assert_eq!(
            (a.active_at_start(), b.active_at_start()),
            (1, 2),
            "two slots, no more"
        );
    }
}
