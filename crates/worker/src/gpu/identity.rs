//! Which NVML device is which CUDA ordinal.
//!
//! NVML enumerates every GPU of the host; CUDA enumerates only those `CUDA_VISIBLE_DEVICES`
//! names (by index or by UUID), and by default fastest first. With `CUDA_DEVICE_ORDER=PCI_BUS_ID`
//! (set by [`prepare_cuda_environment`] before CUDA initialises), CUDA's base order is the PCI
//! bus order, which NVML also sees: ordinal `k` is the `k`-th entry of `CUDA_VISIBLE_DEVICES`
//! resolved against the PCI-ordered list. Inside a container the runtime has already applied
//! `NVIDIA_VISIBLE_DEVICES` to what NVML sees, so it is not applied again. A mapping that cannot
//! be established is an error, never a guess. A card in MIG mode is computed on through its MIG
//! instances, each a device of its own ([`super::mig`]).

use std::fmt;

use super::mig::{self, MigOf, MigState, Target};

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
    /// Whether it is in MIG mode, and which of its MIG instances this process sees.
    pub mig: MigState,
}

impl NvmlDevice {
    /// A card not in MIG mode.
    pub fn card(nvml_index: u32, uuid: &str, pci_bus_id: PciBusId) -> Self {
        Self {
            nvml_index,
            uuid: uuid.to_owned(),
            pci_bus_id,
            mig: MigState::Off,
        }
    }
}

/// A device CUDA will use, and which NVML device it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedDevice {
    /// The CUDA ordinal (`Device::Cuda(ordinal)`).
    pub ordinal: usize,
    /// NVML's index of the card (of the card a MIG instance is part of).
    pub nvml_index: u32,
    /// The card's UUID, or a MIG instance's `MIG-...` UUID: what ledgers are keyed by.
    pub uuid: String,
    /// Its PCI address (a MIG instance's is its card's).
    pub pci_bus_id: PciBusId,
    /// Where it is a MIG instance: which one, of which card.
    pub mig: Option<MigOf>,
}

