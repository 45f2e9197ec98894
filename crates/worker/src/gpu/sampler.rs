//! Reads the GPUs (NVML, simulated) and libtorch's allocator at a fixed interval, off the job
//! path: admission reads the latest sample in nanoseconds instead of calling NVML (6.7 µs a
//! call on an H200, and a driver-wide lock when polled hard).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::allocator::{self, AllocatorStats};
use super::{DeviceReading, GpuProbe};

/// One sample of every device.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The devices.
    pub devices: Vec<DeviceReading>,
    /// libtorch's counters per device (`None` without CUDA, e.g. simulated devices).
    pub allocator: Vec<Option<AllocatorStats>>,
    /// When it was taken.
    pub at: Option<Instant>,
}

impl Sample {
    /// libtorch's counters for the card `uuid` (looked up by identity, not position).
    pub fn allocator_of(&self, uuid: &str) -> Option<AllocatorStats> {
        let position = self.devices.iter().position(|d| d.uuid == uuid)?;
        self.allocator.get(position).copied().flatten()
    }
}

/// The latest sample, refreshed in the background.
pub struct GpuSampler {
    probe: Arc<dyn GpuProbe>,
    latest: Mutex<Arc<Sample>>,
}

impl GpuSampler {
    /// A sampler over `probe`, with a first sample taken now.
    pub fn new(probe: Arc<dyn GpuProbe>) -> Arc<Self> {
        let sampler = Arc::new(Self {
            probe,
            latest: Mutex::new(Arc::new(Sample::default())),
        });
        sampler.refresh();
        sampler
    }

    /// The probe.
    pub fn probe(&self) -> &Arc<dyn GpuProbe> {
        &self.probe
    }

    /// Takes a sample now.
    pub fn refresh(&self) {
        let devices = self.probe.read();
        // libtorch counts by CUDA ordinal, which is each reading's `index`.
        let allocator = devices.iter().map(|d| allocator::stats(d.index)).collect();
        let sample = Arc::new(Sample {
            devices,
            allocator,
            at: Some(Instant::now()),
        });
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = sample;
    }

    /// The latest sample.
    pub fn latest(&self) -> Arc<Sample> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Refreshes every `interval` on a blocking thread until `stop`.
    pub fn spawn(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        let sampler = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = stop.cancelled() => return,
                }
                let s = sampler.clone();
                // NVML and file reads block: keep them off the async threads.
                let _ = tokio::task::spawn_blocking(move || s.refresh()).await;
            }
        });
    }
}
