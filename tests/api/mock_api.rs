//! The mock queue's client API and job lifecycle: what the provider's API does, closely enough
//! for the official SDK and for users testing locally.

use std::time::Duration;

use mock_queue::MockOptions;
use runpod_protocol::limits::{MAX_RUNSYNC_BODY, MAX_RUN_BODY};
use serde_json::{json, Value};

use crate::helpers::{
    client_with_key, spawn_mock_with, test_config, test_mock_options, TestWorker, EP, WAIT,
};

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(client: &reqwest::Client, url: String) -> (u16, Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_http_errors_and_the_mock_keeps_serving() {
    let mock = spawn_mock_with(MockOptions {
        max_queued: Some(2),
        ..test_mock_options()
    });
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    let anonymous = reqwest::Client::new();

    let no_key = anonymous
        .post(format!("{base}/run"))
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    assert!(no_key
        .text()
        .await
        .unwrap()
        .contains("missing Authorization"));
    let wrong = anonymous
        .get(format!("{base}/health"))
        .header("authorization", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let raw = anonymous
        .get(format!("{base}/health"))
        .header("authorization", "test-key")
        .send()
        .await
        .unwrap();
    assert_eq!(
        raw.status(),
        200,
        "the raw key (SDK worker style) is accepted too"
    );

    let not_json = client
        .post(format!("{base}/run"))
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    assert!(not_json.text().await.unwrap().contains("not JSON"));
    let (status, body) = post(&client, format!("{base}/run"), json!({"webhook": "x"})).await;
    assert_eq!(
        (
            status,
            body["error"]
                .as_str()
                .unwrap()
                .contains("`input` is required")
        ),
        (400, true)
    );
    let (status, _) = post(&client, format!("{base}/run"), json!({"input": [1]})).await;
    assert_eq!(status, 400);

    let big = "x".repeat(MAX_RUN_BODY);
    let (status, body) = post(
        &client,
        format!("{base}/run"),
        json!({"input": {"blob": big}}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let bigger = "x".repeat(MAX_RUNSYNC_BODY);
    let (status, _) = post(
        &client,
        format!("{base}/runsync"),
        json!({"input": {"blob": bigger}}),
    )
    .await;
    assert_eq!(status, 413);

    let (status, body) = get(&client, format!("{base}/status/nope")).await;
    assert_eq!(status, 404);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("job nope not found"));
    let (status, body) = get(&client, format!("{}/v2/{EP}/nowhere", mock.base_url())).await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (404, "no route for GET /v2/ep/nowhere")
    );
    let (status, body) = get(&client, format!("{base}/run")).await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (405, "GET is not allowed on /v2/ep/run")
    );
    let (status, body) = post(
        &client,
        format!("{base}/job-done/w9/nope"),
        json!({"output": 1}),
    )
    .await;
    assert_eq!(status, 404, "a job-done for a job nobody holds: {body}");

    // Bounded: the third queued job is refused.
    for _ in 0..2 {
        assert_eq!(
            post(&client, format!("{base}/run"), json!({"input": {}}))
                .await
                .0,
            200
        );
    }
    let (status, body) = post(&client, format!("{base}/run"), json!({"input": {}})).await;
    assert_eq!(status, 429, "{body}");
    let (status, body) = post(&client, format!("{base}/purge-queue"), json!(null)).await;
    assert_eq!(
        (status, &body["removed"], &body["status"]),
        (200, &json!(2), &json!("completed"))
    );
    assert_eq!(
        post(&client, format!("{base}/run"), json!({"input": {}}))
            .await
            .0,
        200,
        "still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_status_stream_cancel_retry_and_health_follow_the_documented_shapes() {
    let mock = spawn_mock_with(MockOptions {
        long_poll: Duration::from_secs(2),
        ..test_mock_options()
    });
    let worker = TestWorker::start_on(mock.clone(), test_config(), |h| h, 200).await;
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();

    let (_, sync) = post(
        &client,
        format!("{base}/runsync"),
        json!({"input": {"task": "echo", "a": 1}, "junk": 1}),
    )
    .await;
    assert_eq!(sync["status"], "COMPLETED", "{sync}");
    assert!(sync["id"].as_str().unwrap().starts_with("sync-"));
    assert_eq!(sync["output"], json!({"task": "echo", "a": 1}));
    assert!(
        sync["delayTime"].is_u64() && sync["executionTime"].is_u64(),
        "{sync}"
    );
    assert_eq!(sync["workerId"], "w1");

    let (_, queued) = post(
        &client,
        format!("{base}/run"),
        json!({"input": {"task": "echo", "stream": 3, "sleep_ms": 300}}),
    )
    .await;
    assert_eq!(queued["status"], "IN_QUEUE");
    let id = queued["id"].as_str().unwrap().to_owned();
    mock.state()
        .wait_for(WAIT, |i| {
            i.endpoints
                .get(EP)?
                .jobs
                .get(&id)?
                .state
                .is_final()
                .then_some(())
        })
        .await
        .unwrap();
    let (_, first) = get(&client, format!("{base}/stream/{id}")).await;
    assert_eq!(first["status"], "COMPLETED");
    assert_eq!(first["stream"].as_array().unwrap().len(), 3);
    assert_eq!(first["stream"][0], json!({"output": {"chunk": 0, "of": 3}}));
    let (_, again) = get(&client, format!("{base}/stream/{id}")).await;
    assert_eq!(
        again["stream"],
        json!([]),
        "each chunk is delivered once, and `stream` is always there"
    );

    let (_, failing) = post(
        &client,
        format!("{base}/run"),
        json!({"input": {"task": "nope"}}),
    )
    .await;
    let failed_id = failing["id"].as_str().unwrap().to_owned();
    worker.done(&failed_id).await;
    let (_, status) = get(&client, format!("{base}/status/{failed_id}")).await;
    assert_eq!(status["status"], "FAILED");
    assert_eq!(status["output"]["error_type"], "InvalidInput", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("InvalidInput"),
        "{status}"
    );
    let (code, retried) = post(&client, format!("{base}/retry/{failed_id}"), json!(null)).await;
    assert_eq!((code, retried["status"].as_str()), (200, Some("IN_QUEUE")));
    let (code, _) = post(&client, format!("{base}/retry/{id}"), json!(null)).await;
    assert_eq!(code, 400, "a COMPLETED job cannot be retried");

    let (_, long) = post(
        &client,
        format!("{base}/run"),
        json!({"input": {"task": "echo", "sleep_ms": 60000}}),
    )
    .await;
    let long_id = long["id"].as_str().unwrap().to_owned();
    // Held, and known to the worker's heartbeat: a ping already in flight when the queue handed
    // the job out would not list it yet, and must not pass for the worker abandoning it.
    let listed_at = mock
        .state()
        .wait_for(WAIT, |i| {
            let pings = &i.endpoints.get(EP)?.pings;
            pings.iter().rposition(|p| p.job_ids.contains(&long_id))
        })
        .await
        .unwrap();
    let (_, cancelled) = post(&client, format!("{base}/cancel/{long_id}"), json!(null)).await;
    assert_eq!(cancelled, json!({"id": long_id, "status": "CANCELLED"}));
    let abandoned = mock
        .state()
        .wait_for(WAIT, |i| {
            let pings = &i.endpoints.get(EP)?.pings;
            let last = pings.last()?;
            (pings.len() > listed_at + 1 && !last.job_ids.contains(&long_id)).then_some(())
        })
        .await;
    assert!(
        abandoned.is_some(),
        "the worker dropped the cancelled job from its heartbeat"
    );
    assert_eq!(
        worker.health().await["jobs"]["cancelled"],
        1,
        "and abandoned it"
    );

    let (_, health) = get(&client, format!("{base}/health")).await;
    assert_eq!(health["jobs"]["completed"], 2, "{health}");
    assert_eq!(health["workers"]["ready"], 1, "{health}");
    assert_eq!(health["jobs"]["inQueue"], 0, "{health}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_requeues_the_job_and_the_stale_holder_is_refused_and_stopped() {
    let mock = spawn_mock_with(MockOptions {
        long_poll: Duration::from_secs(1),
        lease_timeout: Duration::from_millis(500),
        ..test_mock_options()
    });
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    mock.enqueue(EP, json!({"id": "j", "input": {}}));

    let (_, taken) = get(&client, format!("{base}/job-take/ghost?job_in_progress=0")).await;
    assert_eq!(taken["id"], "j");
    // "ghost" never pings: the lease runs out and the job goes back to the queue.
    let (_, again) = get(&client, format!("{base}/job-take/w2?job_in_progress=0")).await;
    assert_eq!(again["id"], "j", "requeued after the lease");
    let (code, refused) = post(
        &client,
        format!("{base}/job-done/ghost/j?isStream=false"),
        json!({"output": "late"}),
    )
    .await;
    assert_eq!(code, 404, "{refused}");
    let (_, stop) = get(&client, format!("{base}/job-stop/ghost")).await;
    assert_eq!(stop, json!({"jobsToStop": ["j"]}));

    // w2 pings, so its lease holds past the timeout.
    for _ in 0..3 {
        assert_eq!(
            get(&client, format!("{base}/ping/w2?job_id=j")).await.0,
            200
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, _) = post(
        &client,
        format!("{base}/job-done/w2/j?isStream=false"),
        json!({"output": "ok"}),
    )
    .await;
    assert_eq!(code, 200);
    let (_, status) = get(&client, format!("{base}/status/j")).await;
    assert_eq!(
        (
            status["status"].as_str(),
            status["output"].as_str(),
            status["retries"].as_u64()
        ),
        (Some("COMPLETED"), Some("ok"), Some(1))
    );
    assert_eq!(
        get(&client, format!("{base}/health")).await.1["jobs"]["retried"],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_timeout_marks_timed_out_ttl_deletes_and_webhooks_get_the_final_status() {
    let mock = spawn_mock_with(MockOptions {
        long_poll: Duration::from_secs(1),
        timeout_grace: Duration::ZERO,
        ..test_mock_options()
    });
    // Webhooks carry no API key (the platform's do not either): the target mock needs none.
    let hook = spawn_mock_with(MockOptions {
        api_key: None,
        ..test_mock_options()
    });
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();

    // The webhook target is a second mock: its /run accepts any JSON with an object `input`,
    // so point the hook at a route that records bodies: job-done of a job it holds.
    hook.enqueue("hooks", json!({"id": "h", "input": {}}));
    let (_, _) = get(
        &client,
        format!("{}/v2/hooks/job-take/catcher", hook.base_url()),
    )
    .await;
    let webhook = format!(
        "{}/v2/hooks/job-done/catcher/h?isStream=false",
        hook.base_url()
    );

    let (_, job) = post(
        &client,
        format!("{base}/run"),
        json!({"input": {}, "policy": {"executionTimeout": 200}, "webhook": webhook}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let (_, taken) = get(&client, format!("{base}/job-take/slow?job_in_progress=0")).await;
    assert_eq!(taken["id"].as_str(), Some(id.as_str()));
    assert_eq!(
        taken["policy"]["executionTimeout"], 200,
        "policy reaches the worker"
    );
    let (_, stop) = get(&client, format!("{base}/job-stop/slow")).await;
    assert_eq!(
        stop["jobsToStop"][0].as_str(),
        Some(id.as_str()),
        "the holder is told to stop"
    );
    let (_, status) = get(&client, format!("{base}/status/{id}")).await;
    assert_eq!(status["status"], "TIMED_OUT");
    let delivered = hook
        .wait_done("hooks", "h", WAIT)
        .await
        .expect("webhook delivered");
    assert_eq!(delivered.body["status"], "TIMED_OUT");
    assert_eq!(delivered.body["id"].as_str(), Some(id.as_str()));

    let (_, short) = post(
        &client,
        format!("{base}/run"),
        json!({"input": {}, "policy": {"ttl": 200}}),
    )
    .await;
    let short_id = short["id"].as_str().unwrap().to_owned();
    let deleted = mock
        .state()
        .wait_for(WAIT, |i| {
            (!i.endpoints.get(EP)?.jobs.contains_key(&short_id)).then_some(())
        })
        .await;
    assert!(deleted.is_some());
    assert_eq!(
        get(&client, format!("{base}/status/{short_id}")).await.0,
        404
    );
}
