//! A failing queue gets a bounded request rate, and the worker recovers when it heals.

use std::time::Duration;

use mock_queue::{Fault, Route};
use serde_json::json;

use crate::helpers::{test_config, TestWorker};

/// How much earlier than asked a timer may fire, as seen across two processes' clocks.
const TIMER_SLACK: Duration = Duration::from_millis(20);

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

    // It keeps trying, and each wait is at least half its doubling ceiling (250 ms, 500 ms,
    // 1 s, 2 s): measured between the requests as they arrive, so a slow machine only makes
    // the gaps longer.
    let times = mock
        .wait_for_requests(Route::Take, 5, Duration::from_secs(20))
        .await
        .expect("it keeps trying");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    println!("job-take against a queue answering 500: gaps {gaps:?} (the SDK sends ~750/s)");
    for (i, gap) in gaps.iter().enumerate() {
        let ceiling = Duration::from_millis(250 << i).min(Duration::from_secs(2));
        assert!(*gap >= ceiling / 2 - TIMER_SLACK, "gap {i}: {gaps:?}");
    }

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
    let times = mock
        .wait_for_requests(Route::Take, 3, Duration::from_secs(10))
        .await
        .expect("it keeps trying");
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_secs(1) - TIMER_SLACK,
            "one take per second under 429: {gap:?}"
        );
    }
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
