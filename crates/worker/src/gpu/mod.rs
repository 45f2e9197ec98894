//! What the worker knows of its GPUs: name, total, free and used memory, and per-process use.
//! NVML on real GPUs ([`nvml`]; a MIG instance is a device of its own, [`mig`]), simulated
//! devices when `[gpu] simulate` is set, nothing on a CPU-only machine. [`sampler`] reads them
//! off the job path; [`allocator`] reads libtorch's own counters; [`identity`] maps NVML's
//! devices to CUDA ordinals; [`cuda_runtime`] says what libtorch's CUDA sees.

pub mod allocator;
pub mod cuda_runtime;
pub mod identity;
pub mod mig;
pub mod nvml;
pub mod sampler;

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{GpuConfig, Size};
use cuda_runtime::DriverInfo;
use identity::{MappingError, PciBusId};
pub use nvml::NvmlProbe;

/// One reading of one device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceReading {
    /// The CUDA ordinal: the device jobs compute on (`Device::Cuda(index)`).
    pub index: usize,
    /// The card's UUID, what ledgers and allocator statistics are keyed by.
    pub uuid: String,
    /// NVML's index of the card (differs from `index` under `CUDA_VISIBLE_DEVICES`).
    pub nvml_index: Option<u32>,
    /// Its PCI address, where known.
    pub pci_bus_id: Option<PciBusId>,
    /// Device name (`NVIDIA H200`, `NVIDIA H100 80GB HBM3 MIG 3g.40gb`, `Simulated GPU (24GB)`).
    pub name: String,
    /// Total memory, bytes.
    pub total: u64,
    /// Free memory, bytes.
    pub free: u64,
    /// Used memory, bytes (by every process).
    pub used: u64,
    /// Memory used per process id, where the driver reports it (host pids in containers).
    pub process_used: Vec<(u32, u64)>,
    /// Where this device is a MIG instance (its figures are the instance's): the UUID of the
    /// card it is part of. `None` for a whole card.
    pub mig_parent: Option<String>,
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

    /// The NVIDIA driver's version and the CUDA version it supports, where known.
    fn driver(&self) -> Option<DriverInfo> {
        None
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
                    uuid: format!("GPU-simulated-{index}"),
                    nvml_index: None,
                    pci_bus_id: None,
                    name: format!("Simulated GPU ({})", self.total),
                    total,
                    free: total - used,
                    used,
                    process_used: Vec::new(),
                    mig_parent: None,
                }
            })
            .collect()
    }

    fn is_simulated(&self) -> bool {
        true
    }
}

/// What the worker can do with the GPUs its probe sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuAccess {
    /// No GPU: CUDA handlers run on the CPU.
    None,
    /// Simulated devices: CUDA handlers compute on the CPU and are accounted as GPU jobs.
    Simulated,
    /// libtorch runs on every device the probe sees, mapped card for card.
    Cuda,
    /// NVML sees GPUs that libtorch cannot use; why (driver too old, CUDA not loaded).
    Broken(String),
}

impl GpuAccess {
    /// Checks the probe's devices against libtorch: the diagnosis where CUDA does not work,
    /// an error where the two disagree on which card is which.
    pub fn check(probe: &dyn GpuProbe, devices: &[DeviceReading]) -> Result<Self, MappingError> {
        if probe.is_simulated() {
            return Ok(Self::Simulated);
        }
        let torch = cuda_runtime::TorchCuda::read();
        if devices.is_empty() {
            if torch.usable() {
                // Jobs would run on a GPU whose memory nobody can measure.
                return Ok(Self::Broken(format!(
                    "libtorch sees {} CUDA device(s) but NVML sees none (a driver/library \
                     version mismatch, or NVIDIA_DRIVER_CAPABILITIES without `utility`): GPU \
                     memory cannot be measured",
                    torch.torch_devices
                )));
            }
            return Ok(Self::None);
        }
        if let Some(why) = cuda_runtime::diagnose(&torch, probe.driver().as_ref()) {
            return Ok(Self::Broken(why));
        }
        let expected: Vec<_> = devices
            .iter()
            .map(|d| (d.index, d.uuid.clone(), d.pci_bus_id))
            .collect();
        identity::verify_with_cuda(&expected, torch.torch_devices, cuda_runtime::pci_bus_id)?;
        Ok(Self::Cuda)
    }

    /// Whether CUDA handlers are accounted as GPU jobs (a working or a simulated GPU).
    pub fn gpu_present(&self) -> bool {
        matches!(self, Self::Cuda | Self::Simulated)
    }

    /// Why CUDA handlers run on the CPU, if they do.
    pub fn cpu_fallback_reason(&self) -> Option<String> {
        match self {
            Self::None => Some("no GPU was found".to_owned()),
            Self::Broken(why) => Some(why.clone()),
            Self::Cuda | Self::Simulated => None,
        }
    }
}

/// The probe for this configuration: simulated if asked, else NVML if present, else none; an
/// error where NVML's devices cannot be mapped to CUDA ordinals.
pub fn detect(config: &GpuConfig) -> Result<Arc<dyn GpuProbe>, MappingError> {
    if let Some(total) = config.simulate {
        return Ok(Arc::new(SimulatedProbe::new(
            total,
            config.simulate_devices,
            config.external_load_file.clone(),
        )));
    }
    Ok(match NvmlProbe::open()? {
        Some(probe) => Arc::new(probe),
        None => Arc::new(NoGpu),
    })
}

/// A GPU found and checked: the probe, the devices it read, and what libtorch can do with
/// them. The one way `serve`, `local`, `test-input`, `check-config` and `gpu-check` find theirs.
pub struct FoundGpu {
    /// The probe, for sampling from now on.
    pub probe: Arc<dyn GpuProbe>,
    /// The devices as first read.
    pub devices: Vec<DeviceReading>,
    /// What libtorch can do with them.
    pub access: GpuAccess,
}

impl FoundGpu {
    /// Reads `probe`'s devices and checks them against libtorch.
    pub fn check(probe: Arc<dyn GpuProbe>) -> Result<Self, MappingError> {
        let devices = probe.read();
        let access = GpuAccess::check(probe.as_ref(), &devices)?;
        Ok(Self {
            probe,
            devices,
            access,
        })
    }
}

/// The GPU `config` asks for ([`detect`]), checked ([`FoundGpu::check`]).
pub fn find(config: &GpuConfig) -> Result<FoundGpu, MappingError> {
    FoundGpu::check(detect(config)?)
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
