//! The NVML probe: the CUDA-visible devices (whole cards, or MIG instances) and their memory.
//! NVML itself sits behind [`NvmlSource`] so that the mapping and the readings, MIG among them,
//! are tested with a fake; the real source is the few calls below.

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use super::cuda_runtime::{CudaVersion, DriverInfo};
use super::identity::{self, MappedDevice, MappingError, NvmlDevice, PciBusId};
use super::mig::{MigInstance, MigState};
use super::{DeviceReading, GpuProbe};

/// `nvmlDeviceGetMigMode`'s "enabled" (`NVML_DEVICE_MIG_ENABLE`; nvml-wrapper does not
/// re-export its sys crate).
const MIG_ENABLED: u32 = 1;

/// One device handle's figures now: a whole card's, or a MIG instance's.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HandleReading {
    /// NVML's name (`NVIDIA H100 80GB HBM3`; an instance's names its profile,
    /// `NVIDIA H100 80GB HBM3 MIG 3g.40gb`).
    pub name: String,
    /// Total memory, bytes.
    pub total: u64,
    /// Free memory, bytes.
    pub free: u64,
    /// Used memory, bytes.
    pub used: u64,
    /// Memory per process id, where the driver reports it.
    pub process_used: Vec<(u32, u64)>,
}

/// What the probe needs of NVML.
pub trait NvmlSource: Send + Sync {
    /// Every card, with its MIG mode and the MIG instances this process can see; an error
    /// where a card cannot be identified.
    fn list(&self) -> Result<Vec<NvmlDevice>, MappingError>;

    /// A card's figures (`mig_index` `None`), or those of its MIG instance `mig_index`.
    fn read(&self, nvml_index: u32, mig_index: Option<u32>) -> Option<HandleReading>;

    /// The driver's version and the CUDA version it supports, where known.
    fn driver(&self) -> Option<DriverInfo> {
        None
    }
}

/// The CUDA-visible devices through NVML, each mapped to its CUDA ordinal.
pub struct NvmlProbe {
    source: Box<dyn NvmlSource>,
    devices: Vec<MappedDevice>,
}

impl NvmlProbe {
    /// NVML with at least one CUDA-visible device, `Ok(None)` where there is no driver or no
    /// visible device, or the reason the devices cannot be mapped to CUDA ordinals.
    pub fn open() -> Result<Option<Self>, MappingError> {
        let Ok(nvml) = Nvml::init() else {
            return Ok(None);
        };
        let visible = std::env::var(identity::CUDA_VISIBLE_DEVICES).ok();
        Self::with_source(Box::new(nvml), visible.as_deref())
    }

    /// The devices of `source` that CUDA uses under `cuda_visible_devices`, `Ok(None)` where
    /// there are none.
    pub fn with_source(
        source: Box<dyn NvmlSource>,
        cuda_visible_devices: Option<&str>,
    ) -> Result<Option<Self>, MappingError> {
        let listed = source.list()?;
        let devices = identity::map_devices(&listed, cuda_visible_devices)?;
        Ok((!devices.is_empty()).then_some(Self { source, devices }))
    }

    /// The mapped devices, in ordinal order.
    pub fn devices(&self) -> &[MappedDevice] {
        &self.devices
    }
}

impl GpuProbe for NvmlProbe {
    fn read(&self) -> Vec<DeviceReading> {
        self.devices
            .iter()
            .filter_map(|mapped| {
                let mig_index = mapped.mig.as_ref().map(|m| m.mig_index);
                let reading = self.source.read(mapped.nvml_index, mig_index)?;
                let name = match &mapped.mig {
                    // Drivers name an instance by its card and profile; should one not,
                    // still say that this is a slice, not the card.
                    Some(_) if !reading.name.contains("MIG") => {
                        format!("{} (MIG instance)", reading.name)
                    }
                    _ => reading.name,
                };
                Some(DeviceReading {
                    index: mapped.ordinal,
                    uuid: mapped.uuid.clone(),
                    nvml_index: Some(mapped.nvml_index),
                    pci_bus_id: Some(mapped.pci_bus_id),
                    name,
                    total: reading.total,
                    free: reading.free,
                    used: reading.used,
                    process_used: reading.process_used,
                    mig_parent: mapped.mig.as_ref().map(|m| m.parent_uuid.clone()),
                })
            })
            .collect()
    }

    fn driver(&self) -> Option<DriverInfo> {
        self.source.driver()
    }
}

impl NvmlSource for Nvml {
    fn list(&self) -> Result<Vec<NvmlDevice>, MappingError> {
        let count = self.device_count().unwrap_or(0);
        let listed: Vec<NvmlDevice> = (0..count)
            .filter_map(|index| {
                let device = self.device_by_index(index).ok()?;
                Some(NvmlDevice {
                    nvml_index: index,
                    uuid: device.uuid().ok()?,
                    pci_bus_id: PciBusId::parse(&device.pci_info().ok()?.bus_id)?,
                    mig: mig_state(&device),
                })
            })
            .collect();
        if listed.len() != count as usize {
            return Err(MappingError::Disagree(format!(
                "NVML lists {count} GPU(s) but the UUID or PCI address of {} cannot be read",
                count as usize - listed.len()
            )));
        }
        Ok(listed)
    }

    fn read(&self, nvml_index: u32, mig_index: Option<u32>) -> Option<HandleReading> {
        let card = self.device_by_index(nvml_index).ok()?;
        // An instance's handle answers for the instance alone: its memory, its processes.
        let device = match mig_index {
            Some(index) => card.mig_device_by_index(index).ok()?,
            None => card,
        };
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
        Some(HandleReading {
            name: device.name().unwrap_or_else(|_| "NVIDIA GPU".to_owned()),
            total: memory.total,
            free: memory.free,
            used: memory.used,
            process_used,
        })
    }

    fn driver(&self) -> Option<DriverInfo> {
        Some(DriverInfo {
            version: self.sys_driver_version().ok()?,
            cuda: CudaVersion(self.sys_cuda_driver_version().ok()?),
        })
    }
}

/// A card's MIG mode, and the instances this process can see where it is on. A card or driver
/// without MIG says so (not supported, or no such function); any other error leaves it unknown.
fn mig_state(card: &Device<'_>) -> MigState {
    match card.mig_mode() {
        Ok(mode) if mode.current == MIG_ENABLED => {
            // The count is the most the card can hold; indices without an instance (or with
            // one this container was not given) answer with an error and are skipped.
            let most = card.mig_device_count().unwrap_or(0);
            let instances = (0..most)
                .filter_map(|mig_index| {
                    let instance = card.mig_device_by_index(mig_index).ok()?;
                    Some(MigInstance {
                        mig_index,
                        uuid: instance.uuid().ok()?,
                    })
                })
                .collect();
            MigState::On(instances)
        }
        Ok(_)
        | Err(
            NvmlError::NotSupported
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_),
        ) => MigState::Off,
        Err(e) => MigState::Unknown(e.to_string()),
    }
}

#[cfg(test)]
#[path = "mig_tests.rs"]
mod tests;
