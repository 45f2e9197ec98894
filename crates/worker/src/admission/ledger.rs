//! The memory ledger of one device: what has been promised to running jobs, on top of what the
//! worker itself holds there for good (its `resident` memory: model weights, the CUDA context,
//! the allocator's pool). Budget = total minus headroom; a reservation is admitted only if it
//! fits beside the resident memory, and released when its RAII value is dropped, on every exit
//! path. With a host-wide ledger, every worker process on the GPU books into one shared file,
//! so two processes never admit the same free memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::host_ledger::{HostLedger, HostView};

/// One live reservation, as `/health` and `retry_after` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The handler that holds it.
    pub handler: String,
    /// Bytes reserved.
    pub bytes: u64,
    /// How long it has been held.
    pub held_for: Duration,
}

#[derive(Debug, Default)]
struct LedgerState {
    reserved: u64,
    live: HashMap<u64, (String, u64, Instant)>,
}

/// The ledger of one device.
#[derive(Debug)]
pub struct Ledger {
    /// The CUDA ordinal jobs on this device compute on.
    device: usize,
    /// The card's UUID: the ledger's identity (and its host-wide file's name).
    uuid: String,
    budget: u64,
    /// This process's standing memory on the device.
    resident: AtomicU64,
    /// The last read of the host-wide file (refreshed off the async threads), so that `/health`,
    /// take sizing and measured memory never wait for its lock.
    host_view: Mutex<HostView>,
    /// A real GPU (not a simulated one).
    real_device: bool,
    /// A job has run since the resident memory was last measured.
    used_since_measure: AtomicBool,
    state: Mutex<LedgerState>,
    host: Option<HostLedger>,
    next_id: AtomicU64,
    /// Shared by the ledgers of all devices: one wake-up for "memory was released somewhere".
    released: Arc<Notify>,
}

