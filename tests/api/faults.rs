//! A failing queue gets a bounded request rate, and the worker recovers when it heals.

use std::time::Duration;

use runpod_worker::mock_queue::{Fault, Route};
use serde_json::json;

use crate::helpers::{test_config, TestWorker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_backs_off_against_a_queue_that_answers_500_and_recovers() {
    let mut config = test_config();
    config.queue.backoff_initial_ms = 250;
    config.queue.backoff_max_ms = 2000;
    let mock = crate::helpers::spawn_mock(Duration::from_secs(2));
    mock.set_fault(
        Route::Take,
        Some(Fault {
            status: 500,
            rate: 1.0,
        }),
    );
    let worker = TestWorker::start_on(mock.clone(), config, |h| h, 1000).await;

    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let requests = mock.requests(Route::Take);
    let rate = requests as f64 / window.as_secs_f64();
    println!("job-take against a queue answering 500: {requests} requests in {window:?} ({rate:.1}/s; the SDK sends ~750/s)");
    // 250 ms doubling to 2 s: about 5 requests in 3 s; 10 leaves room for a slow machine.
    assert!(requests <= 10, "{requests} take requests in {window:?}");
    assert!(requests >= 2, "it keeps trying: {requests}");

    mock.set_fault(Route::Take, None);
    worker.enqueue("healed", json!({"task": "echo"}));
    worker.done("healed").await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_take_waits_the_configured_pause() {
    let config = test_config(); // rate_limited_wait_s = 1
    let mock = crate::helpers::spawn_mock(Duration::from_secs(2));
    mock.set_fault(
        Route::Take,
        Some(Fault {
            status: 429,
            rate: 1.0,
        }),
    );
    let worker = TestWorker::start_on(mock.clone(), config, |h| h, 1000).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let requests = mock.requests(Route::Take);
    assert!(
        (2..=4).contains(&requests),
        "one take per second under 429: {requests}"
    );
    mock.set_fault(Route::Take, None);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_post_that_fails_with_500_is_retried_until_it_lands() {
    let mock = crate::helpers::spawn_mock(Duration::from_secs(2));
    mock.set_fault(
        Route::Done,
        Some(Fault {
            status: 503,
            rate: 1.0,
        }),
    );
    let mut config = test_config();
    config.queue.delivery_retry_s = 20;
    let worker = TestWorker::start_on(mock.clone(), config, |h| h, 1000).await;
    worker.enqueue("r", json!({"task": "echo"}));
    mock.state()
        .wait_for(crate::helpers::WAIT, |i| {
            (i.requests.get(&Route::Done).copied().unwrap_or(0) >= 2).then_some(())
        })
        .await
        .unwrap();
    mock.set_fault(Route::Done, None);
    let done = worker.done("r").await;
    assert_eq!(done.body["output"]["task"], "echo");
    worker.stop().await;
}
