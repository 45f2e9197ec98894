//! The exact job-done and job-stream bodies.

use serde_json::{json, Value};

use mock_queue::{JobState, MockOptions};

use crate::helpers::{spawn_mock_with, test_config, test_mock_options, TestWorker, EP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_error_and_stream_bodies_are_exactly_the_protocol_shapes() {
    let worker = TestWorker::start(test_config(), |h| h, 1000).await;

    worker.enqueue("out", json!({"task": "echo", "word": "héllo"}));
    let done = worker.done("out").await;
    assert_eq!(
        done.body,
        json!({"output": {"task": "echo", "word": "héllo"}})
    );
    assert_eq!(done.is_stream.as_deref(), Some("false"));
    assert_eq!(done.worker, "w1");
    // The SDK's headers: the job id, and its (sic) form label on a JSON body.
    assert_eq!(done.headers.request_id.as_deref(), Some("out"));
    assert_eq!(
        done.headers.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );

    worker.enqueue("err", json!({"task": "nope"}));
    let done = worker.done("err").await;
    let expected = json!({
        "success": false,
        "error": "unknown task \"nope\": this worker serves echo",
        "error_type": "InvalidInput",
    });
    assert_eq!(done.body["output"], expected);
    let as_string: Value = serde_json::from_str(done.body["error"].as_str().unwrap()).unwrap();
    assert_eq!(
        as_string, expected,
        "error carries the same object as a JSON string"
    );
    assert_eq!(done.body.as_object().unwrap().len(), 2, "{}", done.body);

    worker.enqueue("st", json!({"task": "echo", "stream": 3}));
    let done = worker.done("st").await;
    assert_eq!(
        done.is_stream.as_deref(),
        Some("true"),
        "a job that streamed ends with isStream=true"
    );
    assert_eq!(done.body, json!({"output": {"task": "echo", "stream": 3}}));
    let streams: Vec<_> = worker
        .mock
        .endpoint(EP)
        .streams
        .into_iter()
        .filter(|s| s.job_id == "st")
        .collect();
    assert!(streams
        .iter()
        .all(|s| s.headers.request_id.as_deref() == Some("st")));
    let chunks: Vec<Value> = streams.into_iter().map(|s| s.body).collect();
    assert_eq!(
        chunks,
        vec![
            json!({"output": {"chunk": 0, "of": 3}}),
            json!({"output": {"chunk": 1, "of": 3}}),
            json!({"output": {"chunk": 2, "of": 3}}),
        ]
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_the_queue_refuses_is_replaced_by_an_error_that_says_why() {
    // The platform refuses a result over its limit with a bare 400 (not 413), and the SDK's
    // worker drops it: the job shows COMPLETED with no output (runpod-python #309).
    let mock = spawn_mock_with(MockOptions {
        max_result_size: 1_000_000,
        ..test_mock_options()
    });
    let worker = TestWorker::start_on(mock, test_config(), |h| h, 1000).await;

    let word = "x".repeat(1_100_000);
    worker.enqueue("big", json!({"task": "echo", "word": word}));
    let done = worker.done("big").await;
    assert_eq!(
        done.body["output"]["error_type"], "OutputTooLarge",
        "{}",
        done.body["output"]
    );
    let message = done.body["output"]["error"].as_str().unwrap();
    assert!(message.contains("HTTP 400"), "{message}");
    assert!(
        message.contains("1100"),
        "the refused size is named: {message}"
    );
    let state = worker.mock.endpoint(EP).jobs["big"].state;
    assert_eq!(
        state,
        JobState::Failed,
        "the client sees FAILED with a cause"
    );

    worker.enqueue("small", json!({"task": "echo", "word": "ok"}));
    assert_eq!(worker.done("small").await.body["output"]["word"], "ok");
    // Counted once the queue's answer to the replacement is back, which can be a moment after
    // the mock recorded it.
    let replaced = r#"runpod_worker_undelivered_results_total{fate="replaced"} 1"#;
    let metrics = worker.metrics_once(|m| m.contains(replaced)).await;
    assert!(metrics.contains(replaced), "{metrics}");
    // The refused output counts as what it became: a failed job, with its error type.
    let health = worker.health().await;
    assert_eq!(
        (&health["jobs"]["completed"], &health["jobs"]["failed"]),
        (&json!(1), &json!(1)),
        "{health}"
    );
    assert!(
        metrics.contains(r#"runpod_worker_error_results_total{error_type="OutputTooLarge"} 1"#),
        "{metrics}"
    );
    worker.stop().await;
}
