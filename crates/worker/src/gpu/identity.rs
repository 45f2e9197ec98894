//! Which NVML device is which CUDA ordinal.
//!
//! NVML enumerates every GPU of the host; CUDA enumerates only those `CUDA_VISIBLE_DEVICES`
//! names (by index or by UUID), and by default fastest first. With `CUDA_DEVICE_ORDER=PCI_BUS_ID`
//! (set by [`prepare_cuda_environment`] before CUDA initialises), CUDA's base order is the PCI
//! bus order, which NVML also sees: ordinal `k` is the `k`-th entry of `CUDA_VISIBLE_DEVICES`
//! resolved against the PCI-ordered list. Inside a container the runtime has already applied
//! `NVIDIA_VISIBLE_DEVICES` to what NVML sees, so it is not applied again. A mapping that cannot
//! be established is an error, never a guess.

use std::fmt;

/// The variable CUDA reads to choose its base device order.
pub const CUDA_DEVICE_ORDER: &str = "CUDA_DEVICE_ORDER";
/// The variable that restricts and orders the devices CUDA sees.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// A PCI address `domain:bus:device.function`, comparable whatever its spelling (NVML writes
/// `00000000:3B:00.0`, the CUDA runtime `0000:3b:00.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBusId {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

impl PciBusId {
    /// Parses `domain:bus:device.function` in hex; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_end_matches('\0');
        let mut parts = text.split(':');
        let (domain, bus, rest) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let (device, function) = rest.split_once('.')?;
        Some(Self {
            domain: u32::from_str_radix(domain, 16).ok()?,
            bus: u8::from_str_radix(bus, 16).ok()?,
            device: u8::from_str_radix(device, 16).ok()?,
            function: u8::from_str_radix(function, 16).ok()?,
        })
    }
}

impl fmt::Display for PciBusId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:08X}:{:02X}:{:02X}.{:X}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// One device as NVML lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlDevice {
    /// NVML's index.
    pub nvml_index: u32,
    /// `GPU-xxxxxxxx-...`.
    pub uuid: String,
    /// Its PCI address.
    pub pci_bus_id: PciBusId,
}

/// A device CUDA will use, and which NVML device it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedDevice {
    /// The CUDA ordinal (`Device::Cuda(ordinal)`).
    pub ordinal: usize,
    /// NVML's index of the same card.
    pub nvml_index: u32,
    /// The card's UUID: what ledgers are keyed by.
    pub uuid: String,
    /// Its PCI address.
    pub pci_bus_id: PciBusId,
}

/// Why the devices could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// An entry of `CUDA_VISIBLE_DEVICES` names no device NVML sees.
    #[error(
        "CUDA_VISIBLE_DEVICES={value:?}: entry {entry:?} names no GPU of this machine \
         ({available}); fix the variable or unset it"
    )]
    UnknownEntry {
        /// The whole value.
        value: String,
        /// The entry.
        entry: String,
        /// What NVML sees.
        available: String,
    },
    /// A UUID prefix matches several devices.
    #[error("CUDA_VISIBLE_DEVICES={value:?}: {entry:?} matches more than one GPU")]
    Ambiguous {
        /// The whole value.
        value: String,
        /// The entry.
        entry: String,
    },
    /// The same device is named twice.
    #[error("CUDA_VISIBLE_DEVICES={value:?}: {entry:?} names a GPU already listed")]
    Duplicate {
        /// The whole value.
        value: String,
        /// The entry.
        entry: String,
    },
    /// MIG instances are not GPUs this worker can account for.
    #[error(
        "CUDA_VISIBLE_DEVICES={value:?}: MIG instances ({entry:?}) are not supported; \
         name whole GPUs"
    )]
    Mig {
        /// The whole value.
        value: String,
        /// The entry.
        entry: String,
    },
    /// libtorch disagrees with the mapping (count, or a card's PCI address).
    #[error("libtorch and NVML disagree on the GPUs: {0}")]
    Disagree(String),
}

/// Sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` so that CUDA's ordinals follow the PCI order NVML sees.
/// Call it first thing in `main`, before anything touches CUDA (it is read once, when CUDA
/// initialises).
pub fn prepare_cuda_environment() {
    match std::env::var(CUDA_DEVICE_ORDER) {
        Ok(order) if order == "PCI_BUS_ID" => {}
        previous => {
            if let Ok(order) = previous {
                eprintln!(
                    "runpod-worker: {CUDA_DEVICE_ORDER}={order} replaced by PCI_BUS_ID, so that \
                     CUDA ordinals and NVML devices can be matched"
                );
            }
            // Before the first CUDA call, and before the worker's threads read the
            // environment.
            std::env::set_var(CUDA_DEVICE_ORDER, "PCI_BUS_ID");
        }
    }
}

