//! MIG: a card split into isolated instances (a "24 GB slice" of an H100 is one). CUDA cannot
//! compute on a card in MIG mode as a whole, only on its instances, and each instance has its own
//! memory: the ledger, `/health` and the console must use the instance's figures, never the
//! card's. libtorch numbers the instances it sees from 0, like cards.
//!
//! Which instance CUDA uses must be certain. With `CUDA_VISIBLE_DEVICES=MIG-<uuid>,...` it is
//! each entry in turn. Without the variable it is certain only when exactly one instance, and no
//! whole card, is visible (the usual container: the runtime exposed one instance); anything else
//! is a named error that says which variable to set. CUDA 12 enumerates at most one MIG instance
//! per process (NVIDIA's MIG user guide), so two instances named in the variable stop at the
//! check against libtorch's device count ([`super::identity::verify_with_cuda`]), with a hint.

use super::identity::{MappingError, NvmlDevice};

/// Whether a card is in MIG mode, as NVML says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MigState {
    /// Not in MIG mode (or not capable of it): CUDA computes on the whole card.
    #[default]
    Off,
    /// In MIG mode: CUDA computes only on these instances, the ones NVML lets this process see
    /// (inside a container, those the runtime exposed; none at all is possible).
    On(Vec<MigInstance>),
    /// NVML could not say (its error): the card's memory cannot be known.
    Unknown(String),
}

/// One MIG instance NVML lets this process see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigInstance {
    /// NVML's index of the instance on its card (`nvmlDeviceGetMigDeviceHandleByIndex`).
    pub mig_index: u32,
    /// `MIG-xxxxxxxx-...`: what `CUDA_VISIBLE_DEVICES` names it by, and what its ledger is
    /// keyed by.
    pub uuid: String,
}

/// Where a mapped device is a MIG instance: which one, of which card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigOf {
    /// NVML's index of the instance on its card.
    pub mig_index: u32,
    /// The UUID of the card it is part of.
    pub parent_uuid: String,
}

/// Something CUDA can compute on: a whole card, or one MIG instance of a card.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target<'a> {
    /// A card not in MIG mode.
    Card(&'a NvmlDevice),
    /// A MIG instance, and the card it is part of.
    Instance(&'a NvmlDevice, &'a MigInstance),
}

impl Target<'_> {
    /// The UUID CUDA and the ledger know it by.
    pub(super) fn uuid(&self) -> &str {
        match self {
            Self::Card(card) => &card.uuid,
            Self::Instance(_, instance) => &instance.uuid,
        }
    }
}

/// The card as a compute target, when CUDA can compute on it as a whole.
pub(super) fn whole_card<'a>(
    card: &'a NvmlDevice,
    value: &str,
    entry: &str,
) -> Result<Target<'a>, MappingError> {
    match &card.mig {
        MigState::Off => Ok(Target::Card(card)),
        MigState::On(instances) => Err(MappingError::MigWholeCard {
            value: value.to_owned(),
            entry: entry.to_owned(),
            card: card.uuid.clone(),
            instances: listed(instances.iter().map(|i| i.uuid.as_str()))
                .unwrap_or_else(|| "none of them is visible to this process".to_owned()),
        }),
        MigState::Unknown(reason) => Err(unknown(card, reason)),
    }
}

/// The instance an `MIG-` entry names: its full UUID or a unique prefix of it.
pub(super) fn instance<'a>(
    entry: &str,
    cards: &[&'a NvmlDevice],
    value: &str,
) -> Result<Option<Target<'a>>, MappingError> {
    let mut matches = cards.iter().flat_map(|card| match &card.mig {
        MigState::On(instances) => instances
            .iter()
            .filter(|i| i.uuid.starts_with(entry))
            .map(|i| Target::Instance(card, i))
            .collect(),
        MigState::Off | MigState::Unknown(_) => Vec::new(),
    });
    let Some(first) = matches.next() else {
        return Ok(None);
    };
    if matches.next().is_some() {
        return Err(MappingError::Ambiguous {
            value: value.to_owned(),
            entry: entry.to_owned(),
        });
    }
    Ok(Some(first))
}

/// Without `CUDA_VISIBLE_DEVICES`: every card in PCI order where no card is in MIG mode; the one
/// visible instance where that is all there is; otherwise a named error, since which device
/// CUDA would compute on cannot be told.
pub(super) fn every_visible<'a>(
    pci_order: &[&'a NvmlDevice],
) -> Result<Vec<Target<'a>>, MappingError> {
    // Any card might be in MIG mode: nothing can be said until each is known.
    if let Some(undecided) = pci_order.iter().find_map(|c| match &c.mig {
        MigState::Unknown(reason) => Some(unknown(c, reason)),
        MigState::Off | MigState::On(_) => None,
    }) {
        return Err(undecided);
    }
    let in_mig_mode: Vec<&NvmlDevice> = pci_order
        .iter()
        .copied()
        .filter(|c| matches!(c.mig, MigState::On(_)))
        .collect();
    if in_mig_mode.is_empty() {
        return Ok(pci_order.iter().map(|c| Target::Card(c)).collect());
    }
    let whole = pci_order.len() - in_mig_mode.len();
    let instances: Vec<Target<'a>> = in_mig_mode
        .iter()
        .flat_map(|card| match &card.mig {
            MigState::On(instances) => instances
                .iter()
                .map(|i| Target::Instance(card, i))
                .collect(),
            MigState::Off | MigState::Unknown(_) => Vec::new(),
        })
        .collect();
    match (instances.as_slice(), whole) {
        ([only], 0) => Ok(vec![*only]),
        ([], _) => Err(MappingError::MigNoInstance {
            cards: in_mig_mode
                .iter()
                .map(|c| c.uuid.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
        (several, _) => {
            let uuids = listed(several.iter().map(Target::uuid)).unwrap_or_default();
            let beside = match whole {
                0 => String::new(),
                n => format!(" beside {n} whole GPU(s)"),
            };
            Err(MappingError::MigAmbiguous {
                visible: format!("{} MIG instances ({uuids}){beside}", several.len()),
                example: several[0].uuid().to_owned(),
            })
        }
    }
}

/// What [`MappingError::UnknownEntry`] lists for a card: its UUID, and its instances where it is
/// in MIG mode.
pub(super) fn describe(card: &NvmlDevice) -> String {
    match &card.mig {
        MigState::Off => card.uuid.clone(),
        MigState::On(instances) => format!(
            "{} in MIG mode, instances: {}",
            card.uuid,
            listed(instances.iter().map(|i| i.uuid.as_str()))
                .unwrap_or_else(|| "none visible".to_owned())
        ),
        MigState::Unknown(_) => format!("{} (MIG mode unknown)", card.uuid),
    }
}

fn unknown(card: &NvmlDevice, reason: &str) -> MappingError {
    MappingError::MigModeUnknown {
        card: card.uuid.clone(),
        reason: reason.to_owned(),
    }
}

fn listed<'a>(uuids: impl Iterator<Item = &'a str>) -> Option<String> {
    let uuids: Vec<&str> = uuids.collect();
    (!uuids.is_empty()).then(|| uuids.join(", "))
}
