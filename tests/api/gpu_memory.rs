//! GPU memory-aware admission on a simulated GPU: the seed's three scenarios, external memory
//! pressure, OOM and adaptive limits, learned footprints, the acquisition order, and two worker
//! processes sharing one GPU through the host-wide ledger.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use worker::config::{Config, DeviceChoice, HandlerConfig};

use crate::helpers::{spawn_mock, test_config, worker_command, GateHandler, TestWorker, EP, WAIT};

fn handler(
    kind: &str,
    device: DeviceChoice,
    limit: u32,
    gpu_memory: Option<&str>,
) -> HandlerConfig {
    HandlerConfig {
        kind: Some(kind.into()),
        max_concurrency: limit,
        device,
        gpu_memory: gpu_memory.map(|m| m.parse().unwrap()),
        ..HandlerConfig::default()
    }
}

/// The seed's setup: one 24 GB card, extraction on the CPU (4 at once), classification on the
/// GPU (1 at once, most of the card).
fn seed_config(classify_limit: u32) -> Config {
    let mut config = test_config();
    config.gpu.simulate = Some("24GB".parse().unwrap());
    config.handler.max_concurrency = 6;
    config.handlers.clear();
    config.handlers.insert(
        "extract".into(),
        handler("echo", DeviceChoice::Cpu, 4, None),
    );
    config.handlers.insert(
        "classify".into(),
        handler("echo", DeviceChoice::Cuda, classify_limit, Some("20GB")),
    );
    config
}