impl MappedDevice {
    fn new(ordinal: usize, target: Target<'_>) -> Self {
        match target {
            Target::Card(card) => Self {
                ordinal,
                nvml_index: card.nvml_index,
                uuid: card.uuid.clone(),
                pci_bus_id: card.pci_bus_id,
                mig: None,
            },
            Target::Instance(card, instance) => Self {
                ordinal,
                nvml_index: card.nvml_index,
                uuid: instance.uuid.clone(),
                pci_bus_id: card.pci_bus_id,
                mig: Some(MigOf {
                    mig_index: instance.mig_index,
                    parent_uuid: card.uuid.clone(),
                }),
            },
        }
    }
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
    /// A card in MIG mode is named as a whole: CUDA computes only on its MIG instances.
    #[error(
        "CUDA_VISIBLE_DEVICES={value:?}: {entry:?} is GPU {card}, which is in MIG mode: CUDA \
         cannot compute on it as a whole; name one of its MIG instances instead ({instances})"
    )]
    MigWholeCard {
        /// The whole value.
        value: String,
        /// The entry.
        entry: String,
        /// The card's UUID.
        card: String,
        /// Its visible instances' UUIDs, or that none is visible.
        instances: String,
    },
    /// MIG mode is on and no MIG instance is visible: there is nothing CUDA could compute on.
    #[error(
        "GPU {cards} is in MIG mode but none of its MIG instances is visible to this process, \
         and CUDA cannot compute on a GPU in MIG mode as a whole: set \
         CUDA_VISIBLE_DEVICES=MIG-<uuid> to the instance this worker should use (`nvidia-smi -L` \
         lists them), or expose one to the container (NVIDIA_VISIBLE_DEVICES=MIG-<uuid>)"
    )]
    MigNoInstance {
        /// The UUIDs of the cards in MIG mode.
        cards: String,
    },
    /// Several MIG instances (or instances and whole cards) are visible and
    /// `CUDA_VISIBLE_DEVICES` is unset: which one CUDA computes on cannot be told.
    #[error(
        "MIG mode is on and {visible} are visible, so which of them CUDA computes on cannot be \
         told (CUDA enumerates one MIG instance per process): set CUDA_VISIBLE_DEVICES to the \
         instance this worker should use, e.g. CUDA_VISIBLE_DEVICES={example}"
    )]
    MigAmbiguous {
        /// What is visible, counted and named.
        visible: String,
        /// One instance's UUID, for the example.
        example: String,
    },
    /// NVML cannot say whether a card is in MIG mode, so its usable memory is unknown.
    #[error(
        "cannot tell whether GPU {card} is in MIG mode (NVML: {reason}), so its memory cannot be \
         known: check the driver (`nvidia-smi -q` shows \"MIG Mode\"), or set \
         CUDA_VISIBLE_DEVICES to name only other GPUs"
    )]
    MigModeUnknown {
        /// The card's UUID.
        card: String,
        /// NVML's error.
        reason: String,
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
/// (`None`: unset, every device; see [`super::mig`] for cards in MIG mode). An empty value, or
/// one starting with `-1` (the usual way to hide every GPU), leaves none.
pub fn map_devices(
    nvml: &[NvmlDevice],
    cuda_visible_devices: Option<&str>,
) -> Result<Vec<MappedDevice>, MappingError> {
    let mut pci_order: Vec<&NvmlDevice> = nvml.iter().collect();
    pci_order.sort_by_key(|d| d.pci_bus_id);
    let Some(value) = cuda_visible_devices else {
        return Ok(mig::every_visible(&pci_order)?
            .into_iter()
            .enumerate()
            .map(|(ordinal, target)| MappedDevice::new(ordinal, target))
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
            .map(|(i, d)| format!("{i}: {}", mig::describe(d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out: Vec<MappedDevice> = Vec::new();
    for entry in entries {
        let target = resolve(entry, &pci_order, value, &available)?;
        if out.iter().any(|m| m.uuid == target.uuid()) {
            return Err(MappingError::Duplicate {
                value: value.to_owned(),
                entry: entry.to_owned(),
            });
        }
        out.push(MappedDevice::new(out.len(), target));
    }
    Ok(out)
}

fn resolve<'a>(
    entry: &str,
    pci_order: &[&'a NvmlDevice],
    value: &str,
    available: &dyn Fn() -> String,
) -> Result<Target<'a>, MappingError> {
    let unknown = || MappingError::UnknownEntry {
        value: value.to_owned(),
        entry: entry.to_owned(),
        available: available(),
    };
    if entry.starts_with("MIG-") {
        return mig::instance(entry, pci_order, value)?.ok_or_else(unknown);
    }
    if let Ok(index) = entry.parse::<usize>() {
        let card = pci_order.get(index).copied().ok_or_else(unknown)?;
        return mig::whole_card(card, value, entry);
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
        return mig::whole_card(first, value, entry);
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
        let instances = mapped
            .iter()
            .filter(|(_, uuid, _)| uuid.starts_with("MIG-"))
            .count();
        let hint = if instances > 1 && cuda_count < mapped.len() {
            "; CUDA enumerates one MIG instance per process: run one worker per instance, each \
             with CUDA_VISIBLE_DEVICES naming its own"
        } else {
            ""
        };
        return Err(MappingError::Disagree(format!(
            "libtorch sees {cuda_count} GPU(s), NVML with CUDA_VISIBLE_DEVICES {}{hint}",
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
            NvmlDevice::card(
                0,
                "GPU-bbbb2222-0000-0000-0000-000000000000",
                PciBusId::parse("00000000:81:00.0").unwrap(),
            ),
            NvmlDevice::card(
                1,
                "GPU-aaaa1111-0000-0000-0000-000000000000",
                PciBusId::parse("00000000:3B:00.0").unwrap(),
            ),
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
            Err(MappingError::UnknownEntry { .. })
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
