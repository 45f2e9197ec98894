//! GPU memory admission: which device a GPU job goes to, whether the memory it needs is really
//! there, and what `retry_after` to answer when it is not.
//!
//! Two checks, in one place:
//! - the ledger (layer 1 in the seed's terms, moved inside the worker): the worker's resident
//!   memory plus reservations of running jobs may not exceed the budget. Memory held by our own
//!   jobs comes back when they finish, so a job short of it waits, within its local-queue time;
//! - live measured memory (layer 2): the budget shrinks by what others use right now (other
//!   processes, or the simulated external load), read from the latest off-path sample. Memory
//!   taken by others may not come back soon, so a job short of it gets the retry signal at once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::learning::{DurationStats, Footprint};
use super::resident::ResidentSource;
use super::{HostLedger, Ledger, Reservation};
use crate::config::{GpuConfig, Size};
use crate::gpu::sampler::GpuSampler;
use crate::handlers::HandlerSet;
use crate::outcome::JobError;

/// Why a GPU job could not be admitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// Our own running jobs hold the memory: it comes back when they finish.
    Ledger,
    /// Something else uses the memory (measured): retry later.
    Measured,
}

impl Shortage {
    /// The label in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ledger => "ledger",
            Self::Measured => "measured_memory",
        }
    }
}

/// Memory admission for every GPU of this worker.
pub struct MemoryAdmission {
    pub(super) ledgers: Vec<Arc<Ledger>>,
    pub(super) sampler: Arc<GpuSampler>,
    footprints: BTreeMap<String, Footprint>,
    /// GPU handlers whose model work runs on batchers: their jobs reserve nothing (each batch
    /// books its own memory, see [`super::batch_memory`]).
    batched: std::collections::BTreeSet<String>,
    durations: BTreeMap<String, DurationStats>,
    released: Arc<Notify>,
    config: GpuConfig,
    /// Per device (by UUID): the CUDA context's size, measured at start (real GPUs), and again
    /// when the device is idle where NVML shows it (a context grows as kernels load).
    pub(super) contexts: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Per device (by UUID): where its resident figure came from.
    pub(super) resident_sources: std::sync::Mutex<BTreeMap<String, ResidentSource>>,
}

