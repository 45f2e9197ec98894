//! Job ids: a job already in hand never runs twice, and an id that cannot go in a URL as it is
//! is answered without harming the jobs beside it.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{spawn_mock_with_lease, test_config, GateHandler, TestWorker, EP, WAIT};

/// How many jobs the queue has handed out so far.
async fn wait_handed_out(worker: &TestWorker, count: usize) {
    let seen = worker
        .mock
        .state()
        .wait_for(WAIT, |i| {
            let taken: usize = i.endpoints.get(EP)?.takes.iter().map(|t| t.returned).sum();
            (taken >= count).then_some(())
        })
        .await;
    assert!(seen.is_some(), "the queue never handed out {count} jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_repeats_an_id_runs_the_job_once() {
    let gate = GateHandler::new();
    let worker =
        TestWorker::start(test_config(), |h| h.with_handler("echo", gate.clone()), 200).await;
    worker.mock.enqueue_all(
        EP,
        [
            json!({"id": "d1", "input": {"task": "echo"}}),
            json!({"id": "d1", "input": {"task": "echo"}}),
            json!({"id": "d2", "input": {"task": "echo"}}),
        ],
    );
    wait_handed_out(&worker, 3).await;
    gate.wait_started(2).await;
    gate.release(3);
    worker.done("d1").await;
    worker.done("d2").await;
    let health = worker.health().await;
    worker.stop().await;
    assert_eq!(gate.started(), 2, "d1 ran once, d2 once");
    assert_eq!(health["jobs"]["duplicates"], 1, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_queue_sends_again_after_its_lease_ran_out_is_not_started_twice() {
    // Pings every 2.5 s, leases of 1 s: the queue takes the job back and hands it out again
    // while the worker still runs it.
    let mock = spawn_mock_with_lease(Duration::from_secs(1), Duration::from_secs(1));
    let gate = GateHandler::new();
    let worker = TestWorker::start_on(
        mock,
        test_config(),
        |h| h.with_handler("echo", gate.clone()),
        2500,
    )
    .await;
    worker.enqueue("l1", json!({"task": "echo"}));
    gate.wait_started(1).await;
    wait_handed_out(&worker, 2).await;
    // The second hand-out must reach the worker while the first copy still runs (a take
    // answered after the result was delivered is another case).
    let deadline = std::time::Instant::now() + WAIT;
    while worker.health().await["jobs"]["duplicates"].as_u64() < Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the repeat never reached the worker"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.release(2);
    worker.done("l1").await;
    let health = worker.health().await;
    worker.stop().await;
    assert_eq!(gate.started(), 1, "the running copy answers");
    assert!(health["jobs"]["duplicates"].as_u64() >= Some(1), "{health}");
    assert_eq!(worker_results(&health), 1, "{health}");
}

fn worker_results(health: &serde_json::Value) -> u64 {
    health["jobs"]["completed"].as_u64().unwrap_or(0)
        + health["jobs"]["failed"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_cannot_go_in_a_url_never_reach_the_heartbeat_nor_the_spool() {
    let config = test_config();
    let spool = config.queue.spool_dir.clone();
    let worker = TestWorker::start(config, |h| h, 100).await;
    let long = "x".repeat(10_000);
    worker.mock.enqueue_all(
        EP,
        [
            json!({"id": long, "input": {"task": "echo"}}),
            json!({"id": "a/../b", "input": {"task": "echo"}}),
            json!({"id": "line\nINFO forged", "input": {"task": "echo"}}),
            json!({"id": "ok", "input": {"task": "echo", "sleep_ms": 400}}),
        ],
    );
    worker.wait_held(&["ok"]).await;
    let done = worker.done("ok").await;
    assert_eq!(done.body["output"]["task"], "echo");
    // Answered by its (encoded) URL, though it cannot be a header value.
    let forged = worker
        .mock
        .wait_done(EP, "line\nINFO forged", WAIT)
        .await
        .expect("an id with a control character is still answered");
    assert_eq!(forged.body["output"]["error_type"], "InvalidInput");
    assert_eq!(forged.headers.request_id, None);
    let health = worker.health().await;
    let queue = worker.mock.endpoint(EP);
    worker.stop().await;
    assert!(!queue.pings.is_empty());
    for ping in &queue.pings {
        assert!(
            ping.job_ids.iter().all(|id| id == "ok"),
            "only usable ids in the heartbeat: {:?}",
            ping.job_ids.iter().map(|i| i.len()).collect::<Vec<_>>()
        );
    }
    assert_eq!(health["jobs"]["taken"], 4, "{health}");
    let spooled = std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0);
    assert_eq!(
        spooled, 0,
        "nothing spooled for ids that can never be delivered"
    );
}
