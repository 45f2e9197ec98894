//! What the worker knows of its GPU: name, total and free memory. NVML on a real GPU, a
//! simulated device when `[gpu] simulate` is set, nothing on a CPU-only machine.

pub mod allocator;

use std::path::PathBuf;
use std::sync::Arc;

use nvml_wrapper::Nvml;

use crate::config::{GpuConfig, Size};

/// One reading of a device.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSnapshot {
    /// Device name (`NVIDIA H200`, `Simulated GPU (24GB)`).
    pub name: String,
    /// Total memory, bytes.
    pub total: u64,
    /// Free memory, bytes.
    pub free: u64,
}

/// A source of GPU readings.
pub trait GpuProbe: Send + Sync {
    /// The current reading, or `None` where there is no GPU.
    fn snapshot(&self) -> Option<GpuSnapshot>;
    /// Whether this is the simulated device.
    fn is_simulated(&self) -> bool {
        false
    }
}

/// No GPU.
#[derive(Debug, Default)]
pub struct NoGpu;

impl GpuProbe for NoGpu {
    fn snapshot(&self) -> Option<GpuSnapshot> {
        None
    }
}

/// Device 0 through NVML.
pub struct NvmlProbe {
    nvml: Nvml,
}

impl NvmlProbe {
    /// NVML with at least one device, or `None` (no driver, no device).
    pub fn open() -> Option<Self> {
        let nvml = Nvml::init().ok()?;
        (nvml.device_count().ok()? > 0).then_some(Self { nvml })
    }
}

impl GpuProbe for NvmlProbe {
    fn snapshot(&self) -> Option<GpuSnapshot> {
        let device = self.nvml.device_by_index(0).ok()?;
        let memory = device.memory_info().ok()?;
        Some(GpuSnapshot {
            name: device.name().unwrap_or_else(|_| "NVIDIA GPU".to_owned()),
            total: memory.total,
            free: memory.free,
        })
    }
}

/// `[gpu] simulate`: a device of a configured size whose use by others is read from a file.
#[derive(Debug)]
pub struct SimulatedProbe {
    total: Size,
    external_load_file: Option<PathBuf>,
}

impl SimulatedProbe {
    /// A simulated device of `total` bytes.
    pub fn new(total: Size, external_load_file: Option<PathBuf>) -> Self {
        Self {
            total,
            external_load_file,
        }
    }

    /// Memory used by others, from the load file (a size string); zero if absent or unreadable.
    pub fn external_load(&self) -> u64 {
        let Some(path) = &self.external_load_file else {
            return 0;
        };
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.trim().parse::<Size>().ok())
            .map_or(0, Size::bytes)
    }
}

impl GpuProbe for SimulatedProbe {
    fn snapshot(&self) -> Option<GpuSnapshot> {
        let total = self.total.bytes();
        Some(GpuSnapshot {
            name: format!("Simulated GPU ({})", self.total),
            total,
            free: total.saturating_sub(self.external_load()),
        })
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
    fn simulated_free_memory_follows_the_external_load_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("load");
        let probe = SimulatedProbe::new(Size::gb(24), Some(file.clone()));
        assert_eq!(probe.snapshot().unwrap().free, 24_000_000_000);
        std::fs::write(&file, "4GB\n").unwrap();
        assert_eq!(probe.snapshot().unwrap().free, 20_000_000_000);
        assert!(probe.is_simulated());
    }
}
