//! MIG with a fake NVML: what the probe reports (the instance's memory, never the card's), how
//! `CUDA_VISIBLE_DEVICES` maps instances to CUDA ordinals, and the named errors where it cannot
//! be told which device CUDA computes on.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::*;
use crate::admission::MemoryAdmission;
use crate::config::{Config, DeviceChoice, HandlerConfig};
use crate::gpu::mig::{MigInstance, MigState};
use crate::gpu::sampler::GpuSampler;
use crate::handlers::HandlerSet;

const GB: u64 = 1_000_000_000;
const CARD: &str = "GPU-h100card-0000-0000-0000-000000000000";
const BIG: &str = "MIG-aaaa1111-0000-0000-0000-000000000000";
const SMALL: &str = "MIG-bbbb2222-0000-0000-0000-000000000000";

/// NVML as a table: the cards it lists, and each handle's figures.
struct FakeNvml {
    cards: Vec<NvmlDevice>,
    readings: HashMap<(u32, Option<u32>), HandleReading>,
}

impl NvmlSource for FakeNvml {
    fn list(&self) -> Result<Vec<NvmlDevice>, MappingError> {
        Ok(self.cards.clone())
    }

    fn read(&self, nvml_index: u32, mig_index: Option<u32>) -> Option<HandleReading> {
        self.readings.get(&(nvml_index, mig_index)).cloned()
    }
}

fn reading(name: &str, total: u64, used: u64) -> HandleReading {
    HandleReading {
        name: name.to_owned(),
        total,
        free: total - used,
        used,
        process_used: Vec::new(),
    }
}