/// The CUDA-visible devices, in ordinal order, from NVML's list and `CUDA_VISIBLE_DEVICES`
/// (`None`: unset, every device). An empty value, or one starting with `-1` (the usual way to
/// hide every GPU), leaves none.
pub fn map_devices(
    nvml: &[NvmlDevice],
    cuda_visible_devices: Option<&str>,
) -> Result<Vec<MappedDevice>, MappingError> {
    let mut pci_order: Vec<&NvmlDevice> = nvml.iter().collect();
    pci_order.sort_by_key(|d| d.pci_bus_id);
    let mapped = |ordinal: usize, d: &NvmlDevice| MappedDevice {
        ordinal,
        nvml_index: d.nvml_index,
        uuid: d.uuid.clone(),
        pci_bus_id: d.pci_bus_id,
    };
    let Some(value) = cuda_visible_devices else {
        return Ok(pci_order
            .iter()
            .enumerate()
            .map(|(ordinal, d)| mapped(ordinal, d))
            .collect());
    };
    let entries: Vec<&str> = value.split(',').map(str::trim).collect();
    if value.trim().is_empty() || entries.first() == Some(&"-1") {
        return Ok(Vec::new());
    }
    let available = || {
        pci_order
            .iter()
            .enumerate()
            .map(|(i, d)| format!("{i}: {}", d.uuid))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out: Vec<MappedDevice> = Vec::new();
    for entry in entries {
        let device = resolve(entry, &pci_order, value, &available)?;
        if out.iter().any(|m| m.uuid == device.uuid) {
            return Err(MappingError::Duplicate {
                value: value.to_owned(),
                entry: entry.to_owned(),
            });
        }
        out.push(mapped(out.len(), device));
    }
    Ok(out)
}

fn resolve<'a>(
    entry: &str,
    pci_order: &[&'a NvmlDevice],
    value: &str,
    available: &dyn Fn() -> String,
) -> Result<&'a NvmlDevice, MappingError> {
    let unknown = || MappingError::UnknownEntry {
        value: value.to_owned(),
        entry: entry.to_owned(),
        available: available(),
    };
    if entry.starts_with("MIG-") {
        return Err(MappingError::Mig {
            value: value.to_owned(),
            entry: entry.to_owned(),
        });
    }
    if let Ok(index) = entry.parse::<usize>() {
        return pci_order.get(index).copied().ok_or_else(unknown);
    }
    if entry.starts_with("GPU-") {
        // CUDA accepts any unique prefix of a UUID.
        let mut matches = pci_order.iter().filter(|d| d.uuid.starts_with(entry));
        let first = matches.next().ok_or_else(unknown)?;
        if matches.next().is_some() {
            return Err(MappingError::Ambiguous {
                value: value.to_owned(),
                entry: entry.to_owned(),
            });
        }
        return Ok(first);
    }
    Err(unknown())
}

