//! When to give up on this worker: repeated GPU out-of-memory failures, or a device that no
//! longer works. Then the worker stops taking jobs, drains, and asks the platform to replace
//! it (`stopPod`) instead of failing every job that comes its way.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde_json::Value;

use crate::outcome::JobError;

/// Counts consecutive OOMs and watches for device failures.
#[derive(Debug)]
pub struct DeviceHealth {
    oom_streak: AtomicU32,
    max_consecutive_ooms: u32,
    tripped: AtomicBool,
}

impl DeviceHealth {
    /// Trips after `max_consecutive_ooms` OOMs in a row, or at the first device failure.
    pub fn new(max_consecutive_ooms: u32) -> Self {
        Self {
            oom_streak: AtomicU32::new(0),
            max_consecutive_ooms,
            tripped: AtomicBool::new(false),
        }
    }

    /// Records a finished job. `true` exactly once: for the result that trips the worker.
    pub fn record(&self, result: &Result<Value, JobError>) -> bool {
        let trips = match result {
            Ok(_) => {
                self.oom_streak.store(0, Ordering::Release);
                false
            }
            Err(e) if e.device_lost => true,
            Err(e) if e.is_out_of_memory() => {
                self.oom_streak.fetch_add(1, Ordering::AcqRel) + 1 >= self.max_consecutive_ooms
            }
            Err(_) => false,
        };
        trips && !self.tripped.swap(true, Ordering::AcqRel)
    }

    /// Whether the worker has asked to be replaced.
    pub fn is_tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_once_after_consecutive_ooms_and_a_success_resets_the_streak() {
        let health = DeviceHealth::new(3);
        let oom = Err(JobError::gpu_memory_exhausted(5));
        assert!(!health.record(&oom) && !health.record(&oom));
        assert!(!health.record(&Ok(Value::Null)), "a success resets");
        assert!(!health.record(&oom) && !health.record(&oom));
        assert!(health.record(&oom), "third in a row trips");
        assert!(!health.record(&oom), "only once");
        assert!(health.is_tripped());
    }

    #[test]
    fn a_lost_device_trips_at_once_and_other_errors_do_not_count() {
        let health = DeviceHealth::new(3);
        assert!(!health.record(&Err(JobError::invalid_input("x"))));
        assert!(health.record(&Err(JobError::device_failure("gone"))));
    }
}
