//! GPU truth on a machine without a GPU: the models' resident memory is booked before jobs,
//! a GPU that libtorch cannot use stops `serve` and degrades the others (with the cause), and
//! `check-config` plans with the models' memory.

use std::process::Command;
use std::sync::Arc;

use serde_json::json;
use worker::config::{Config, DeviceChoice, HandlerConfig};
use worker::gpu::cuda_runtime::{CudaVersion, DriverInfo};
use worker::gpu::{DeviceReading, GpuProbe};
use worker::handlers::HandlerSet;

use crate::helpers::{spawn_mock, test_config, GateHandler, TestWorker, BIN};

/// One 24 GB classify card; `model_memory` declared or not.
fn classify_config(model_memory: Option<&str>) -> Config {
    let mut config = test_config();
    config.gpu.simulate = Some("24GB".parse().unwrap());
    config.handlers.clear();
    config.handlers.insert(
        "classify".into(),
        HandlerConfig {
            kind: Some("echo".into()),
            max_concurrency: 4,
            device: DeviceChoice::Cuda,
            gpu_memory: Some("5GB".parse().unwrap()),
            model_memory: model_memory.map(|m| m.parse().unwrap()),
            ..HandlerConfig::default()
        },
    );
    config
}

/// Runs four 5 GB jobs, holding them until `started` have started, and returns how many ran at
/// once, and `/health` while they were held.
async fn most_at_once(model_memory: Option<&str>, started: usize) -> (usize, serde_json::Value) {
    let gate = GateHandler::new();
    let config = classify_config(model_memory);
    let worker = TestWorker::start(config, |h| h.with_handler("classify", gate.clone()), 200).await;
    for i in 0..4 {
        worker.enqueue(&format!("c{i}"), json!({"task": "classify"}));
    }
    gate.wait_started(started).await;
    // A window in which a wrong admission would start more: nothing can signal what must not
    // happen, so watch for a moment (the worker takes and starts a job in milliseconds).
    for _ in 0..15 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(
            gate.started(),
            started,
            "no more may start while these hold memory"
        );
    }
    let health = worker.health().await;
    // Every job may finish now: how many run at once is up to memory admission alone.
    gate.release(4);
    for i in 0..4 {
        worker.done(&format!("c{i}")).await;
    }
    worker.stop().await;
    (gate.max(), health)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_weights_booked_as_resident_memory_admit_fewer_jobs_than_the_same_config_without() {
    // 24 GB less 1 GiB headroom: four 5 GB jobs fit; beside 14 GB of weights, one.
    let (without, health) = most_at_once(None, 4).await;
    assert_eq!(without, 4, "{health}");
    assert_eq!(health["gpus"][0]["resident_gb"], 0.0, "{health}");
    let (with, health) = most_at_once(Some("14GB"), 1).await;
    assert_eq!(
        with, 1,
        "weights plus declared jobs must not exceed the card: {health}"
    );
    assert_eq!(
        health["gpus"][0]["resident_gb"], 13.04,
        "14 GB in GiB: {health}"
    );
    assert_eq!(health["gpus"][0]["resident_source"], "declared", "{health}");
    assert_eq!(health["gpus"][0]["uuid"], "GPU-simulated-0", "{health}");
}

/// A card NVML sees, with a driver too old for the wheel's CUDA 13.
struct OldDriverGpu;

impl GpuProbe for OldDriverGpu {
    fn read(&self) -> Vec<DeviceReading> {
        vec![DeviceReading {
            index: 0,
            uuid: "GPU-0ld-driver".into(),
            nvml_index: Some(0),
            pci_bus_id: None,
            name: "NVIDIA A10".into(),
            total: 24_000_000_000,
            free: 24_000_000_000,
            used: 0,
            process_used: Vec::new(),
            mig_parent: None,
        }]
    }