impl MemoryAdmission {
    /// Ledgers for the sampled devices (budget = total minus headroom), and a footprint for
    /// every handler that runs on a GPU. `contexts` holds the CUDA context's size per device
    /// UUID, where it was measured.
    pub fn new(
        config: &GpuConfig,
        handlers: &HandlerSet,
        sampler: Arc<GpuSampler>,
        contexts: BTreeMap<String, u64>,
    ) -> std::io::Result<Self> {
        let released = Arc::new(Notify::new());
        let sample = sampler.latest();
        let ledgers = sample
            .devices
            .iter()
            .map(|device| {
                let host = match &config.host_ledger_dir {
                    Some(dir) => Some(HostLedger::open(Path::new(dir), &device.uuid)?),
                    None => None,
                };
                let budget = device.total.saturating_sub(config.headroom.bytes());
                Ok(Ledger::new(
                    device.index,
                    &device.uuid,
                    budget,
                    host,
                    released.clone(),
                    !sampler.probe().is_simulated(),
                ))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let batched = handlers
            .entries()
            .filter(|e| e.on_gpu && e.batched)
            .map(|e| e.name.clone())
            .collect();
        let footprints = handlers
            .entries()
            .filter(|e| e.on_gpu && !e.batched)
            .map(|e| {
                let footprint = Footprint::new(
                    e.reservation.bytes(),
                    config.footprint_margin,
                    config.footprint_percentile,
                    config.footprint_min_samples,
                );
                (e.name.clone(), footprint)
            })
            .collect();
        let durations = handlers
            .entries()
            .map(|e| (e.name.clone(), DurationStats::default()))
            .collect();
        Ok(Self {
            ledgers,
            sampler,
            footprints,
            batched,
            durations,
            released,
            config: config.clone(),
            contexts: std::sync::Mutex::new(contexts),
            resident_sources: std::sync::Mutex::default(),
        })
    }

    /// The footprint of `handler`, if it runs on a GPU.
    pub fn footprint(&self, handler: &str) -> Option<&Footprint> {
        self.footprints.get(handler)
    }

    /// The typical duration of `handler`'s jobs.
    pub fn typical_duration(&self, handler: &str) -> Option<Duration> {
        self.durations.get(handler)?.typical()
    }

    /// Bytes one job of `handler` needs now: the learned footprint with `adaptive`, else the
    /// declared one; 0 for a batched GPU handler (its job is admitted to a device, its batches
    /// book the memory); `None` for CPU handlers.
    pub fn need(&self, handler: &str) -> Option<u64> {
        if self.batched.contains(handler) {
            return Some(0);
        }
        let footprint = self.footprints.get(handler)?;
        Some(self.resolve(if self.config.adaptive {
            footprint.estimate()
        } else {
            footprint.declared()
        }))
    }

    /// `bytes` of a reservation, with `"all"` resolved to the room one job has on the
    /// smallest device (its budget less the resident memory).
    pub fn resolve(&self, bytes: u64) -> u64 {
        Size::from_bytes(bytes).within(self.room_for_one_job())
    }

    /// What a job alone may have on every device: the least of budget minus resident.
    fn room_for_one_job(&self) -> u64 {
        self.ledgers
            .iter()
            .map(|l| l.budget().saturating_sub(l.resident()))
            .min()
            .unwrap_or(0)
    }

    /// Memory in use on `device` (a CUDA ordinal) by anything that books nothing in our ledger,
    /// from the latest sample.
    pub fn others_used(&self, device: usize) -> u64 {
        let sample = self.sampler.latest();
        let Some(reading) = sample.devices.iter().find(|d| d.index == device) else {
            return 0;
        };
        if self.sampler.probe().is_simulated() {
            return reading.used;
        }
        // Ours: this process, and with a host-wide ledger its peers, whose bookings the ledger
        // already counts. NVML lists host pids, which inside a container match none of ours:
        // then this process counts as libtorch's reserved bytes plus the CUDA context measured
        // at start, and a peer as what it booked.
        let listed = |pid: u32| {
            reading
                .process_used
                .iter()
                .find(|(p, _)| *p == pid)
                .map(|(_, bytes)| *bytes)
        };
        let own = listed(std::process::id()).unwrap_or_else(|| {
            sample.allocator_of(&reading.uuid).map_or(0, |a| a.reserved)
                + self.context_of(&reading.uuid)
        });
        let peers: u64 = self
            .ledgers
            .iter()
            .find(|l| l.device() == device)
            .map(|l| {
                l.peers()
                    .iter()
                    .map(|(pid, booked)| listed(*pid).unwrap_or(*booked))
                    .sum()
            })
            .unwrap_or(0);
        reading.used.saturating_sub(own + peers)
    }

    /// How many jobs of `handler` could start now, memory-wise (at most `slots`).
    pub fn startable(&self, handler: &str, slots: usize) -> usize {
        let Some(need) = self.need(handler).filter(|n| *n > 0) else {
            return slots;
        };
        let best = self
            .ledgers
            .iter()
            .map(|l| {
                let room = l.available().saturating_sub(self.others_used(l.device()));
                usize::try_from(room / need).unwrap_or(usize::MAX)
            })
            .max()
            .unwrap_or(0);
        slots.min(best)
    }

    /// One admission attempt: the device with the most admissible memory, or why none.
    /// Blocking when the ledgers are shared files: it reads them fresh, since peers book
    /// without telling us (a stale read would call a peer's booking "others' use").
    pub fn try_admit(&self, handler: &str, need: u64) -> Result<Reservation, Shortage> {
        self.refresh_shared();
        // One look at every device: (room for a job, memory used by others, booked room).
        let mut candidates: Vec<(u64, u64, u64, &Arc<Ledger>)> = self
            .ledgers
            .iter()
            .map(|l| {
                let others = self.others_used(l.device());
                let available = l.available();
                (available.saturating_sub(others), others, available, l)
            })
            .collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut tried = false;
        for (room, others, _, ledger) in &candidates {
            if *room < need {
                break;
            }
            tried = true;
            if let Some(reservation) = ledger.try_reserve(need, handler, *others) {
                return Ok(reservation);
            }
        }
        // Room seen but not had: a peer booked it meanwhile; it comes back when its job ends.
        if tried {
            return Err(Shortage::Ledger);
        }
        // Would the booked memory alone let it in? Then it is others' use that blocks it.
        let booked_room = candidates.iter().map(|c| c.2).max().unwrap_or(0);
        Err(if booked_room >= need {
            Shortage::Measured
        } else {
            Shortage::Ledger
        })
    }

    /// One admission attempt, off the async threads when the ledger is a shared file.
    async fn try_admit_off_runtime(
        self: &Arc<Self>,
        handler: &str,
        need: u64,
    ) -> Result<Reservation, Shortage> {
        if !self.ledgers.iter().any(|l| l.host().is_some()) {
            return self.try_admit(handler, need);
        }
        let (admission, handler_name) = (self.clone(), handler.to_owned());
        tokio::task::spawn_blocking(move || admission.try_admit(&handler_name, need))
            .await
            .unwrap_or(Err(Shortage::Ledger))
    }

    /// Re-reads the host-wide ledgers (blocking: call it off the async threads).
    pub fn refresh_shared(&self) {
        for ledger in &self.ledgers {
            ledger.refresh_host();
        }
    }

    /// Admits a job of `handler`: `Ok(None)` for CPU handlers, a reservation for GPU ones.
    /// Waits until `deadline` for our own jobs to release memory; answers the retry signal at
    /// once when others use it, or when the deadline passes.
    pub async fn admit(
        self: &Arc<Self>,
        handler: &str,
        deadline: Instant,
    ) -> Result<Option<Reservation>, (Shortage, JobError)> {
        let Some(need) = self.need(handler) else {
            return Ok(None);
        };
        // Peers book in the host-wide ledger without waking us: re-check at the sampling pace.
        let shared = self.ledgers.iter().any(|l| l.host().is_some());
        let recheck = Duration::from_millis(self.config.sample_interval_ms);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Register before trying, so a release in between is not missed.
            released.as_mut().enable();
            match self.try_admit_off_runtime(handler, need).await {
                Ok(reservation) => return Ok(Some(reservation)),
                Err(Shortage::Measured) => {
                    return Err((
                        Shortage::Measured,
                        JobError::gpu_memory_exhausted(self.retry_after()),
                    ))
                }
                Err(Shortage::Ledger) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err((
                    Shortage::Ledger,
                    JobError::gpu_memory_exhausted(self.retry_after()),
                ));
            }
            // Woken or not, try once more: the last try comes after the deadline's wait.
            let wait = if shared { left.min(recheck) } else { left };
            let _ = tokio::time::timeout(wait, released).await;
        }
    }

    /// This process's standing memory on each device (the recycle rule watches it grow).
    pub fn resident_by_device(&self) -> Vec<(usize, u64)> {
        self.ledgers
            .iter()
            .map(|l| (l.device(), l.resident_here()))
            .collect()
    }

    /// Seconds until memory is expected to free up: the soonest expected end among running GPU
    /// jobs (their handler's typical duration minus their elapsed time), within the configured
    /// bounds. Without running jobs to wait for (others hold the memory), 10 s.
    pub fn retry_after(&self) -> u64 {
        let soonest = self
            .ledgers
            .iter()
            .flat_map(|l| l.entries())
            .filter_map(|entry| {
                let typical = self.typical_duration(&entry.handler)?;
                Some(typical.saturating_sub(entry.held_for))
            })
            .min();
        let seconds = match soonest {
            Some(remaining) => remaining.as_secs_f64().ceil() as u64,
            None => 10,
        };
        seconds.clamp(self.config.retry_after_min_s, self.config.retry_after_max_s)
    }

    /// Learns from a finished job: its duration, and its peak when it succeeded.
    pub fn record(&self, handler: &str, took: Duration, peak: Option<u64>, succeeded: bool) {
        if succeeded {
            if let Some(stats) = self.durations.get(handler) {
                stats.record(took);
            }
            if let (Some(footprint), Some(peak)) = (self.footprints.get(handler), peak) {
                footprint.record(peak);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DeviceChoice, HandlerConfig};
    use crate::gpu::{DeviceReading, GpuProbe};

    /// A real-looking card inside a container: NVML lists only host pids, never ours.
    struct ContainerGpu;

    const GB: u64 = 1_000_000_000;

    impl GpuProbe for ContainerGpu {
        fn read(&self) -> Vec<DeviceReading> {
            vec![DeviceReading {
                index: 0,
                uuid: "GPU-container".into(),
                total: 48 * GB,
                used: 23 * GB,
                free: 25 * GB,
                // The peer's 21 GB under its host pid, and 2 GB of someone else's.
                process_used: vec![(40_001, 21 * GB), (40_002, 2 * GB)],
                ..DeviceReading::default()
            }]
        }
    }

    #[test]
    fn a_peers_booked_memory_is_not_counted_again_as_others_when_nvml_pids_do_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.gpu.host_ledger_dir = Some(dir.path().to_path_buf());
        config.handlers.retain(|name, _| name == "echo");
        config.handlers.insert(
            "gpu".into(),
            HandlerConfig {
                kind: Some("echo".into()),
                device: DeviceChoice::Cuda,
                gpu_memory: Some(crate::config::Size::gb(6)),
                ..HandlerConfig::default()
            },
        );
        let handlers = HandlerSet::build(&config, true, true).unwrap();
        let sampler = GpuSampler::new(Arc::new(ContainerGpu));
        let memory =
            MemoryAdmission::new(&config.gpu, &handlers, sampler, BTreeMap::new()).unwrap();
        // A peer worker on the same card: 15 GB of weights and one 6 GB job booked.
        let peer = HostLedger::open(dir.path(), "GPU-container").unwrap();
        peer.set_resident(15 * GB).unwrap();
        assert!(peer.try_reserve(1, 6 * GB, 47 * GB).unwrap());
        memory.refresh_shared();
        assert_eq!(
            memory.others_used(0),
            2 * GB,
            "23 GB used, 21 of them booked by the peer: 2 GB are others'"
        );
        let room = memory.ledgers()[0].available() - memory.others_used(0);
        assert!(room >= 6 * GB, "a 6 GB job fits: {room}");
    }

    /// A card inside a container where this worker is alone: NVML lists one host pid (ours,
    /// under another number), using 3 GB: its CUDA context grew since the start's 0.5 GB.
    struct LoneInContainer;

    impl GpuProbe for LoneInContainer {
        fn read(&self) -> Vec<DeviceReading> {
            vec![DeviceReading {
                index: 0,
                uuid: "GPU-lone".into(),
                total: 48 * GB,
                used: 3 * GB,
                free: 45 * GB,
                process_used: vec![(40_001, 3 * GB)],
                ..DeviceReading::default()
            }]
        }
    }

    #[test]
    fn a_context_that_grew_is_re_measured_idle_not_counted_as_others_memory() {
        let mut config = Config::default();
        config.handlers.retain(|name, _| name == "echo");
        let handlers = HandlerSet::build(&config, true, true).unwrap();
        let sampler = GpuSampler::new(Arc::new(LoneInContainer));
        sampler.refresh();
        let contexts = BTreeMap::from([("GPU-lone".to_owned(), GB / 2)]);
        let memory = MemoryAdmission::new(&config.gpu, &handlers, sampler, contexts).unwrap();
        assert_eq!(
            memory.others_used(0),
            5 * GB / 2,
            "the growth counted as others'"
        );
        // A job ran and ended: the device is idle and due for a measure.
        let ledger = memory.ledgers()[0].clone();
        drop(ledger.try_reserve(GB, "echo", 0).expect("fits"));
        memory.remeasure_idle();
        assert_eq!(memory.others_used(0), 0, "the grown context is ours");
        assert_eq!(ledger.resident_here(), 3 * GB);
    }
}