/// Checks the mapping against what libtorch's CUDA runtime reports: as many devices, and each
/// ordinal at the PCI address NVML gives its card (`cuda_pci`; `None` where it cannot be read,
/// and devices whose address NVML did not give are not compared).
pub fn verify_with_cuda(
    mapped: &[(usize, String, Option<PciBusId>)],
    cuda_count: usize,
    cuda_pci: impl Fn(usize) -> Option<PciBusId>,
) -> Result<(), MappingError> {
    if cuda_count != mapped.len() {
        return Err(MappingError::Disagree(format!(
            "libtorch sees {cuda_count} GPU(s), NVML with CUDA_VISIBLE_DEVICES {}",
            mapped.len()
        )));
    }
    for (ordinal, uuid, expected) in mapped {
        let pci = cuda_pci(*ordinal);
        if pci.is_none() && expected.is_some() && mapped.len() > 1 {
            // With one card there is nothing to confuse; with several, a count is no proof.
            return Err(MappingError::Disagree(format!(
                "the CUDA runtime does not say where device {ordinal} is, so it cannot be told \
                 apart from the others"
            )));
        }
        if let (Some(expected), Some(pci)) = (expected, pci) {
            if pci != *expected {
                return Err(MappingError::Disagree(format!(
                    "CUDA device {ordinal} is at PCI {pci}, but the card mapped to it ({uuid}) \
                     is at {expected}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two cards, NVML listing them out of PCI order to show the order is PCI's, not NVML's.
    fn two_cards() -> Vec<NvmlDevice> {
        vec![
            NvmlDevice {
                nvml_index: 0,
                uuid: "GPU-bbbb2222-0000-0000-0000-000000000000".into(),
                pci_bus_id: PciBusId::parse("00000000:81:00.0").unwrap(),
            },
            NvmlDevice {
                nvml_index: 1,
                uuid: "GPU-aaaa1111-0000-0000-0000-000000000000".into(),
                pci_bus_id: PciBusId::parse("00000000:3B:00.0").unwrap(),
            },
        ]
    }

    fn uuids(mapped: &[MappedDevice]) -> Vec<(usize, &str)> {
        mapped.iter().map(|m| (m.ordinal, &m.uuid[..8])).collect()
    }

    #[test]
    fn pci_addresses_compare_equal_in_nvml_and_cuda_spelling() {
        assert_eq!(
            PciBusId::parse("00000000:3B:00.0"),
            PciBusId::parse("0000:3b:00.0")
        );
        assert_eq!(
            PciBusId::parse("0000:3b:00.0").unwrap().to_string(),
            "00000000:3B:00.0"
        );
        assert_eq!(PciBusId::parse("3b:00.0"), None);
        assert_eq!(PciBusId::parse("zz:00:00.0"), None);
    }

    #[test]
    fn without_cuda_visible_devices_every_card_in_pci_order() {
        let mapped = map_devices(&two_cards(), None).unwrap();
        assert_eq!(uuids(&mapped), vec![(0, "GPU-aaaa"), (1, "GPU-bbbb")]);
        assert_eq!(mapped[0].nvml_index, 1, "NVML's index is not the ordinal");
    }

    #[test]
    fn cuda_visible_devices_one_is_the_second_card_in_pci_order_as_ordinal_zero() {
        let mapped = map_devices(&two_cards(), Some("1")).unwrap();
        assert_eq!(uuids(&mapped), vec![(0, "GPU-bbbb")]);
        assert_eq!(mapped[0].nvml_index, 0);
    }

    #[test]
    fn uuid_entries_and_unique_prefixes_name_cards() {
        let mapped = map_devices(
            &two_cards(),
            Some("GPU-bbbb2222-0000-0000-0000-000000000000"),
        )
        .unwrap();
        assert_eq!(uuids(&mapped), vec![(0, "GPU-bbbb")]);
        let mapped = map_devices(&two_cards(), Some("GPU-aaaa")).unwrap();
        assert_eq!(uuids(&mapped), vec![(0, "GPU-aaaa")]);
        assert!(matches!(
            map_devices(&two_cards(), Some("GPU-")),
            Err(MappingError::Ambiguous { .. })
        ));
    }

    #[test]
    fn a_reordered_list_reorders_the_ordinals() {
        let mapped = map_devices(&two_cards(), Some("1, 0")).unwrap();
        assert_eq!(uuids(&mapped), vec![(0, "GPU-bbbb"), (1, "GPU-aaaa")]);
        let mixed = map_devices(&two_cards(), Some("GPU-bbbb,0")).unwrap();
        assert_eq!(mapped, mixed);
    }

    #[test]
    fn an_invalid_entry_is_refused_with_what_exists_instead_of_a_guess() {
        for value in ["2", "0,7", "gpu0", "GPU-cccc"] {
            let error = map_devices(&two_cards(), Some(value)).unwrap_err();
            let text = error.to_string();
            assert!(matches!(error, MappingError::UnknownEntry { .. }), "{text}");
            assert!(
                text.contains("0: GPU-aaaa") && text.contains("1: GPU-bbbb"),
                "{text}"
            );
        }
        assert!(matches!(
            map_devices(&two_cards(), Some("0,GPU-aaaa")),
            Err(MappingError::Duplicate { .. })
        ));
        assert!(matches!(
            map_devices(&two_cards(), Some("MIG-1234")),
            Err(MappingError::Mig { .. })
        ));
    }

    #[test]
    fn empty_or_minus_one_hides_every_card() {
        assert!(map_devices(&two_cards(), Some("")).unwrap().is_empty());
        assert!(map_devices(&two_cards(), Some("-1")).unwrap().is_empty());
    }

    #[test]
    fn libtorch_must_agree_on_count_and_pci_addresses() {
        let mapped: Vec<_> = map_devices(&two_cards(), Some("1"))
            .unwrap()
            .into_iter()
            .map(|m| (m.ordinal, m.uuid, Some(m.pci_bus_id)))
            .collect();
        let at = |text: &'static str| move |_| PciBusId::parse(text);
        assert!(verify_with_cuda(&mapped, 1, at("0000:81:00.0")).is_ok());
        let wrong_card = verify_with_cuda(&mapped, 1, at("0000:3b:00.0")).unwrap_err();
        assert!(wrong_card.to_string().contains("PCI"), "{wrong_card}");
        assert!(verify_with_cuda(&mapped, 2, at("0000:81:00.0")).is_err());
        assert!(
            verify_with_cuda(&mapped, 1, |_| None).is_ok(),
            "one card: nothing to confuse"
        );
        let both: Vec<_> = map_devices(&two_cards(), None)
            .unwrap()
            .into_iter()
            .map(|m| (m.ordinal, m.uuid, Some(m.pci_bus_id)))
            .collect();
        assert!(
            verify_with_cuda(&both, 2, |_| None).is_err(),
            "two cards and no addresses from CUDA: no proof of which is which"
        );
    }
}
