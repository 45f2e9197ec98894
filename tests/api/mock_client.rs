//! The client API where official clients rely on it: `/status-sync?wait=` (the JavaScript
//! client's `runSync` past the sync wait), `?wait=` clamped as on the platform, and
//! `/purge-queue` saying which jobs it removed. The test plays the worker through the worker
//! API, so every step is awaited, not slept on.

use std::time::{Duration, Instant};

use mock_queue::Route;
use serde_json::{json, Value};

use crate::helpers::{client_with_key, spawn_mock_with, test_mock_options, EP};

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_sync_waits_for_the_job_to_end_and_answers_like_status() {
    let mock = spawn_mock_with(test_mock_options());
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    let (_, job) = send(
        client
            .post(format!("{base}/run"))
            .json(&json!({"input": {"a": 1}})),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let (_, taken) = send(client.get(format!("{base}/job-take/w?job_in_progress=0"))).await;
    assert_eq!(taken["id"].as_str(), Some(id.as_str()));

    // Nothing ends it within the wait: the status as it is then.
    let started = Instant::now();
    let (status, body) = send(client.get(format!("{base}/status-sync/{id}?wait=1000"))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("IN_PROGRESS"))
    );
    assert!(started.elapsed() >= Duration::from_millis(900), "it waited");

    // The job ends while a status-sync waits: it answers then, with the result, not after
    // its minute.
    let before = mock.requests(Route::Client);
    let asked = Instant::now();
    let waiting = tokio::spawn(send(
        client.get(format!("{base}/status-sync/{id}?wait=60000")),
    ));
    mock.state()
        .wait_for(crate::helpers::WAIT, |i| {
            (i.requests.get(&Route::Client).copied().unwrap_or(0) > before).then_some(())
        })
        .await
        .expect("the status-sync arrived");
    let (code, _) = send(
        client
            .post(format!("{base}/job-done/w/{id}?isStream=false"))
            .json(&json!({"output": {"done": true}})),
    )
    .await;
    assert_eq!(code, 200);
    let (status, body) = waiting.await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "answered when the job ended"
    );
    assert_eq!(status, 200);
    assert_eq!(body["status"], "COMPLETED");
    assert_eq!(body["output"], json!({"done": true}));
    assert_eq!(body["id"].as_str(), Some(id.as_str()));

    let (status, body) = send(client.post(format!("{base}/status-sync/{id}"))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("COMPLETED")),
        "POST too"
    );
    let (status, body) = send(client.get(format!("{base}/status-sync/nope?wait=5000"))).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_outside_the_platform_range_is_clamped_and_a_non_number_is_a_json_400() {
    let mock = spawn_mock_with(test_mock_options());
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    let job = json!({"input": {}});

    for wait in ["abc", "", "1e3x"] {
        let (status, body) = send(
            client
                .post(format!("{base}/runsync?wait={wait}"))
                .json(&job),
        )
        .await;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some("wait")),
            "{wait:?}: {body}"
        );
        let (status, body) = send(client.get(format!("{base}/status-sync/x?wait={wait}"))).await;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some("wait")),
            "{wait:?}: {body}"
        );
    }
    assert!(
        mock.endpoint(EP).jobs.is_empty(),
        "a refused runsync queues nothing"
    );

    // Below the range: one second, not an error and not zero.
    let started = Instant::now();
    let (status, body) = send(client.post(format!("{base}/runsync?wait=-5")).json(&job)).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("IN_QUEUE")),
        "{body}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    send(client.post(format!("{base}/purge-queue"))).await;

    // Above the range (and above u64): accepted, and answered when the job ends.
    let sync = tokio::spawn(send(
        client
            .post(format!("{base}/runsync?wait=99999999999999999999999"))
            .json(&job),
    ));
    let id = mock
        .state()
        .wait_for(crate::helpers::WAIT, |i| {
            let queue = i.endpoints.get(EP)?;
            queue.pending.iter().find_map(|job| {
                let id = job.id()?;
                id.starts_with("sync-").then(|| id.to_owned())
            })
        })
        .await
        .unwrap();
    let (_, taken) = send(client.get(format!("{base}/job-take/w?job_in_progress=0"))).await;
    assert_eq!(taken["id"].as_str(), Some(id.as_str()));
    let (code, _) = send(
        client
            .post(format!("{base}/job-done/w/{id}?isStream=false"))
            .json(&json!({"output": "ok"})),
    )
    .await;
    assert_eq!(code, 200);
    let (status, body) = tokio::time::timeout(crate::helpers::WAIT, sync)
        .await
        .expect("answered when the job ended")
        .unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("COMPLETED")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_queue_says_which_jobs_it_removed_and_leaves_held_jobs_alone() {
    let mock = spawn_mock_with(test_mock_options());
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    let mut ids = Vec::new();
    for n in 0..3 {
        let (_, job) = send(
            client
                .post(format!("{base}/run"))
                .json(&json!({"input": {"n": n}})),
        )
        .await;
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    let (_, held) = send(client.get(format!("{base}/job-take/w?job_in_progress=0"))).await;
    assert_eq!(held["id"].as_str(), Some(ids[0].as_str()));

    let (status, body) = send(client.post(format!("{base}/purge-queue"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"removed": 2, "status": "completed", "ids": [ids[1], ids[2]]})
    );
    for purged in &ids[1..] {
        let (status, body) = send(client.get(format!("{base}/status/{purged}"))).await;
        assert_eq!(status, 404);
        assert!(body["error"].as_str().unwrap().contains("purged"), "{body}");
    }
    let (status, body) = send(client.get(format!("{base}/status/{}", ids[0]))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("IN_PROGRESS"))
    );
    let (_, again) = send(client.post(format!("{base}/purge-queue"))).await;
    assert_eq!(
        again,
        json!({"removed": 0, "status": "completed", "ids": []})
    );
}
