//! The heartbeat lists the jobs in hand and keeps its rhythm whatever the handlers do.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{test_config, TestWorker, EP, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_lists_in_flight_ids_and_keeps_its_rhythm_while_handlers_block_every_executor_thread()
{
    let mut config = test_config();
    config.gpu.simulate = Some("24GB".parse().unwrap()); // block_ms is a simulate-mode test tool
    let worker = TestWorker::start(config, |h| h, 200).await;
    let mock = worker.mock.clone();
    mock.state()
        .wait_for(WAIT, |i| {
            (!i.endpoints.get(EP)?.pings.is_empty()).then_some(())
        })
        .await
        .expect("a first, idle ping");
    // Two jobs that block a thread each: the worker's whole async runtime (2 threads) stalls.
    worker.enqueue("b1", json!({"task": "echo", "block_ms": 2000}));
    worker.enqueue("b2", json!({"task": "echo", "block_ms": 2000}));
    worker.done("b1").await;
    worker.done("b2").await;

    let pings = worker.mock.endpoint(EP).pings;
    let with_both: Vec<_> = pings
        .iter()
        .filter(|p| p.job_ids.contains(&"b1".to_owned()) && p.job_ids.contains(&"b2".to_owned()))
        .collect();
    assert!(
        with_both.len() >= 5,
        "pings every 200 ms list both held jobs during the 2 s block: {}",
        with_both.len()
    );
    let longest_gap = with_both
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .max()
        .unwrap();
    // A heartbeat stalled by the handlers would show a gap of the whole 2 s block; the margin
    // over the 200 ms interval absorbs a loaded test machine.
    assert!(
        longest_gap < Duration::from_millis(1500),
        "heartbeat stalled for {longest_gap:?}"
    );
    assert!(pings.iter().all(|p| p.worker == "w1"
        && p.query.get("runpod_version") == Some(&env!("CARGO_PKG_VERSION").to_owned())));
    let idle = pings.first().unwrap();
    assert!(
        !idle.query.contains_key("job_id"),
        "no job_id parameter when idle: {:?}",
        idle.query
    );
    assert_eq!(
        idle.query.get("gpu").map(String::as_str),
        Some("local"),
        "template query is kept"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_longer_than_its_pings_says_so_in_its_log_when_it_resumes() {
    use std::process::Stdio;

    use crate::helpers::{send_signal, spawn_mock, worker_command};
    use crate::local_process::{lines_of, lines_until};

    let mock = spawn_mock(Duration::from_secs(2));
    let mut child = worker_command(&mock.base_url(), "sleeper")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = lines_of(child.stderr.take().unwrap());
    let pinged = mock
        .state()
        .wait_for(WAIT, |i| {
            i.endpoints
                .get(EP)?
                .workers
                .contains_key("sleeper")
                .then_some(())
        })
        .await;
    assert!(pinged.is_some(), "the worker pings");
    // Pinging every 200 ms (worker_command), then stopped for 3 s.
    send_signal(child.id(), "STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    send_signal(child.id(), "CONT");
    let (line, seen) = tokio::task::spawn_blocking(move || lines_until(&log, "paused"))
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = line.unwrap_or_else(|| panic!("no pause in the log:\n{seen}"));
    assert!(line.contains("between two pings"), "{line}");
}