async fn seed_worker(classify_limit: u32) -> (TestWorker, Arc<GateHandler>, Arc<GateHandler>) {
    let (extract, classify) = (GateHandler::new(), GateHandler::new());
    let worker = TestWorker::start(
        seed_config(classify_limit),
        |h| {
            h.with_handler("extract", extract.clone())
                .with_handler("classify", classify.clone())
        },
        200,
    )
    .await;
    (worker, extract, classify)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_1_four_extractions_run_together() {
    let (worker, extract, _) = seed_worker(1).await;
    for i in 0..4 {
        worker.enqueue(&format!("e{i}"), json!({"task": "extract"}));
    }
    extract.wait_started(4).await;
    let health = worker.health().await;
    assert_eq!(health["handlers"]["extract"]["active"], 4, "{health}");
    assert_eq!(
        health["gpus"][0]["reserved_gb"], 0.0,
        "CPU jobs reserve no GPU memory: {health}"
    );
    extract.release(4);
    for i in 0..4 {
        worker.done(&format!("e{i}")).await;
    }
    assert_eq!(extract.max(), 4);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_2_two_classifications_run_one_after_the_other_even_with_two_slots() {
    // Two slots, but memory for one 20 GB job: the ledger, not the semaphore, serialises them.
    let (worker, _, classify) = seed_worker(2).await;
    worker.enqueue("c1", json!({"task": "classify"}));
    worker.enqueue("c2", json!({"task": "classify"}));
    classify.wait_started(1).await;
    worker.wait_held_count(2).await;
    let health = worker.health().await;
    assert_eq!(
        health["handlers"]["classify"]["active"], 2,
        "both hold a slot: {health}"
    );
    assert_eq!(
        health["gpus"][0]["reservations"], 1,
        "only one has memory: {health}"
    );
    assert_eq!(classify.max(), 1, "the second has not started");
    classify.release(1);
    classify.wait_started(2).await;
    classify.release(1);
    worker.done("c1").await;
    worker.done("c2").await;
    assert_eq!(classify.max(), 1, "never two 20 GB jobs on a 24 GB card");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_3_extractions_go_on_while_the_second_classification_waits() {
    let (worker, extract, classify) = seed_worker(1).await;
    worker.enqueue("e1", json!({"task": "extract"}));
    worker.enqueue("e2", json!({"task": "extract"}));
    worker.enqueue("c1", json!({"task": "classify"}));
    worker.enqueue("e3", json!({"task": "extract"}));
    worker.enqueue("c2", json!({"task": "classify"}));
    extract.wait_started(3).await;
    classify.wait_started(1).await;
    worker.wait_held_count(5).await;
    let health = worker.health().await;
    assert_eq!(health["handlers"]["classify"]["queued"], 1, "{health}");
    // The extractions finish while the second classification still waits.
    extract.release(3);
    for id in ["e1", "e2", "e3"] {
        worker.done(id).await;
    }
    assert_eq!(classify.max(), 1);
    assert!(worker
        .mock
        .endpoint(EP)
        .done
        .iter()
        .all(|d| d.job_id != "c2"));
    classify.release(2);
    worker.done("c1").await;
    worker.done("c2").await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_reserved_only_after_a_handler_slot_so_waiting_jobs_hold_none() {
    // Memory for two 10 GB jobs, one slot: a job waiting for the slot must hold no memory (the
    // opposite order would let it book memory it cannot use while it waits).
    let mut config = seed_config(1);
    config.handlers.get_mut("classify").unwrap().gpu_memory = Some("10GB".parse().unwrap());
    let classify = GateHandler::new();
    let worker = TestWorker::start(
        config,
        |h| h.with_handler("classify", classify.clone()),
        200,
    )
    .await;
    for i in 0..3 {
        worker.enqueue(&format!("c{i}"), json!({"task": "classify"}));
    }
    classify.wait_started(1).await;
    worker.wait_held_count(3).await;
    let health = worker.health().await;
    assert_eq!(health["handlers"]["classify"]["queued"], 2, "{health}");
    assert_eq!(health["gpus"][0]["reservations"], 1, "{health}");
    classify.release(3);
    for i in 0..3 {
        worker.done(&format!("c{i}")).await;
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_memory_pressure_gives_the_retry_signal_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let load = dir.path().join("gpu-load");
    std::fs::write(&load, "20GB").unwrap();
    let mut config = seed_config(1);
    config.handlers.get_mut("classify").unwrap().gpu_memory = Some("6GB".parse().unwrap());
    config.gpu.external_load_file = Some(load.clone());
    let worker = TestWorker::start(config, |h| h, 200).await;

    worker.enqueue("squeezed", json!({"task": "classify"}));
    let done = worker.done("squeezed").await;
    let output = &done.body["output"];
    assert_eq!(output["error_type"], "InsufficientGPUMemory", "{output}");
    assert_eq!(output["error"], "GPU memory exhausted, retry shortly");
    let retry_after = output["retry_after"].as_u64().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let metrics = worker.metrics().await;
    assert!(
        metrics.contains("runpod_worker_retry_signals_total{reason=\"measured_memory\"} 1"),
        "{metrics}"
    );
    let health = worker.health().await;
    assert!(
        health["gpus"][0]["others_used_gb"].as_f64().unwrap() > 18.0,
        "{health}"
    );

    // The pressure goes away (the worker sees it at its next memory sample): the job runs.
    std::fs::write(&load, "0GB").unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while worker.health().await["gpus"][0]["others_used_gb"] != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relief was never sampled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.enqueue("relieved", json!({"task": "classify"}));
    assert_eq!(
        worker.done("relieved").await.body["output"]["task"],
        "classify"
    );
    worker.stop().await;
}

fn adaptive_config() -> Config {
    let mut config = test_config();
    config.gpu.simulate = Some("24GB".parse().unwrap());
    config.gpu.adaptive = true;
    config.gpu.grow_after_successes = 2;
    config.handler.max_consecutive_ooms = 100;
    config.handlers.insert(
        "gpu".into(),
        handler("echo", DeviceChoice::Cuda, 4, Some("6GB")),
    );
    config
}

async fn limit_of(worker: &TestWorker) -> u64 {
    worker.health().await["handlers"]["gpu"]["limit"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_shrinks_the_handler_limit_and_successes_grow_it_back() {
    let worker = TestWorker::start(adaptive_config(), |h| h, 1000).await;
    assert_eq!(limit_of(&worker).await, 4);
    worker.enqueue("oom", json!({"task": "gpu", "fail": "oom"}));
    let done = worker.done("oom").await;
    assert_eq!(done.body["output"]["error_type"], "InsufficientGPUMemory");
    assert_eq!(limit_of(&worker).await, 2, "halved");

    let mut grown = Vec::new();
    for i in 0..4 {
        worker.enqueue(&format!("ok{i}"), json!({"task": "gpu"}));
        worker.done(&format!("ok{i}")).await;
        grown.push(limit_of(&worker).await);
    }
    assert_eq!(
        grown,
        vec![2, 3, 3, 4],
        "one step per two successes, up to the configured 4"
    );
    let metrics = worker.metrics().await;
    assert!(
        metrics.contains("runpod_worker_ooms_total{handler=\"gpu\"} 1"),
        "{metrics}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_footprints_replace_the_declared_one_for_admission() {
    let worker = TestWorker::start(adaptive_config(), |h| h, 1000).await;
    for i in 0..5 {
        worker.enqueue(
            &format!("p{i}"),
            json!({"task": "gpu", "gpu_peak_mb": 1000 + i * 50}),
        );
        worker.done(&format!("p{i}")).await;
    }
    let footprint = &worker.health().await["handlers"]["gpu"]["footprint"];
    assert_eq!(footprint["declared_gb"], 5.59, "6 GB declared: {footprint}");
    assert_eq!(footprint["samples"], 5);
    // p95 of 1.0–1.2 GB peaks, plus 10%: 1.32 GB = 1.23 GiB.
    assert_eq!(footprint["learned_gb"], 1.23, "{footprint}");
    assert_eq!(footprint["admitted_gb"], footprint["learned_gb"]);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_on_one_gpu_never_exceed_its_budget_together() {
    let mock = spawn_mock(Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runpod.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [handler]
            max_concurrency = 2
            [gpu]
            simulate = "24GB"
            headroom = "1GB"
            host_ledger_dir = "{}"
            [handlers.gpu]
            kind = "echo"
            max_concurrency = 2
            device = "cuda"
            gpu_memory = "10GB"
            "#,
            dir.path().display()
        ),
    )
    .unwrap();
    let spawn = |name: &str| {
        worker_command(&mock.base_url(), name)
            .env("RUNPOD_WORKER_CONFIG", &config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("gpu-a"), spawn("gpu-b"));
    // Both ready (each pings once ready) before any job: the jobs must be shared between
    // them, and the SIGTERM at the end must reach workers that handle it, not ones still
    // loading their libraries.
    let both = mock
        .state()
        .wait_for(WAIT, |i| {
            let workers = &i.endpoints.get(EP)?.workers;
            (workers.contains_key("gpu-a") && workers.contains_key("gpu-b")).then_some(())
        })
        .await;
    assert!(both.is_some(), "both workers pinged");
    const JOBS: usize = 8;
    for i in 0..JOBS {
        mock.enqueue(
            EP,
            json!({"id": format!("g{i}"), "input": {"task": "gpu", "sleep_ms": 300}}),
        );
    }
    // Watch the shared ledger while the jobs run: 23 GB of budget fits two 10 GB jobs, not the
    // four the two workers' slots would allow.
    // One file per card, named by its UUID.
    let ledger = dir.path().join("runpod-worker-GPU-simulated-0.ledger.json");
    let mut most = 0u64;
    let finished = |m: &mock_queue::MockQueue| m.endpoint(EP).done.len() == JOBS;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !finished(&mock) && std::time::Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&ledger) {
            let file: Value = serde_json::from_str(&text).unwrap_or_default();
            let entries = file["entries"].as_array().cloned().unwrap_or_default();
            most = most.max(entries.iter().map(|e| e["bytes"].as_u64().unwrap()).sum());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut per_worker = std::collections::BTreeMap::<String, usize>::new();
    for done in mock.endpoint(EP).done {
        *per_worker.entry(done.worker).or_default() += 1;
    }
    for child in [&mut a, &mut b] {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    let (a, b) = (a.wait().unwrap(), b.wait().unwrap());
    assert!(finished(&mock), "all {JOBS} jobs done");
    println!(
        "two workers, one simulated 24 GB GPU: at most {most} bytes reserved at once \
         (budget 23e9); jobs per worker {per_worker:?}"
    );
    assert!(most <= 23_000_000_000, "over-committed: {most}");
    assert_eq!(
        most, 20_000_000_000,
        "two jobs at once, shared between the processes"
    );
    assert_eq!((a.code(), b.code()), (Some(0), Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_is_fetched_before_its_gpu_memory_is_reserved() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A server that sends its headers and a little of the body, then stalls; it says when it
    // has been asked.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/slow", listener.local_addr().unwrap());
    let (asked, asked_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 1024];
        let _ = socket.read(&mut request).await;
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nhi";
        let _ = socket.write_all(head.as_bytes()).await;
        let _ = asked.send(());
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let mut config = test_config();
    config.gpu.simulate = Some("24GB".parse().unwrap());
    config.handler.model_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("handler/models");
    config.handlers.clear();
    config.handlers.insert(
        "classify".into(),
        HandlerConfig {
            allow_private_urls: Some(true),
            url_timeout_s: Some(2),
            ..handler("classify", DeviceChoice::Cuda, 1, Some("8GB"))
        },
    );
    let worker = TestWorker::start(config, |h| h, 200).await;
    worker.enqueue(
        "slow-doc",
        json!({"task": "classify", "labels": ["a", "b"], "document": {"url": url}}),
    );
    asked_rx.await.unwrap();
    let health = worker.health().await;
    assert_eq!(
        health["gpus"][0]["reserved_gb"].as_f64(),
        Some(0.0),
        "no GPU memory is held while the document is fetched: {health}"
    );
    let done = worker.done("slow-doc").await;
    assert_eq!(
        done.body["output"]["error_type"], "InvalidInput",
        "{:?}",
        done.body
    );
    // A document that arrives is classified with its memory reserved as usual.
    worker.enqueue(
        "fast-doc",
        json!({"task": "classify", "labels": ["a", "b"], "text": "a"}),
    );
    assert!(worker.done("fast-doc").await.body["output"]["label"].is_string());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_of_all_gives_each_job_the_whole_budget_one_at_a_time() {
    let mut config = seed_config(2);
    let classify = config.handlers.get_mut("classify").unwrap();
    classify.gpu_memory = Some(worker::config::WHOLE_BUDGET);
    classify.model_memory = Some("2GB".parse().unwrap());
    let gate = GateHandler::new();
    let worker = TestWorker::start(config, |h| h.with_handler("classify", gate.clone()), 200).await;
    worker.enqueue("w1", json!({"task": "classify"}));
    worker.enqueue("w2", json!({"task": "classify"}));
    gate.wait_started(1).await;
    worker.wait_held_count(2).await;
    let health = worker.health().await;
    // 24 GB less 1 GiB headroom less the 2 GB model: 20.926 GB, in GiB.
    let admitted = health["handlers"]["classify"]["footprint"]["admitted_gb"]
        .as_f64()
        .unwrap();
    let expected = (24e9 - (1u64 << 30) as f64 - 2e9) / (1u64 << 30) as f64;
    assert!(
        (admitted - expected).abs() < 0.01,
        "{admitted} vs {expected}: {health}"
    );
    assert_eq!(health["gpus"][0]["reservations"], 1, "{health}");
    assert_eq!(gate.max(), 1);
    gate.release(1);
    gate.wait_started(2).await;
    gate.release(1);
    worker.done("w1").await;
    worker.done("w2").await;
    assert_eq!(
        gate.max(),
        1,
        "never two jobs that each take the whole card"
    );
    worker.stop().await;
}

/// Memory booked per pass on the simulated GPU: sixteen real classify jobs, 10 GB declared
/// each, on a 24 GB card (23 GB after the headroom). They all run at once (a waiting job holds
/// no memory), but a pass books 10 GB per job in it, so no pass holds more than two jobs: at
/// least eight passes, every job answered, nothing left booked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_jobs_hold_no_memory_while_they_wait_and_each_pass_books_its_jobs() {
    let mut config = test_config();
    config.gpu.simulate = Some("24GB".parse().unwrap());
    config.handler.max_concurrency = 16;
    config.handler.model_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("handler/models");
    config.handlers.clear();
    config.handlers.insert(
        "classify".into(),
        handler("classify", DeviceChoice::Cuda, 16, Some("10GB")),
    );
    let worker = TestWorker::start(config, |h| h, 200).await;
    let passes = |health: &Value| health["batching"][0]["batches"].as_u64().unwrap();
    let before = passes(&worker.health().await);
    let labels = json!(["invoice", "recipe", "poem"]);
    for i in 0..16 {
        let text = format!("Note {i}: bake the bread at 200 degrees for {i} minutes.");
        worker.enqueue(
            &format!("p{i}"),
            json!({"task": "classify", "text": text, "labels": labels}),
        );
    }
    for i in 0..16 {
        let done = worker.done(&format!("p{i}")).await;
        assert!(done.body["output"]["label"].is_string(), "{}", done.body);
    }
    let health = worker.health().await;
    assert_eq!(health["handlers"]["classify"]["batched"], true, "{health}");
    assert!(
        passes(&health) - before >= 8,
        "two 10 GB jobs a pass at most: {health}"
    );
    assert_eq!(health["gpus"][0]["reserved_gb"], 0.0, "{health}");
    worker.stop().await;
}