/// An 80 GB card in MIG mode; `visible` of its two instances (a 40 GB one at MIG index 1, a
/// 20 GB one at 5) can be seen by this process.
fn h100_in_mig_mode(visible: &[&str]) -> FakeNvml {
    let instances = [(1, BIG), (5, SMALL)]
        .into_iter()
        .filter(|(_, uuid)| visible.contains(uuid))
        .map(|(mig_index, uuid)| MigInstance {
            mig_index,
            uuid: uuid.to_owned(),
        })
        .collect();
    let mut card = NvmlDevice::card(0, CARD, PciBusId::parse("00000000:1B:00.0").unwrap());
    card.mig = MigState::On(instances);
    FakeNvml {
        cards: vec![card],
        readings: HashMap::from([
            (
                (0, None),
                reading("NVIDIA H100 80GB HBM3", 80 * GB, 31 * GB),
            ),
            (
                (0, Some(1)),
                reading("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 40 * GB, 3 * GB),
            ),
            (
                (0, Some(5)),
                reading("NVIDIA H100 80GB HBM3 MIG 2g.20gb", 20 * GB, GB),
            ),
        ]),
    }
}

fn probe(nvml: FakeNvml, visible: Option<&str>) -> Result<Option<NvmlProbe>, MappingError> {
    NvmlProbe::with_source(Box::new(nvml), visible)
}

#[test]
fn one_visible_mig_instance_is_cuda_device_zero_with_the_instances_memory_not_the_cards() {
    for visible in [None, Some(BIG), Some("MIG-aaaa")] {
        let probe = probe(h100_in_mig_mode(&[BIG]), visible).unwrap().unwrap();
        let devices = probe.read();
        assert_eq!(devices.len(), 1, "{visible:?}");
        let slice = &devices[0];
        assert_eq!((slice.index, slice.uuid.as_str()), (0, BIG));
        assert_eq!(
            (slice.total, slice.used, slice.free),
            (40 * GB, 3 * GB, 37 * GB)
        );
        assert_eq!(slice.name, "NVIDIA H100 80GB HBM3 MIG 3g.40gb");
        assert_eq!(slice.mig_parent.as_deref(), Some(CARD));
        assert_eq!(slice.nvml_index, Some(0), "the card's NVML index");
    }
}

#[test]
fn the_ledger_of_a_mig_instance_budgets_the_instances_memory() {
    let probe = probe(h100_in_mig_mode(&[BIG]), None).unwrap().unwrap();
    let mut config = Config::default();
    config.handlers.clear();
    config.handlers.insert(
        "gpu".into(),
        HandlerConfig {
            kind: Some("echo".into()),
            device: DeviceChoice::Cuda,
            ..HandlerConfig::default()
        },
    );
    let handlers = HandlerSet::build(&config, true, true).unwrap();
    let sampler = GpuSampler::new(Arc::new(probe));
    let memory = MemoryAdmission::new(&config.gpu, &handlers, sampler, BTreeMap::new()).unwrap();
    let ledger = &memory.ledgers()[0];
    assert_eq!(ledger.uuid(), BIG, "booked per instance, not per card");
    assert_eq!(
        ledger.budget(),
        40 * GB - config.gpu.headroom.bytes(),
        "the instance's 40 GB less headroom, not the card's 80 GB"
    );
}

#[test]
fn two_mig_instances_named_in_cuda_visible_devices_are_ordinals_in_the_order_named() {
    let both = || h100_in_mig_mode(&[BIG, SMALL]);
    let named = probe(both(), Some(&format!("{SMALL},{BIG}")))
        .unwrap()
        .unwrap();
    let devices = named.read();
    let seen: Vec<(usize, &str, u64)> = devices
        .iter()
        .map(|d| (d.index, d.uuid.as_str(), d.total))
        .collect();
    assert_eq!(seen, vec![(0, SMALL, 20 * GB), (1, BIG, 40 * GB)]);

    let one = probe(both(), Some(SMALL)).unwrap().unwrap();
    assert_eq!(
        one.read()[0].total,
        20 * GB,
        "the one named, of two visible"
    );

    let error = probe(both(), None).err().unwrap();
    let text = error.to_string();
    assert!(matches!(error, MappingError::MigAmbiguous { .. }), "{text}");
    assert!(
        text.contains(BIG) && text.contains(SMALL) && text.contains("CUDA_VISIBLE_DEVICES=MIG-"),
        "names both and the variable to set: {text}"
    );
}

#[test]
fn mig_mode_with_no_instance_visible_is_a_named_error_that_says_which_variable_to_set() {
    let error = probe(h100_in_mig_mode(&[]), None).err().unwrap();
    let text = error.to_string();
    assert!(
        matches!(error, MappingError::MigNoInstance { .. }),
        "{text}"
    );
    assert!(
        text.contains(CARD)
            && text.contains("MIG mode")
            && text.contains("CUDA_VISIBLE_DEVICES=MIG-<uuid>"),
        "{text}"
    );
    let named = probe(h100_in_mig_mode(&[]), Some(BIG)).err().unwrap();
    assert!(
        matches!(named, MappingError::UnknownEntry { .. })
            && named.to_string().contains("instances: none visible"),
        "{named}"
    );
}

#[test]
fn a_card_in_mig_mode_named_as_a_whole_is_refused_with_its_instances() {
    for entry in ["0", "GPU-h100card"] {
        let error = probe(h100_in_mig_mode(&[BIG]), Some(entry)).err().unwrap();
        let text = error.to_string();
        assert!(matches!(error, MappingError::MigWholeCard { .. }), "{text}");
        assert!(text.contains(BIG) && text.contains("in MIG mode"), "{text}");
    }
}

/// `nvml` with a plain 24 GB card beside it.
fn with_a_whole_card(mut nvml: FakeNvml) -> FakeNvml {
    nvml.cards.push(NvmlDevice::card(
        1,
        "GPU-plain000-0000-0000-0000-000000000000",
        PciBusId::parse("00000000:81:00.0").unwrap(),
    ));
    nvml.readings
        .insert((1, None), reading("NVIDIA L4", 24 * GB, 0));
    nvml
}

#[test]
fn instances_beside_a_whole_card_without_cuda_visible_devices_cannot_be_told_apart() {
    let error = probe(with_a_whole_card(h100_in_mig_mode(&[BIG])), None)
        .err()
        .unwrap();
    assert!(
        matches!(error, MappingError::MigAmbiguous { .. })
            && error.to_string().contains("beside 1 whole GPU(s)"),
        "{error}"
    );
}

#[test]
fn a_card_whose_mig_mode_nvml_cannot_tell_is_refused_unless_left_out() {
    let unknown = || {
        let mut nvml = h100_in_mig_mode(&[]);
        nvml.cards[0].mig = MigState::Unknown("Unknown Error".into());
        with_a_whole_card(nvml)
    };
    let error = probe(unknown(), None).err().unwrap();
    assert!(
        matches!(error, MappingError::MigModeUnknown { .. }) && error.to_string().contains(CARD),
        "{error}"
    );
    let other = probe(unknown(), Some("GPU-plain")).unwrap().unwrap();
    assert_eq!(other.read()[0].total, 24 * GB);
    assert_eq!(other.read()[0].mig_parent, None);
}

#[test]
fn an_instance_whose_name_does_not_say_mig_is_still_shown_as_one() {
    let mut nvml = h100_in_mig_mode(&[BIG]);
    nvml.readings
        .insert((0, Some(1)), reading("NVIDIA H100 80GB HBM3", 40 * GB, 0));
    let probe = probe(nvml, None).unwrap().unwrap();
    assert_eq!(probe.read()[0].name, "NVIDIA H100 80GB HBM3 (MIG instance)");
}

#[test]
fn two_instances_that_libtorch_sees_as_one_are_refused_with_a_one_worker_per_instance_hint() {
    let mapped: Vec<_> = probe(
        h100_in_mig_mode(&[BIG, SMALL]),
        Some(&format!("{BIG},{SMALL}")),
    )
    .unwrap()
    .unwrap()
    .devices()
    .iter()
    .map(|m| (m.ordinal, m.uuid.clone(), Some(m.pci_bus_id)))
    .collect();
    let same_card = |_| PciBusId::parse("0000:1b:00.0");
    let error = identity::verify_with_cuda(&mapped, 1, same_card).unwrap_err();
    assert!(
        error.to_string().contains("one worker per instance"),
        "{error}"
    );
    assert!(
        identity::verify_with_cuda(&mapped, 2, same_card).is_ok(),
        "two instances of one card share its PCI address"
    );
}
