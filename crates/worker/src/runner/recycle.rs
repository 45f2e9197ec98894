//! Replacing the worker on purpose: after each job when `[handler] refresh_worker` is set (the
//! SDK's option), or when its memory has grown past `[handler] recycle_memory_factor` times its
//! level after warm-up (a leak in a model or a library), before an out-of-memory kill does it
//! mid-job. Either way the worker stops taking, its last result carries `stopPod: true`, it
//! drains, and it exits 0.
//!
//! The host side of the rule reads the process's RSS, which is the worker's only when the
//! worker is alone in its process. In `local` the process also holds the queue, its jobs and
//! their results (a 10 MB job kept for its 30-minute retention); the allocator does not give
//! back what they freed, and the queue's own accounting cannot be subtracted from RSS
//! honestly. So there only the GPUs' resident memory is watched ([`Recycler::new`]'s
//! `watch_host`).

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::admission::MemoryAdmission;
use crate::config::Size;

/// Growth below this is never a leak worth a new worker (allocator slack, caches).
const MIN_GROWTH: u64 = 256 * 1000 * 1000;

/// The memory levels after warm-up, and whether (and why) a refresh was asked for.
#[derive(Debug)]
pub(crate) struct Recycler {
    factor: f64,
    rss_after_warm_up: Option<u64>,
    resident_after_warm_up: Vec<(usize, u64)>,
    /// When the memory was last read: at most once per [`CHECK_EVERY`], off the hot path of
    /// short jobs (a leak grows over many jobs, not within a second).
    last_check: Mutex<Option<Instant>>,
    requested: OnceLock<String>,
}

/// How often the memory rule reads the process's memory.
const CHECK_EVERY: Duration = Duration::from_secs(1);

impl Recycler {
    /// Notes the levels now (call it once the models are loaded and warm); `factor` 0 turns
    /// the memory rule off; without `watch_host` (the process holds more than the worker)
    /// only the GPUs' resident memory is watched, not the process's RSS.
    pub(crate) fn new(factor: f64, memory: &MemoryAdmission, watch_host: bool) -> Self {
        if factor > 0.0 && !watch_host {
            tracing::info!(
                "recycle_memory_factor watches GPU memory only: this process also holds the \
                 queue's jobs, so its RSS is not the worker's"
            );
        }
        Self {
            factor,
            rss_after_warm_up: watch_host.then(host_rss).flatten(),
            resident_after_warm_up: memory.resident_by_device(),
            last_check: Mutex::new(None),
            requested: OnceLock::new(),
        }
    }

    /// Why the worker should be replaced now that its memory has grown, if it should.
    pub(crate) fn grown(&self, memory: &MemoryAdmission) -> Option<String> {
        if self.factor <= 0.0 || !self.check_due() {
            return None;
        }
        // RSS is read only where it is watched.
        if let Some(reason) = self
            .rss_after_warm_up
            .and_then(|_| self.host_grown(host_rss()))
        {
            return Some(reason);
        }
        memory
            .resident_by_device()
            .into_iter()
            .find_map(|(device, now)| {
                let before = self
                    .resident_after_warm_up
                    .iter()
                    .find(|(d, _)| *d == device)?
                    .1;
                self.past(before, now)
                    .then(|| self.reason(&format!("resident memory on GPU {device}"), before, now))
            })
    }

    /// Why the worker should be replaced now that the process's RSS is `now`, if it should
    /// (never where RSS is not watched).
    fn host_grown(&self, now: Option<u64>) -> Option<String> {
        let (before, now) = self.rss_after_warm_up.zip(now)?;
        self.past(before, now)
            .then(|| self.reason("host memory (RSS)", before, now))
    }

    /// Whether the memory may be read now; if so, the next read is a period away.
    fn check_due(&self) -> bool {
        let mut last = self
            .last_check
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < CHECK_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    fn past(&self, before: u64, now: u64) -> bool {
        now.saturating_sub(before) >= MIN_GROWTH && now as f64 > before as f64 * self.factor
    }

    fn reason(&self, what: &str, before: u64, now: u64) -> String {
        format!(
            "{what} grew from {} after warm-up to {}, past recycle_memory_factor = {}",
            Size::from_bytes(before).approx(),
            Size::from_bytes(now).approx(),
            self.factor
        )
    }

    /// Records the first reason a refresh was asked for; `true` the first time.
    pub(crate) fn request(&self, reason: String) -> bool {
        self.requested.set(reason).is_ok()
    }

    /// Whether a refresh was asked for.
    pub(crate) fn requested(&self) -> bool {
        self.requested.get().is_some()
    }
}

/// This process's resident set size (`VmRSS`), where `/proc` has it.
pub(crate) fn host_rss() -> Option<u64> {
    docparse::child::status_bytes("self", "VmRSS")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recycler(factor: f64, before: u64) -> Recycler {
        Recycler {
            factor,
            rss_after_warm_up: Some(before),
            resident_after_warm_up: Vec::new(),
            last_check: Mutex::new(None),
            requested: OnceLock::new(),
        }
    }

    #[test]
    fn growth_counts_only_past_the_factor_and_a_floor() {
        let gb = 1_000_000_000;
        let r = recycler(2.0, gb);
        assert!(!r.past(gb, 2 * gb), "exactly the factor is still fine");
        assert!(r.past(gb, 2 * gb + 1));
        let small = recycler(2.0, 10_000_000);
        assert!(
            !small.past(10_000_000, 200_000_000),
            "20× of a tiny process is not a leak worth a new worker"
        );
        assert!(small.past(10_000_000, 300_000_000));
        let reason = r.reason("host memory (RSS)", gb, 3 * gb);
        assert!(reason.contains("recycle_memory_factor = 2"), "{reason}");
    }

    #[test]
    fn rss_growth_counts_only_where_rss_is_watched() {
        let gb = 1_000_000_000;
        let alone = recycler(1.5, gb);
        assert!(alone.host_grown(Some(2 * gb)).is_some());
        let shared = Recycler {
            rss_after_warm_up: None,
            ..recycler(1.5, gb)
        };
        assert_eq!(shared.host_grown(Some(100 * gb)), None);
    }

    #[test]
    fn the_first_reason_is_kept() {
        let r = recycler(0.0, 1);
        assert!(!r.requested());
        assert!(r.request("first".into()));
        assert!(!r.request("second".into()));
        assert!(r.requested());
        assert_eq!(r.requested.get().unwrap(), "first");
    }

    #[test]
    fn this_process_has_a_resident_set() {
        assert!(host_rss().unwrap() > 1_000_000);
    }
}
