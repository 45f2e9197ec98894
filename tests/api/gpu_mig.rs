//! A MIG instance through the real NVML probe over a fake NVML: `/health` (and the console,
//! which draws it) shows the instance's memory, names the device as a MIG instance, and the
//! ledger's budget is the instance's.

use std::sync::Arc;

use worker::config::{Config, DeviceChoice, HandlerConfig};
use worker::gpu::identity::{MappingError, NvmlDevice, PciBusId};
use worker::gpu::mig::{MigInstance, MigState};
use worker::gpu::nvml::{HandleReading, NvmlSource};
use worker::gpu::{GpuProbe, NvmlProbe};

use crate::helpers::{spawn_mock, test_config, TestWorker};

const GB: u64 = 1_000_000_000;
const CARD: &str = "GPU-h100card-0000-0000-0000-000000000000";
const INSTANCE: &str = "MIG-aaaa1111-0000-0000-0000-000000000000";

/// An 80 GB card in MIG mode of which this process sees one 40 GB instance, as in a container
/// the runtime gave one MIG instance.
struct OneInstanceVisible;

impl NvmlSource for OneInstanceVisible {
    fn list(&self) -> Result<Vec<NvmlDevice>, MappingError> {
        let mut card = NvmlDevice::card(0, CARD, PciBusId::parse("00000000:1B:00.0").unwrap());
        card.mig = MigState::On(vec![MigInstance {
            mig_index: 3,
            uuid: INSTANCE.into(),
        }]);
        Ok(vec![card])
    }

    fn read(&self, nvml_index: u32, mig_index: Option<u32>) -> Option<HandleReading> {
        let (name, total, used) = match (nvml_index, mig_index) {
            (0, None) => ("NVIDIA H100 80GB HBM3", 80 * GB, 45 * GB),
            (0, Some(3)) => ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 40 * GB, 4 * GB),
            _ => return None,
        };
        Some(HandleReading {
            name: name.into(),
            total,
            free: total - used,
            used,
            process_used: Vec::new(),
        })
    }
}

fn cuda_echo_config() -> Config {
    let mut config = test_config();
    config.handlers.insert(
        "classify".into(),
        HandlerConfig {
            kind: Some("echo".into()),
            max_concurrency: 1,
            device: DeviceChoice::Cuda,
            ..HandlerConfig::default()
        },
    );
    config
}

fn gib(bytes: u64) -> f64 {
    (bytes as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_shows_a_mig_instances_memory_and_names_it_as_one() {
    if tch::Cuda::is_available() {
        return; // this machine's own CUDA would be checked against the fake card
    }
    let probe = NvmlProbe::with_source(Box::new(OneInstanceVisible), None)
        .unwrap()
        .expect("the instance is a device");
    let probe: Arc<dyn GpuProbe> = Arc::new(probe);
    let mock = spawn_mock(std::time::Duration::from_secs(2));
    let config = cuda_echo_config();
    let headroom = config.gpu.headroom.bytes();
    let worker = TestWorker::start_with(mock, config, None, Some(probe), false, 200).await;
    let health = worker.health().await;
    assert_eq!(
        health["gpu_name"], "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
        "{health}"
    );
    assert_eq!(
        health["total_vram_gb"],
        gib(40 * GB),
        "the instance's, not the card's"
    );
    assert_eq!(health["free_vram_gb"], gib(36 * GB), "{health}");
    let gpu = &health["gpus"][0];
    assert_eq!(gpu["uuid"], INSTANCE, "{health}");
    assert_eq!(gpu["mig"], true, "{health}");
    assert_eq!(gpu["mig_parent_uuid"], CARD, "{health}");
    assert_eq!(gpu["index"], 0, "libtorch's cuda:0");
    assert_eq!(gpu["budget_gb"], gib(40 * GB - headroom), "{health}");
    worker.stop().await;
}