    fn driver(&self) -> Option<DriverInfo> {
        Some(DriverInfo {
            version: "535.104.05".into(),
            cuda: CudaVersion(12020),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_gpu_libtorch_cannot_use_and_names_the_driver() {
    if tch::Cuda::is_available() {
        return; // this machine's own CUDA works: the probe's story would be false
    }
    let mock = spawn_mock(std::time::Duration::from_secs(2));
    let probe: Arc<dyn GpuProbe> = Arc::new(OldDriverGpu);
    let worker =
        TestWorker::start_with(mock, cuda_echo_config(), None, Some(probe), true, 200).await;
    let error = worker.handle.await.unwrap().unwrap_err();
    assert_eq!(error.check, "cuda");
    assert!(
        error.reason.contains("535.104.05") && error.reason.contains("12.2"),
        "{}",
        error.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_runs_cuda_handlers_on_the_cpu_degraded_and_never_books_them_as_gpu_jobs() {
    if tch::Cuda::is_available() {
        return;
    }
    let mock = spawn_mock(std::time::Duration::from_secs(2));
    let probe: Arc<dyn GpuProbe> = Arc::new(OldDriverGpu);
    let worker =
        TestWorker::start_with(mock, cuda_echo_config(), None, Some(probe), false, 200).await;
    worker.enqueue("c1", json!({"task": "classify", "n": 1}));
    let done = worker.done("c1").await;
    assert_eq!(done.body["output"]["n"], 1, "{:?}", done.body);
    let health = worker.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["handlers"]["classify"]["device"], "cpu", "{health}");
    assert_eq!(health["gpus"][0]["reservations"], 0, "{health}");
    assert_eq!(health["handlers"]["classify"]["footprint"], json!(null));
    let warnings = health["warnings"].to_string();
    assert!(warnings.contains("535.104.05"), "{warnings}");
    worker.stop().await;
}

#[test]
fn a_handler_set_built_without_a_usable_gpu_books_no_gpu_memory() {
    let set = HandlerSet::build(&cuda_echo_config(), false, false).unwrap();
    let classify = set.get("classify").unwrap();
    assert!(!classify.on_gpu && classify.gpu_fallback);
    assert_eq!(classify.reservation.bytes(), 0);
}

fn check_config(model_memory: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("runpod.toml");
    let text = format!(
        "[handlers.classify]\nmax_concurrency = 4\ndevice = \"cuda\"\ngpu_memory = \"6GB\"\nmodel_memory = \"{model_memory}\"\n"
    );
    std::fs::write(&file, text).unwrap();
    Command::new(BIN)
        .args(["check-config", "--gpu-memory", "24GB", "--config"])
        .arg(&file)
        .output()
        .unwrap()
}

#[test]
fn check_config_plans_the_models_memory_and_refuses_models_that_leave_no_room() {
    let fits = check_config("14GB");
    let stdout = String::from_utf8_lossy(&fits.stdout);
    assert!(fits.status.success(), "{stdout}");
    assert!(
        stdout.contains("resident (models and CUDA context, estimated): 14.8GB"),
        "{stdout}"
    );
    let classify = stdout.lines().find(|l| l.starts_with("classify")).unwrap();
    assert!(classify.trim_end().ends_with(" 1"), "{classify}");

    let refused = check_config("20GB");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("handlers.classify.gpu_memory") && stderr.contains("for the models"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_gpu_memory_goes_back_before_its_result_is_delivered() {
    use mock_queue::{Fault, Route};
    // Room for one 20 GB job on a 24 GB card; results are refused (503) and retried for a
    // while: the next job must not wait for the first one's delivery.
    let mut config = classify_config(None);
    config.handlers.get_mut("classify").unwrap().gpu_memory = Some("20GB".parse().unwrap());
    config.queue.delivery_retry_s = 30;
    let gate = GateHandler::new();
    let worker = TestWorker::start(config, |h| h.with_handler("classify", gate.clone()), 200).await;
    worker.mock.set_fault(
        Route::Done,
        Some(Fault {
            status: 503,
            rate: 1.0,
        }),
    );
    worker.enqueue("first", json!({"task": "classify"}));
    gate.wait_started(1).await;
    gate.release(1);
    worker.enqueue("second", json!({"task": "classify"}));
    gate.wait_started(2).await;
    assert_eq!(
        worker.results_for("first"),
        0,
        "the second job started while the first one's result was still being retried"
    );
    worker.mock.set_fault(Route::Done, None);
    gate.release(1);
    worker.done("first").await;
    worker.done("second").await;
    worker.stop().await;
}

#[test]
fn each_binary_links_only_the_libtorch_it_uses() {
    // `runpod-worker` maps no libtorch; `runpod-worker-torch` links libtorch_cpu and loads
    // libtorch_cuda at start only on a host with a driver; the parser child maps none (its
    // memory limit is for the document, not for CUDA libraries).
    let needed = |exe: &str| {
        let out = Command::new("ldd").arg(exe).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let front = needed(BIN);
    assert!(
        front.contains("libc.so") && !front.contains("torch") && !front.contains("c10"),
        "{front}"
    );
    let torch = needed(crate::helpers::TORCH_BIN);
    assert!(torch.contains("libtorch_cpu"), "{torch}");
    assert!(!torch.contains("libtorch_cuda"), "{torch}");
    let parser = needed(crate::helpers::PARSER);
    assert!(
        !parser.contains("torch") && !parser.contains("c10"),
        "{parser}"
    );
}

#[test]
fn every_profile_in_config_plans_for_the_gpus_it_names() {
    let plan = |file: &str, gpus: &str| {
        let out = Command::new(BIN)
            .args([
                "check-config",
                "--config",
                file,
                "--gpu-memory",
                "24GB",
                "--gpus",
                gpus,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUNPOD_WORKER_HOST")
            .env_remove("RUNPOD_WORKER_PORT")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{file}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    // (at once, per pass): a batched GPU handler's jobs all run at once and memory bounds
    // how many one forward pass holds; per pass is 0 where it does not apply.
    let at_once = |plan: &str, handler: &str| -> (u64, u64) {
        let line = plan
            .lines()
            .find(|l| l.starts_with(handler))
            .unwrap_or_else(|| panic!("{handler} in {plan}"));
        let columns: Vec<&str> = line.split_whitespace().collect();
        let n = columns.len();
        (
            columns[n - 2].parse().unwrap(),
            columns[n - 1].parse().unwrap_or(0),
        )
    };
    let profiles: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(profiles.len(), 5, "{profiles:?}");
    for profile in &profiles {
        let gpus = if profile.starts_with("four-gpus") {
            "4"
        } else {
            "1"
        };
        let text = plan(&format!("config/{profile}"), gpus);
        assert!(
            text.contains("GiB") && !text.contains("B total (0"),
            "{text}"
        );
    }
    assert_eq!(
        at_once(&plan("config/extraction-only.toml", "1"), "extract"),
        (8, 0)
    );
    let mixed = plan("config/extraction-classification.toml", "1");
    assert_eq!(
        (at_once(&mixed, "extract"), at_once(&mixed, "classify")),
        ((4, 0), (32, 3)),
        "classify's 6GB jobs: 3 a pass on a 24GB card: {mixed}"
    );
    let heavy = plan("config/classification-heavy.toml", "1");
    assert!(heavy.contains("all (22.1GB)"), "the whole budget: {heavy}");
    assert_eq!(at_once(&heavy, "classify"), (32, 1));
    assert_eq!(
        at_once(&plan("config/four-gpus.toml", "4"), "extract"),
        (16, 4),
        "extract on the GPUs is batched too"
    );
    let four = plan("config/four-gpus-classification.toml", "4");
    assert_eq!(
        at_once(&four, "classify"),
        (64, 1),
        "one job a pass: {four}"
    );
}
