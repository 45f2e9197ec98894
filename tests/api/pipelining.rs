//! The take loop against a slow queue: a second take is asked while the first is answered,
//! never for more jobs than could start; a result being posted holds no job slot; and the
//! results in delivery are bounded by their own budget.

use std::sync::Arc;
use std::time::Duration;

use mock_queue::Route;
use serde_json::json;
use worker::config::{Config, HandlerConfig};

use crate::helpers::{spawn_mock, test_config, GateHandler, TestWorker, EP, WAIT};

/// `slots` jobs at once in the worker, all of the `classify` handler (an echo, or the gate).
fn config_with_slots(slots: u32) -> Config {
    let mut config = test_config();
    config.handler.max_concurrency = slots;
    config.handlers.clear();
    config.handlers.insert(
        "classify".into(),
        HandlerConfig {
            kind: Some("echo".into()),
            max_concurrency: slots,
            ..HandlerConfig::default()
        },
    );
    config
}

/// How many jobs the takes so far asked for.
fn asked(worker: &TestWorker) -> usize {
    worker
        .mock
        .endpoint(EP)
        .takes
        .iter()
        .map(|t| t.batch_size.unwrap_or(1))
        .sum()
}

/// Waits for `n` more heartbeats: every take the worker started before the first of them has
/// reached the queue by the last (a take is one local request; a heartbeat comes every 100 ms).
async fn settle(worker: &TestWorker, n: usize) {
    let seen = worker.mock.endpoint(EP).pings.len();
    let pinged = worker
        .mock
        .state()
        .wait_for(WAIT, |i| {
            (i.endpoints.get(EP)?.pings.len() >= seen + n).then_some(())
        })
        .await;
    assert!(pinged.is_some(), "the worker stopped pinging");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_take_overlaps_a_slow_one_and_never_asks_for_more_than_could_start() {
    let mock = spawn_mock(Duration::from_secs(2));
    for i in 0..12 {
        mock.enqueue(
            EP,
            json!({"id": format!("j{i}"), "input": {"task": "classify"}}),
        );
    }
    let gate = GateHandler::new();
    let worker = TestWorker::start_on(
        mock,
        config_with_slots(4),
        |h| h.with_handler("classify", gate.clone()),
        100,
    )
    .await;
    gate.wait_started(4).await;
    // Slow takes from here: each answered a second after it arrives.
    worker
        .mock
        .set_delay(Route::Take, Some(Duration::from_secs(1)));
    let takes_before = worker.mock.requests(Route::Take) as usize;
    // One slot frees: a take for one job goes out and is held by the queue...
    gate.release(1);
    let arrived = worker
        .mock
        .wait_for_requests(Route::Take, takes_before + 1, WAIT)
        .await;
    assert!(arrived.is_some(), "no take after a slot freed");
    // ...and while it is held, a second slot frees: a second take goes out at once.
    gate.release(1);
    let arrived = worker
        .mock
        .wait_for_requests(Route::Take, takes_before + 2, WAIT)
        .await;
    assert!(arrived.is_some(), "no second take while the first was held");
    gate.wait_started(6).await;
    assert_eq!(
        worker.mock.most_in_flight(Route::Take),
        2,
        "takes in flight at once"
    );

    // Four jobs run again and fill every slot: no further take may ask for anything.
    settle(&worker, 3).await;
    assert_eq!(
        worker.mock.requests(Route::Take) as usize,
        takes_before + 2,
        "a take went out with every slot full"
    );
    assert_eq!(asked(&worker), 6, "asked for more jobs than could start");
    let held = worker.mock.endpoint(EP).pings.last().unwrap().job_ids.len();
    assert_eq!(
        held, 4,
        "jobs taken beyond the free slots wait in the worker"
    );

    gate.release(100);
    for i in 0..12 {
        worker.done(&format!("j{i}")).await;
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_being_posted_holds_no_slot_the_next_job_starts_meanwhile() {
    let mock = spawn_mock(Duration::from_secs(2));
    // Every result is held by the queue for 2 s before it is accepted.
    mock.set_delay(Route::Done, Some(Duration::from_secs(2)));
    for id in ["first", "second"] {
        mock.enqueue(EP, json!({"id": id, "input": {"task": "classify"}}));
    }
    let gate = GateHandler::new();
    gate.release(2);
    let worker = TestWorker::start_on(
        mock,
        config_with_slots(1),
        |h| h.with_handler("classify", gate.clone()),
        100,
    )
    .await;
    gate.wait_started(2).await;
    let done = worker.mock.endpoint(EP).done.len();
    assert_eq!(
        done, 0,
        "the second job started only after a result was accepted"
    );
    assert_eq!(gate.max(), 1, "one slot: one job at a time");
    worker.done("first").await;
    worker.done("second").await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_in_delivery_are_bounded_by_their_own_budget() {
    let mock = spawn_mock(Duration::from_secs(2));
    mock.set_delay(Route::Done, Some(Duration::from_millis(200)));
    for i in 0..6 {
        mock.enqueue(
            EP,
            json!({"id": format!("r{i}"), "input": {"task": "classify"}}),
        );
    }
    let mut config = config_with_slots(4);
    config.queue.max_results_in_delivery = 1;
    let worker = TestWorker::start_on(Arc::clone(&mock), config, |h| h, 100).await;
    for i in 0..6 {
        worker.done(&format!("r{i}")).await;
    }
    assert_eq!(
        worker.mock.most_in_flight(Route::Done),
        1,
        "results posted at once beyond max_results_in_delivery"
    );
    worker.stop().await;
}
