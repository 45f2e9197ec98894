//! Take sizing and concurrency limits.

use std::time::Duration;

use serde_json::json;
use worker::config::{Config, DeviceChoice, HandlerConfig};

use crate::helpers::{test_config, GateHandler, TestWorker, EP};

fn with_handler(mut config: Config, name: &str, limit: u32) -> Config {
    config.handlers.insert(
        name.to_owned(),
        HandlerConfig {
            kind: Some("echo".into()),
            max_concurrency: limit,
            device: DeviceChoice::Cpu,
            ..HandlerConfig::default()
        },
    );
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_take_asks_for_the_free_slots_and_one_free_slot_gives_a_single_take() {
    let mut config = with_handler(test_config(), "hold", 3);
    config.handler.max_concurrency = 3;
    let gate = GateHandler::new();
    let worker = TestWorker::start(config, |h| h.with_handler("hold", gate.clone()), 1000).await;

    // All at once, so the waiting long-poll sees five jobs and answers with its three.
    let jobs = (0..5).map(|i| json!({"id": format!("j{i}"), "input": {"task": "hold"}}));
    worker.mock.enqueue_all(EP, jobs);
    gate.wait_started(3).await;
    gate.release(1);
    gate.wait_started(4).await;

    let takes: Vec<_> = worker
        .mock
        .endpoint(EP)
        .takes
        .into_iter()
        .filter(|t| t.returned > 0)
        .collect();
    assert_eq!(
        takes[0].batch_size,
        Some(3),
        "first take asks for all three free slots: {takes:?}"
    );
    assert_eq!(takes[0].returned, 3);
    let single = takes
        .iter()
        .find(|t| t.batch_size.is_none())
        .expect("a single take after one slot freed");
    assert_eq!(single.job_in_progress.as_deref(), Some("1"));
    assert_eq!(single.returned, 1);
    assert!(worker
        .mock
        .endpoint(EP)
        .takes
        .iter()
        .all(|t| t.batch_size.unwrap_or(1) <= 3));

    gate.release(10);
    for i in 0..5 {
        worker.done(&format!("j{i}")).await;
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_and_global_limits_are_never_exceeded() {
    // Global 4; "a" and "b" may each run 3: together they must still stay at 4.
    let config = with_handler(with_handler(test_config(), "a", 3), "b", 3);
    let all = GateHandler::new();
    let (a, b) = (GateHandler::sharing(&all), GateHandler::sharing(&all));
    let worker = TestWorker::start(
        config,
        |h| h.with_handler("a", a.clone()).with_handler("b", b.clone()),
        1000,
    )
    .await;

    for i in 0..12 {
        let task = if i % 3 == 0 { "b" } else { "a" };
        worker.enqueue(&format!("j{i}"), json!({"task": task}));
    }
    all.wait_started(4).await;
    let health = worker.health().await;
    assert_eq!(health["jobs"]["in_worker"], 4, "{health}");
    assert!(
        health["handlers"]["a"]["active"].as_u64().unwrap() <= 3,
        "{health}"
    );
    assert_eq!(
        worker.mock.endpoint(EP).held(),
        4,
        "no more than 4 jobs taken"
    );

    // Let everything through at once: the limits must hold while jobs churn.
    all.release(100);
    for i in 0..12 {
        worker.done(&format!("j{i}")).await;
    }
    assert_eq!(all.max(), 4, "global limit reached but never exceeded");
    assert!(
        a.max() <= 3 && b.max() <= 3,
        "per-handler limits: a={} b={}",
        a.max(),
        b.max()
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_waits_too_long_for_its_handler_gets_the_retry_signal() {
    let mut config = with_handler(test_config(), "one", 1);
    config.handler.local_queue_max_wait_s = 1;
    let gate = GateHandler::new();
    let worker = TestWorker::start(config, |h| h.with_handler("one", gate.clone()), 1000).await;

    worker.enqueue("first", json!({"task": "one"}));
    gate.wait_started(1).await;
    worker.enqueue("second", json!({"task": "one"}));
    let done = worker.done("second").await;
    let output = &done.body["output"];
    assert_eq!(output["error_type"], "Timeout", "{output}");
    assert!(output["retry_after"].as_u64().unwrap() > 0, "{output}");
    assert!(
        output["error"]
            .as_str()
            .unwrap()
            .contains("no one slot became free within 1 s"),
        "{output}"
    );

    gate.release(1);
    worker.done("first").await;
    tokio::time::sleep(Duration::ZERO).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_body_of_exactly_the_limit_is_accepted_by_the_mock_and_runs_on_a_worker_with_that_limit(
) {
    // "10MB" means the same to both: the body the client sends. The job the queue hands out
    // adds its id, which must not push it over the worker's limit.
    let mut config = test_config();
    config.queue.max_job_size = "10MB".parse().unwrap();
    config.queue.max_result_size = "20MB".parse().unwrap();
    let worker = TestWorker::start(config, |h| h, 1000).await;
    let envelope = json!({"input": {"task": "echo", "pad": ""}})
        .to_string()
        .len();
    let limit = runpod_protocol::limits::MAX_RUN_BODY;
    let body = json!({"input": {"task": "echo", "pad": "x".repeat(limit - envelope)}}).to_string();
    assert_eq!(body.len(), limit);
    let base = format!("{}/v2/{EP}", worker.mock.base_url());
    let submitted: serde_json::Value = crate::helpers::client_with_key()
        .post(format!("{base}/run"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["id"]
        .as_str()
        .expect("accepted by the mock")
        .to_owned();
    let done = worker.done(&id).await;
    assert!(
        done.body.get("error").is_none(),
        "refused by the worker: {}",
        done.body["error"]
    );
    assert_eq!(
        done.body["output"]["pad"].as_str().map(str::len),
        Some(limit - envelope)
    );
    worker.stop().await;
}
