//! The console's charts: a ring buffer of the worker's memory and job counts, sampled about
//! once a second from the `/health` body, bounded in memory (the oldest sample goes first).

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use worker::health::health_report;
use worker::observed::WorkerSlot;

/// How often a sample is taken.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept: ten minutes at one a second, about 100 bytes each per GPU.
pub const KEPT: usize = 600;

/// One device at one moment, in GiB as `/health` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GpuPoint {
    /// The budget (total less headroom).
    pub budget: f64,
    /// The worker's own standing memory.
    pub resident: f64,
    /// Reserved by running jobs.
    pub reserved: f64,
    /// Used by anything that books nothing here.
    pub others: f64,
}

/// One sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    /// Jobs in the worker (waiting for their handler or running).
    pub in_worker: u64,
    /// Jobs running (holding their handler's slot), all handlers together.
    pub active: u64,
    /// Per device, in `/health`'s order.
    pub gpus: Vec<GpuPoint>,
}

impl Sample {
    /// Reads a sample from a `/health` body (missing fields read as zero).
    pub fn of_health(t: u64, health: &Value) -> Self {
        let num = |v: &Value, key: &str| v.get(key).and_then(Value::as_f64).unwrap_or(0.0);
        let count = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
        let gpus = health
            .get("gpus")
            .and_then(Value::as_array)
            .map(|gpus| {
                gpus.iter()
                    .map(|g| GpuPoint {
                        budget: num(g, "budget_gb"),
                        resident: num(g, "resident_gb"),
                        reserved: num(g, "reserved_gb"),
                        others: num(g, "others_used_gb"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let active = health
            .get("handlers")
            .and_then(Value::as_object)
            .map(|handlers| handlers.values().map(|h| count(h, "active")).sum())
            .unwrap_or(0);
        Self {
            t,
            in_worker: health.get("jobs").map_or(0, |j| count(j, "in_worker")),
            active,
            gpus,
        }
    }
}

/// The ring buffer.
#[derive(Debug)]
pub struct History {
    capacity: usize,
    samples: Mutex<VecDeque<Sample>>,
}

impl Default for History {
    fn default() -> Self {
        Self::with_capacity(KEPT)
    }
}

impl History {
    /// A buffer that keeps the latest `capacity` samples (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            samples: Mutex::new(VecDeque::with_capacity(capacity)),
        }
    }

    /// Adds a sample, dropping the oldest when full.
    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        while samples.len() >= self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The samples taken after `since` (ms since the epoch), oldest first: a page that polls
    /// fetches only what it has not seen.
    pub fn since(&self, since: u64) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        samples.iter().filter(|s| s.t > since).cloned().collect()
    }

    /// How many samples are kept.
    pub fn len(&self) -> usize {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no sample is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Samples the worker in `slot` every [`SAMPLE_EVERY`] until `stop` (nothing while its models
/// load). It reads the same state `/health` reads, off the job path.
pub async fn sample(slot: WorkerSlot, history: std::sync::Arc<History>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if let Some(worker) = slot.get() {
            let (_, body) = health_report(worker);
            history.push(Sample::of_health(now_ms(), &body));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(t: u64) -> Sample {
        Sample {
            t,
            in_worker: t,
            active: 0,
            gpus: Vec::new(),
        }
    }

    #[test]
    fn the_ring_buffer_keeps_only_the_latest_samples_in_order() {
        let history = History::with_capacity(3);
        assert!(history.is_empty());
        for t in 1..=5 {
            history.push(at(t));
        }
        assert_eq!(history.len(), 3, "bounded");
        let kept: Vec<u64> = history.since(0).iter().map(|s| s.t).collect();
        assert_eq!(kept, vec![3, 4, 5], "oldest dropped first, order kept");
        let newer: Vec<u64> = history.since(4).iter().map(|s| s.t).collect();
        assert_eq!(newer, vec![5], "only what a poller has not seen");
        assert_eq!(History::with_capacity(0).capacity, 1);
    }

    #[test]
    fn a_sample_reads_the_health_body_and_sums_running_jobs() {
        let health = json!({
            "jobs": {"in_worker": 3},
            "handlers": {"a": {"active": 2}, "b": {"active": 1}},
            "gpus": [{"budget_gb": 21.35, "resident_gb": 1.0, "reserved_gb": 12.0, "others_used_gb": 2.5}],
        });
        let sample = Sample::of_health(7, &health);
        assert_eq!((sample.in_worker, sample.active), (3, 3));
        assert_eq!(
            sample.gpus,
            vec![GpuPoint {
                budget: 21.35,
                resident: 1.0,
                reserved: 12.0,
                others: 2.5
            }]
        );
        let empty = Sample::of_health(8, &json!({"status": "healthy", "ready": false}));
        assert!(empty.gpus.is_empty() && empty.in_worker == 0);
    }
}