impl Ledger {
    /// A ledger for the card `uuid` (CUDA ordinal `device`) with `budget` bytes, shared with
    /// other processes through `host`; `released` is woken at every release. `real_device`:
    /// a real GPU, whose allocator cache is emptied before a shared reservation is released.
    pub fn new(
        device: usize,
        uuid: &str,
        budget: u64,
        host: Option<HostLedger>,
        released: Arc<Notify>,
        real_device: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            real_device,
            device,
            uuid: uuid.to_owned(),
            budget,
            resident: AtomicU64::new(0),
            host_view: Mutex::new(HostView::default()),
            used_since_measure: AtomicBool::new(false),
            state: Mutex::new(LedgerState::default()),
            host,
            next_id: AtomicU64::new(1),
            released,
        })
    }

    /// The host-wide ledger, when there is one.
    pub fn host(&self) -> Option<&HostLedger> {
        self.host.as_ref()
    }

    /// The CUDA ordinal.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The card's UUID.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// Books this process's standing memory on the device (replacing the last figure), and
    /// marks the device as measured. Blocking with a host-wide ledger (file I/O).
    pub fn set_resident(&self, bytes: u64) {
        {
            let _state = self.lock();
            self.resident.store(bytes, Ordering::Release);
            self.used_since_measure.store(false, Ordering::Release);
            if let Some(host) = &self.host {
                if let Err(e) = host.set_resident(bytes) {
                    tracing::error!("host-wide GPU ledger: cannot book the resident memory ({e})");
                }
            }
        }
        self.refresh_host();
    }

    /// Reads the host-wide file again (blocking: call it off the async threads).
    pub fn refresh_host(&self) {
        let Some(host) = &self.host else {
            return;
        };
        match host.view() {
            Ok(view) => {
                *self
                    .host_view
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = view
            }
            Err(e) => tracing::warn!("host-wide GPU ledger unreadable ({e}); using the last read"),
        }
    }

    /// The other workers' bookings on this device, from the last read: (pid, bytes).
    pub fn peers(&self) -> Vec<(u32, u64)> {
        self.host_view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .peers
            .clone()
    }

    /// This process's standing memory on the device.
    pub fn resident_here(&self) -> u64 {
        self.resident.load(Ordering::Acquire)
    }

    /// Standing memory on the device: of every process when the ledger is host-wide.
    pub fn resident(&self) -> u64 {
        self.booked().1
    }

    /// No job of this process holds memory here, and one has run since the last measure: the
    /// moment to measure the resident memory again. Returns the reservation count, to check
    /// after measuring that no job started meanwhile ([`Ledger::reservations_made`]).
    pub fn due_for_measure(&self) -> Option<u64> {
        let state = self.lock();
        (state.live.is_empty() && self.used_since_measure.load(Ordering::Acquire))
            .then(|| self.reservations_made())
    }

    /// How many reservations were ever made here (changes whenever a job is admitted).
    pub fn reservations_made(&self) -> u64 {
        self.next_id.load(Ordering::Acquire)
    }

    /// Books `bytes` as resident if no job was admitted since `reservations_made` was read
    /// and none holds memory now; `false` (nothing booked) otherwise.
    pub fn set_resident_if_idle(&self, bytes: u64, reservations_made: u64) -> bool {
        {
            let state = self.lock();
            if !state.live.is_empty() || self.reservations_made() != reservations_made {
                return false;
            }
        }
        self.set_resident(bytes);
        true
    }

    /// Total minus headroom.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes reserved by this process.
    pub fn reserved_here(&self) -> u64 {
        self.lock().reserved
    }

    /// Bytes reserved for jobs on the device: by every process when the ledger is host-wide.
    pub fn reserved(&self) -> u64 {
        self.booked().0
    }

    /// Job reservations and resident memory: of every process when the ledger is host-wide
    /// (as last read; never less than this process's own).
    pub fn booked(&self) -> (u64, u64) {
        let (jobs, resident) = (self.reserved_here(), self.resident_here());
        if self.host.is_none() {
            return (jobs, resident);
        }
        let totals = self
            .host_view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .totals;
        (totals.jobs.max(jobs), totals.resident.max(resident))
    }

    /// Bytes that could still be reserved: the budget less resident memory and reservations.
    pub fn available(&self) -> u64 {
        let (jobs, resident) = self.booked();
        self.budget.saturating_sub(jobs).saturating_sub(resident)
    }

    /// Reserves `bytes` for `handler` if they fit within the budget minus the resident memory
    /// and `others_used` (memory in use by anything that books nothing here).
    pub fn try_reserve(
        self: &Arc<Self>,
        bytes: u64,
        handler: &str,
        others_used: u64,
    ) -> Option<Reservation> {
        let budget = self.budget.saturating_sub(others_used);
        let mut state = self.lock();
        // Counted under the lock: a re-measure that saw the device idle (and this count) knows
        // for sure whether a job was admitted meanwhile.
        let id = self.next_id.fetch_add(1, Ordering::AcqRel);
        let fits = match &self.host {
            // The file lock is taken under our own lock: one order, no deadlock. The file holds
            // every worker's resident memory as well as its jobs.
            Some(host) => host.try_reserve(id, bytes, budget).unwrap_or_else(|e| {
                tracing::error!("host-wide GPU ledger unusable ({e}); admitting nothing");
                false
            }),
            None => state.reserved + self.resident_here() + bytes <= budget,
        };
        if !fits {
            return None;
        }
        state.reserved += bytes;
        state
            .live
            .insert(id, (handler.to_owned(), bytes, Instant::now()));
        drop(state);
        self.refresh_host();
        Some(Reservation {
            ledger: self.clone(),
            id,
            bytes,
            empty_cache: true,
        })
    }

    /// The live reservations of this process.
    pub fn entries(&self) -> Vec<LedgerEntry> {
        self.lock()
            .live
            .values()
            .map(|(handler, bytes, since)| LedgerEntry {
                handler: handler.clone(),
                bytes: *bytes,
                held_for: since.elapsed(),
            })
            .collect()
    }

    fn release(&self, id: u64, empty_cache: bool) {
        if empty_cache && self.host.is_some() && self.real_device {
            // Peers admit against the host ledger as soon as this reservation goes: the memory
            // must be free on the card by then, not kept in our allocator's cache (seen on an
            // H100: a peer's job OOMed on memory our finished job had cached).
            crate::gpu::allocator::empty_cache();
        }
        {
            let mut state = self.lock();
            if let Some((_, bytes, _)) = state.live.remove(&id) {
                state.reserved -= bytes;
            }
            self.used_since_measure.store(true, Ordering::Release);
            if let Some(host) = &self.host {
                if let Err(e) = host.release(id) {
                    tracing::error!("host-wide GPU ledger: cannot release a reservation ({e})");
                }
            }
        }
        self.refresh_host();
        self.released.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// GPU memory promised to one job; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<Ledger>,
    id: u64,
    bytes: u64,
    /// With a host-wide ledger on a real GPU, empty the allocator's cache on release (peers
    /// admit on the memory at once).
    empty_cache: bool,
}

