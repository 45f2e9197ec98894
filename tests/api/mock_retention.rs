//! A long-running mock holds only what it must: finished jobs are deleted after their
//! retention (`/runsync` sooner than `/run`, as on the platform), and without the test history
//! nothing else piles up, however many jobs pass through.

use std::time::Duration;

use mock_queue::MockOptions;
use serde_json::{json, Value};

use crate::helpers::{
    client_with_key, spawn_mock_with, test_config, test_mock_options, TestWorker, EP, WAIT,
};

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_deleted_after_their_retention_runsync_ones_sooner() {
    let mock = spawn_mock_with(MockOptions {
        long_poll: Duration::from_secs(2),
        run_retention: Duration::from_secs(3600),
        runsync_retention: Duration::from_millis(300),
        ..test_mock_options()
    });
    let worker = TestWorker::start_on(mock.clone(), test_config(), |h| h, 200).await;
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();

    let (_, run) = send(
        client
            .post(format!("{base}/run"))
            .json(&json!({"input": {"task": "echo"}})),
    )
    .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    worker.done(&run_id).await;
    let (_, sync) = send(
        client
            .post(format!("{base}/runsync"))
            .json(&json!({"input": {"task": "echo"}})),
    )
    .await;
    assert_eq!(sync["status"], "COMPLETED", "{sync}");
    let sync_id = sync["id"].as_str().unwrap().to_owned();
    let (status, _) = send(client.get(format!("{base}/status/{sync_id}"))).await;
    assert_eq!(status, 200, "kept until its retention is over");

    let deleted = mock
        .state()
        .wait_for(WAIT, |i| {
            (!i.endpoints.get(EP)?.jobs.contains_key(&sync_id)).then_some(())
        })
        .await;
    assert!(deleted.is_some(), "the runsync result was never deleted");
    let (status, body) = send(client.get(format!("{base}/status/{sync_id}"))).await;
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("300 ms after /runsync"),
        "the 404 says how long results are kept: {body}"
    );
    let (status, body) = send(client.get(format!("{base}/status/{run_id}"))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("COMPLETED")),
        "a /run result is kept longer"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_jobs_through_a_mock_without_history_leave_nothing_behind() {
    let mock = spawn_mock_with(MockOptions {
        long_poll: Duration::from_secs(2),
        // Short, not zero: a /runsync waiting on its job reads the result within milliseconds
        // of its end, but a retention of zero could delete it in between.
        run_retention: Duration::from_millis(50),
        runsync_retention: Duration::from_millis(50),
        record_history: false,
        ..test_mock_options()
    });
    let worker = TestWorker::start_on(mock.clone(), test_config(), |h| h, 100).await;
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    let blob = "x".repeat(100_000);
    const JOBS: usize = 60;
    for n in 0..JOBS {
        let (route, input) = if n % 2 == 0 {
            (
                "runsync",
                json!({"input": {"task": "echo", "blob": blob, "stream": 2}}),
            )
        } else {
            ("run", json!({"input": {"task": "echo", "n": n}}))
        };
        let (status, body) = send(client.post(format!("{base}/{route}")).json(&input)).await;
        assert_eq!(status, 200, "{body}");
    }

    // Every job ends and is forgotten; no record of requests is kept.
    let emptied = mock
        .state()
        .wait_for(WAIT, |i| {
            let queue = i.endpoints.get(EP)?;
            (queue.jobs.is_empty() && queue.pending.is_empty()).then_some(())
        })
        .await;
    let queue = mock.endpoint(EP);
    assert!(emptied.is_some(), "{} jobs still kept", queue.jobs.len());
    assert_eq!(
        (
            queue.done.len(),
            queue.progress.len(),
            queue.streams.len(),
            queue.takes.len(),
            queue.pings.len()
        ),
        (0, 0, 0, 0, 0),
        "no history without record_history"
    );
    assert_eq!(queue.workers.len(), 1, "the worker's latest ping only");
    let (_, health) = send(client.get(format!("{base}/health"))).await;
    assert_eq!(
        health["workers"]["ready"], 1,
        "health still sees the worker: {health}"
    );
    worker.stop().await;
}
