//! What the worker knows of its GPUs: name, total, free and used memory, and per-process use.
//! NVML on real GPUs, simulated devices when `[gpu] simulate` is set, nothing on a CPU-only
//! machine. [`sampler`] reads them off the job path; [`allocator`] reads libtorch's own
//! counters.

pub mod allocator;
pub mod sampler;

use std::path::PathBuf;
use std::sync::Arc;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;

use crate::config::{GpuConfig, Size};

/// One reading of one device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceReading {
    /// Device index (NVML order).
    pub index: usize,
    /// Device name (`NVIDIA H200`, `Simulated GPU (24GB)`).
    pub name: String,
    /// Total memory, bytes.
    pub total: u64,
    /// Free memory, bytes.
    pub free: u64,
    /// Used memory, bytes (by every process).
    pub used: u64,
    /// Memory used per process id, where the driver reports it (host pids in containers).
    pub process_used: Vec<(u32, u64)>,
}

/// The older single-device view (`/health`'s seed fields).
pub type GpuSnapshot = DeviceReading;

/// A source of GPU readings.
pub trait GpuProbe: Send + Sync {
    /// Every device now; empty where there is no GPU.
    fn read(&self) -> Vec<DeviceReading>;

    /// Device 0, if any.
    fn snapshot(&self) -> Option<DeviceReading> {
        self.read().into_iter().next()
    }

    /// Whether these are simulated devices.
    fn is_simulated(&self) -> bool {
        false
    }
}

/// No GPU.
#[derive(Debug, Default)]
pub struct NoGpu;

impl GpuProbe for NoGpu {
    fn read(&self) -> Vec<DeviceReading> {
        Vec::new()
    }
}

/// Every visible device through NVML.
pub struct NvmlProbe {
    nvml: Nvml,
    count: u32,
}

impl NvmlProbe {
    /// NVML with at least one device, or `None` (no driver, no device).
    pub fn open() -> Option<Self> {
        let nvml = Nvml::init().ok()?;
        let count = nvml.device_count().ok()?;
        (count > 0).then_some(Self { nvml, count })
    }
}

impl GpuProbe for NvmlProbe {
    fn read(&self) -> Vec<DeviceReading> {
        (0..self.count)
            .filter_map(|index| {
                let device = self.nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok()?;
                let process_used = device
                    .running_compute_processes()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|p| match p.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => Some((p.pid, bytes)),
                        UsedGpuMemory::Unavailable => None,
                    })
                    .collect();
                Some(DeviceReading {
                    index: index as usize,
                    name: device.name().unwrap_or_else(|_| "NVIDIA GPU".to_owned()),
                    total: memory.total,
                    free: memory.free,
                    used: memory.used,
                    process_used,
                })
            })
            .collect()
    }
}

/// `[gpu] simulate`: devices of a configured size whose use by others is read from a file.
#[derive(Debug)]
pub struct SimulatedProbe {
    total: Size,
    count: usize,
    external_load_file: Option<PathBuf>,
}

impl SimulatedProbe {
    /// `count` simulated devices of `total` bytes each.
    pub fn new(total: Size, count: usize, external_load_file: Option<PathBuf>) -> Self {
        Self {
            total,
            count: count.max(1),
            external_load_file,
        }
    }

    /// Memory used by others on each device: the load file holds one size per device,
    /// comma-separated (`"3GB"` or `"3GB,0GB"`); absent or unreadable means none.
    pub fn external_load(&self, device: usize) -> u64 {
        let Some(path) = &self.external_load_file else {
            return 0;
        };
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.split(',').nth(device).map(str::to_owned))
            .and_then(|size| size.trim().parse::<Size>().ok())
            .map_or(0, Size::bytes)
    }
}

impl GpuProbe for SimulatedProbe {
    fn read(&self) -> Vec<DeviceReading> {
        (0..self.count)
            .map(|index| {
                let total = self.total.bytes();
                let used = self.external_load(index).min(total);
                DeviceReading {
                    index,
                    name: format!("Simulated GPU ({})", self.total),
                    total,
                    free: total - used,
                    used,
                    process_used: Vec::new(),
                }
            })
            .collect()
    }

    fn is_simulated(&self) -> bool {
        true
    }
}

/// The probe for this configuration: simulated if asked, else NVML if present, else none.
pub fn detect(config: &GpuConfig) -> Arc<dyn GpuProbe> {
    if let Some(total) = config.simulate {
        return Arc::new(SimulatedProbe::new(
            total,
            config.simulate_devices,
            config.external_load_file.clone(),
        ));
    }
    match NvmlProbe::open() {
        Some(probe) => Arc::new(probe),
        None => Arc::new(NoGpu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_free_memory_follows_the_external_load_file_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("load");
        let probe = SimulatedProbe::new(Size::gb(24), 2, Some(file.clone()));
        assert_eq!(probe.read()[0].free, 24_000_000_000);
        std::fs::write(&file, "4GB\n").unwrap();
        assert_eq!(probe.read()[0].free, 20_000_000_000);
        assert_eq!(probe.read()[1].free, 24_000_000_000);
        std::fs::write(&file, "1GB, 2GB").unwrap();
        assert_eq!(probe.read()[1].used, 2_000_000_000);
        assert!(probe.is_simulated());
        assert_eq!(probe.read().len(), 2);
    }
}