impl Reservation {
    /// The same reservation, released without emptying the allocator's cache: a batcher's
    /// passes follow each other every few milliseconds, and it empties the cache itself once
    /// it has nothing left to run.
    pub fn keeping_cache(mut self) -> Self {
        self.empty_cache = false;
        self
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The device it is on.
    pub fn device(&self) -> usize {
        self.ledger.device
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let (ledger, id, empty_cache) = (self.ledger.clone(), self.id, self.empty_cache);
        match (&ledger.host, tokio::runtime::Handle::try_current()) {
            // The shared file is written under its lock: not on an async thread.
            (Some(_), Ok(runtime)) => {
                runtime.spawn_blocking(move || ledger.release(id, empty_cache));
            }
            _ => ledger.release(id, empty_cache),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reservations_fit_the_budget_and_release_on_drop() {
        let ledger = Ledger::new(0, "GPU-0", 10, None, Arc::default(), false);
        let a = ledger.try_reserve(6, "classify", 0).unwrap();
        assert!(ledger.try_reserve(6, "classify", 0).is_none());
        let b = ledger.try_reserve(4, "classify", 0).unwrap();
        assert_eq!((ledger.reserved(), ledger.available()), (10, 0));
        drop(a);
        assert_eq!(ledger.available(), 6);
        assert!(
            ledger.try_reserve(3, "x", 4).is_none(),
            "memory used by others shrinks the budget"
        );
        assert_eq!(ledger.entries().len(), 1);
        drop(b);
        assert_eq!(ledger.reserved(), 0);
    }

    #[test]
    fn resident_memory_leaves_less_for_jobs_and_is_re_measured_only_when_idle() {
        let ledger = Ledger::new(0, "GPU-0", 24, None, Arc::default(), false);
        ledger.set_resident(14);
        assert_eq!(ledger.available(), 10);
        let a = ledger.try_reserve(6, "classify", 0).unwrap();
        assert!(
            ledger.try_reserve(6, "classify", 0).is_none(),
            "14 of weights + two 6s do not fit in 24"
        );
        assert_eq!(ledger.due_for_measure(), None, "a job holds memory");
        drop(a);
        let seen = ledger.due_for_measure().expect("idle after a job");
        let b = ledger.try_reserve(1, "classify", 0).unwrap();
        drop(b);
        assert!(
            !ledger.set_resident_if_idle(16, seen),
            "a job ran while measuring: the figure includes it"
        );
        let seen = ledger.due_for_measure().unwrap();
        assert!(ledger.set_resident_if_idle(16, seen));
        assert_eq!((ledger.resident(), ledger.available()), (16, 8));
        assert_eq!(ledger.due_for_measure(), None, "measured, no job since");
    }

    proptest! {
        /// Any interleaving of reserves and releases: the ledger never promises more than its
        /// budget, and its count always equals the sum of the live reservations.
        #[test]
        fn never_over_commits(ops in prop::collection::vec((any::<bool>(), 1u64..40, any::<prop::sample::Index>()), 1..200)) {
            let ledger = Ledger::new(0, "GPU-0", 100, None, Arc::default(), false);
            let mut live: Vec<Reservation> = Vec::new();
            for (reserve, bytes, pick) in ops {
                if reserve || live.is_empty() {
                    if let Some(r) = ledger.try_reserve(bytes, "h", 0) {
                        live.push(r);
                    } else {
                        let total: u64 = live.iter().map(Reservation::bytes).sum();
                        prop_assert!(total + bytes > 100, "refused although it fitted");
                    }
                } else {
                    live.swap_remove(pick.index(live.len()));
                }
                let total: u64 = live.iter().map(Reservation::bytes).sum();
                prop_assert!(total <= 100);
                prop_assert_eq!(ledger.reserved(), total);
            }
        }
    }
}
