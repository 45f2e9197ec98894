//! Where the mock behaves as the platform does for clients: the documented per-route rate
//! limits (429 with `Retry-After`, off unless asked for), and `/stream` held until there is a
//! chunk or the job has ended, as the JavaScript client's polling loop expects. The tests play
//! the worker through the worker API, so every step is awaited, not slept on.

use std::sync::Arc;
use std::time::Duration;

use mock_queue::{MockOptions, MockQueue, RateLimits, Route};
use serde_json::{json, Value};

use crate::helpers::{client_with_key, spawn_mock_with, test_mock_options, EP, WAIT};

/// Status, `Retry-After` and JSON body of a request.
async fn send(request: reqwest::RequestBuilder) -> (u16, Option<String>, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        retry_after,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Queues a job through `/run` and returns its id.
async fn submit(client: &reqwest::Client, base: &str) -> String {
    let (status, _, job) = send(
        client
            .post(format!("{base}/run"))
            .json(&json!({"input": {}})),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    job["id"].as_str().unwrap().to_owned()
}

/// The platform's limits over a minute instead of 10 s, so a slow machine still sends its
/// requests within one window.
fn platform_limits_over_a_minute() -> RateLimits {
    RateLimits {
        window: Duration::from_secs(60),
        ..RateLimits::PLATFORM
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_rate_limit_refuses_the_101st_cancel_with_retry_after_while_run_still_works() {
    let mock = spawn_mock_with(MockOptions {
        rate_limits: Some(platform_limits_over_a_minute()),
        ..test_mock_options()
    });
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    let id = submit(&client, &base).await;

    for n in 1..=100 {
        let (status, _, body) = send(client.post(format!("{base}/cancel/{id}"))).await;
        assert_eq!(status, 200, "cancel {n}: {body}");
    }
    let (status, retry_after, body) = send(client.post(format!("{base}/cancel/{id}"))).await;
    assert_eq!(status, 429, "the 101st cancel: {body}");
    let secs: u64 = retry_after
        .expect("a Retry-After header")
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(
        (1..=60).contains(&secs),
        "Retry-After {secs} within the window"
    );
    let message = body["error"].as_str().expect("a JSON error body");
    assert!(
        message.contains("/cancel") && message.contains("100"),
        "{message}"
    );

    // Other routes and other endpoints have their own windows.
    let (status, _, body) = send(
        client
            .post(format!("{base}/run"))
            .json(&json!({"input": {}})),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("IN_QUEUE")),
        "{body}"
    );
    let other = format!("{}/v2/other/cancel/{id}", mock.base_url());
    let (status, _, body) = send(client.post(other)).await;
    assert_eq!(
        status, 404,
        "another endpoint's cancel passes the limit: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_rate_limit_allows_two_purges_per_window_and_counts_no_request_without_the_key() {
    let mock = spawn_mock_with(MockOptions {
        rate_limits: Some(platform_limits_over_a_minute()),
        ..test_mock_options()
    });
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    // Refused at the gate (401), so they take no place in the window.
    for _ in 0..3 {
        let (status, _, _) = send(reqwest::Client::new().post(format!("{base}/purge-queue"))).await;
        assert_eq!(status, 401);
    }
    for n in 1..=2 {
        let (status, _, body) = send(client.post(format!("{base}/purge-queue"))).await;
        assert_eq!(status, 200, "purge {n}: {body}");
    }
    let (status, retry_after, body) = send(client.post(format!("{base}/purge-queue"))).await;
    assert_eq!(status, 429, "{body}");
    assert!(retry_after.is_some(), "a Retry-After header");
    assert!(
        body["error"].as_str().unwrap().contains("/purge-queue"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_rate_limit_is_off_by_default() {
    let options = test_mock_options();
    assert_eq!(options.rate_limits, None);
    assert_eq!(MockOptions::default().rate_limits, None);
    let mock = spawn_mock_with(options);
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    let id = submit(&client, &base).await;
    for n in 1..=150 {
        let (status, _, body) = send(client.post(format!("{base}/cancel/{id}"))).await;
        assert_eq!(status, 200, "cancel {n}: {body}");
    }
    for n in 1..=5 {
        let (status, _, body) = send(client.post(format!("{base}/purge-queue"))).await;
        assert_eq!(status, 200, "purge {n}: {body}");
    }
}

/// A mock whose `/stream` is held up to `hold`, and a job on it taken by worker `w`.
async fn held_job(hold: Duration) -> (Arc<MockQueue>, String, String) {
    let mock = spawn_mock_with(MockOptions {
        stream_hold: hold,
        ..test_mock_options()
    });
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    let id = submit(&client, &base).await;
    let (_, _, taken) = send(client.get(format!("{base}/job-take/w?job_in_progress=0"))).await;
    assert_eq!(taken["id"].as_str(), Some(id.as_str()));
    (mock, base, id)
}

/// Sends `GET /stream/{id}` and returns once the mock has seen it, with the pending answer.
async fn stream_request(
    mock: &MockQueue,
    base: &str,
    id: &str,
) -> tokio::task::JoinHandle<(u16, Option<String>, Value)> {
    let before = mock.requests(Route::Client);
    let request = client_with_key().get(format!("{base}/stream/{id}"));
    let answer = tokio::spawn(send(request));
    mock.state()
        .wait_for(WAIT, |i| {
            (i.requests.get(&Route::Client).copied().unwrap_or(0) > before).then_some(())
        })
        .await
        .expect("the stream request arrived");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_stream_is_held_until_a_chunk_is_posted_and_answers_when_the_job_ends() {
    // Held far longer than the test waits: only a chunk or the job's end can answer it.
    let (mock, base, id) = held_job(Duration::from_secs(60)).await;
    let client = client_with_key();

    let waiting = stream_request(&mock, &base, &id).await;
    assert!(!waiting.is_finished(), "answered before any chunk");
    let (code, _, _) = send(
        client
            .post(format!("{base}/job-stream/w/{id}?isStream=false"))
            .json(&json!({"output": {"tok": 0}})),
    )
    .await;
    assert_eq!(code, 200);
    let (status, _, body) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("answered once the chunk was posted")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"id": id, "status": "IN_PROGRESS", "stream": [{"output": {"tok": 0}}]}),
        "the chunk posted after the request arrived is in its answer"
    );

    let waiting = stream_request(&mock, &base, &id).await;
    assert!(!waiting.is_finished(), "the chunk was delivered once");
    let (code, _, _) = send(
        client
            .post(format!("{base}/job-done/w/{id}?isStream=true"))
            .json(&json!({"output": []})),
    )
    .await;
    assert_eq!(code, 200);
    let (status, _, body) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("answered when the job ended, not at the hold")
        .unwrap();
    assert_eq!(
        (status, body),
        (200, json!({"id": id, "status": "COMPLETED", "stream": []}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_stream_hold_is_bounded_and_unknown_jobs_are_not_held() {
    let (mock, base, id) = held_job(Duration::from_millis(300)).await;
    let waiting = stream_request(&mock, &base, &id).await;
    let (status, _, body) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("answered at the end of the hold")
        .unwrap();
    assert_eq!(
        (status, body),
        (
            200,
            json!({"id": id, "status": "IN_PROGRESS", "stream": []})
        )
    );

    let (mock, base, _) = held_job(Duration::from_secs(60)).await;
    let waiting = stream_request(&mock, &base, "no-such-job").await;
    let (status, _, body) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("a 404 is not held")
        .unwrap();
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_refuses_a_result_over_20mb_and_a_stream_chunk_over_1mb_with_400_as_the_platform_does()
{
    let (mock, base, id) = held_job(Duration::from_secs(1)).await;
    let client = client_with_key();
    let chunk = json!({"output": "x".repeat(1_000_001)});
    let (status, _, body) = send(
        client
            .post(format!("{base}/job-stream/w/{id}"))
            .json(&chunk),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("over the limit"),
        "{body}"
    );
    let result = json!({"output": "x".repeat(20_000_001)});
    let (status, _, body) =
        send(client.post(format!("{base}/job-done/w/{id}")).json(&result)).await;
    assert_eq!(status, 400, "not 413: {body}");
    let (status, _, _) = send(
        client
            .post(format!("{base}/job-done/w/{id}"))
            .json(&json!({"output": "small"})),
    )
    .await;
    assert_eq!(status, 200, "a result within the limit is taken");
    assert_eq!(mock.endpoint(EP).done.len(), 1);
}
