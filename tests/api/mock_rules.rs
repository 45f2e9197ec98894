//! The mock queue is strict where the platform is: `policy` and `webhook` are checked at
//! submission with JSON errors that name the field, endpoints that do not exist are 404s, and
//! a connection that stalls in its headers is closed.

use std::time::Duration;

use mock_queue::MockOptions;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{client_with_key, spawn_mock_with, test_mock_options, EP, WAIT};

async fn post(client: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A mock with the platform's minimums, as `local` and `mock-queue` run by default.
fn strict_mock() -> std::sync::Arc<mock_queue::MockQueue> {
    spawn_mock_with(MockOptions {
        strict_policy_minimums: true,
        ..test_mock_options()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_outside_the_platform_ranges_is_a_json_400_naming_the_field() {
    let mock = strict_mock();
    let run = format!("{}/v2/{EP}/run", mock.base_url());
    let client = client_with_key();
    let refused = [
        (json!({"executionTimeout": 4999}), "policy.executionTimeout"),
        (
            json!({"executionTimeout": 604_800_001u64}),
            "policy.executionTimeout",
        ),
        (
            json!({"executionTimeout": "600000"}),
            "policy.executionTimeout",
        ),
        (json!({"ttl": 9999}), "policy.ttl"),
        (json!({"ttl": -1}), "policy.ttl"),
        (json!({"lowPriority": "yes"}), "policy.lowPriority"),
        (json!({"timeout": 10000}), "policy.timeout"),
        (json!("fast"), "policy"),
    ];
    for (policy, field) in refused {
        let (status, body) = post(&client, &run, json!({"input": {}, "policy": policy})).await;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some(field)),
            "{body}"
        );
        assert!(
            body["error"].as_str().unwrap().starts_with(field),
            "the message names the field: {body}"
        );
    }
    let (status, body) = post(
        &client,
        &run,
        json!({"input": {}, "policy": {"executionTimeout": 5000, "ttl": 10000, "lowPriority": true}}),
    )
    .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("IN_QUEUE")));
    assert_eq!(
        mock.endpoint(EP).pending.len(),
        1,
        "only the valid job was queued"
    );

    // The flag for tests relaxes the minimums, nothing else.
    let relaxed = spawn_mock_with(test_mock_options());
    let run = format!("{}/v2/{EP}/run", relaxed.base_url());
    let short = json!({"input": {}, "policy": {"executionTimeout": 200, "ttl": 300}});
    assert_eq!(post(&client, &run, short).await.0, 200);
    let (status, body) = post(&client, &run, json!({"input": {}, "policy": {"ttl": "x"}})).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("policy.ttl")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_a_policy_gets_the_platform_default_execution_timeout_and_ttl() {
    let mock = strict_mock();
    let client = client_with_key();
    let run = format!("{}/v2/{EP}/run", mock.base_url());
    let (_, job) = post(&client, &run, json!({"input": {}})).await;
    let id = job["id"].as_str().unwrap();
    let record = mock.endpoint(EP).jobs[id].clone();
    assert_eq!(record.execution_timeout, Duration::from_secs(600));
    assert_eq!(record.ttl, Duration::from_secs(24 * 3600));
    let (_, job) = post(
        &client,
        &run,
        json!({"input": {}, "policy": {"ttl": 60000}}),
    )
    .await;
    let record = mock.endpoint(EP).jobs[job["id"].as_str().unwrap()].clone();
    assert_eq!(
        (record.execution_timeout, record.ttl),
        (Duration::from_secs(600), Duration::from_secs(60))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_urls_are_checked_at_submission() {
    let mock = strict_mock();
    let client = client_with_key();
    let base = format!("{}/v2/{EP}", mock.base_url());
    for webhook in [
        json!("not a url"),
        json!("ftp://example.com/hook"),
        json!(42),
    ] {
        for route in ["run", "runsync"] {
            let body = json!({"input": {}, "webhook": webhook});
            let (status, answer) = post(&client, &format!("{base}/{route}"), body).await;
            assert_eq!(
                (status, answer["field"].as_str()),
                (400, Some("webhook")),
                "{route} {webhook}: {answer}"
            );
        }
    }
    assert!(mock.endpoint(EP).jobs.is_empty(), "nothing was queued");
    let body = json!({"input": {}, "webhook": "https://example.com/hook"});
    assert_eq!(post(&client, &format!("{base}/run"), body).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_does_not_exist_is_a_404_where_only_some_are_served() {
    let mock = spawn_mock_with(MockOptions {
        endpoint_ids: Some(vec!["local".to_owned()]),
        ..test_mock_options()
    });
    let client = client_with_key();
    let base = mock.base_url();
    let (status, body) = post(
        &client,
        &format!("{base}/v2/other/run"),
        json!({"input": {}}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("/v2/local"),
        "it says which endpoint exists: {body}"
    );
    let take = client
        .get(format!("{base}/v2/other/job-take/w?job_in_progress=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(take.status(), 404, "worker routes too");
    assert!(
        mock.state().read(|i| !i.endpoints.contains_key("other")),
        "no queue was made for it"
    );
    let (status, _) = post(
        &client,
        &format!("{base}/v2/local/run"),
        json!({"input": {}}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stalls_in_its_headers_is_closed_after_the_timeout() {
    let mock = spawn_mock_with(MockOptions {
        header_read_timeout: Duration::from_millis(300),
        ..test_mock_options()
    });
    let address = mock.base_url().trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(b"GET /v2/ep/health HTTP/1.1\r\nHost: x\r\nAuthoriz")
        .await
        .unwrap();
    // The server closes it (after at most an error response): the read ends.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, stalled.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the stalled connection is still open");
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains("200 OK"), "{text}");

    // A request that sends its head at once is served as before.
    let answer = client_with_key()
        .get(format!("{}/v2/{EP}/health", mock.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_this_machine_or_its_network_are_refused_unless_allowed() {
    let mock = spawn_mock_with(MockOptions {
        allow_private_webhooks: false,
        ..test_mock_options()
    });
    let client = client_with_key();
    let run = format!("{}/v2/{EP}/run", mock.base_url());
    for webhook in [
        "http://127.0.0.1:9/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/hook",
        "http://localhost:8080/hook",
    ] {
        let (status, answer) = post(&client, &run, json!({"input": {}, "webhook": webhook})).await;
        assert_eq!(
            (status, answer["field"].as_str()),
            (400, Some("webhook")),
            "{webhook}: {answer}"
        );
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("--allow-private-webhooks"),
            "{answer}"
        );
    }
    let body = json!({"input": {}, "webhook": "https://example.com/hook"});
    assert_eq!(post(&client, &run, body).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhooks_redirect_is_not_followed_with_the_jobs_body() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    // Where a redirect would send the body, and the webhook that points there.
    let stolen = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let elsewhere = format!("http://{}/stolen", listener.local_addr().unwrap());
    let counter = stolen.clone();
    let app = axum::Router::new().route(
        "/stolen",
        axum::routing::post(move || async move {
            counter.fetch_add(1, Ordering::SeqCst);
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (hits, hit) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(tokio::sync::Notify::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook = format!("http://{}/hook", listener.local_addr().unwrap());
    let (counter, notify) = (hits.clone(), hit.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || async move {
            counter.fetch_add(1, Ordering::SeqCst);
            notify.notify_one();
            (
                axum::http::StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, elsewhere)],
            )
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mock = spawn_mock_with(MockOptions {
        long_poll: Duration::from_secs(1),
        timeout_grace: Duration::ZERO,
        ..test_mock_options()
    });
    let client = client_with_key();
    let base = format!("{}/v2/{EP}", mock.base_url());
    let body = json!({"input": {}, "policy": {"executionTimeout": 200}, "webhook": webhook});
    assert_eq!(post(&client, &format!("{base}/run"), body).await.0, 200);
    // Taken and never answered: timed out, and the webhook is called with the final status.
    let taken = client
        .get(format!("{base}/job-take/slow?job_in_progress=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(taken.status(), 200);
    // Three attempts (a redirect is not a success); had one been followed, its body would have
    // reached `elsewhere` before the next attempt.
    tokio::time::timeout(WAIT, async {
        while hits.load(Ordering::SeqCst) < 3 {
            hit.notified().await;
        }
    })
    .await
    .expect("three webhook attempts");
    assert_eq!(
        stolen.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}
