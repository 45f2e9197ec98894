//! Malformed jobs get clear error results, and the worker keeps running.

use serde_json::json;

use crate::helpers::{test_config, TestWorker, EP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_jobs_get_invalid_input_results_and_the_worker_keeps_serving() {
    let worker = TestWorker::start(test_config(), |h| h, 1000).await;
    let mock = &worker.mock;
    mock.enqueue(EP, json!({"id": "no-input"}));
    mock.enqueue(EP, json!({"id": "text-input", "input": "just text"}));
    mock.enqueue(EP, json!({"id": "no-task", "input": {"x": 1}}));
    mock.enqueue(EP, json!({"id": "bad-task", "input": {"task": ["echo"]}}));
    mock.enqueue(EP, json!({"id": "unknown", "input": {"task": "summarise"}}));
    mock.enqueue(
        EP,
        json!({"id": "bad-option", "input": {"task": "echo", "sleep_ms": -5}}),
    );
    mock.enqueue(EP, json!({"input": {"task": "echo"}}));
    mock.enqueue(EP, json!(42));
    mock.enqueue(EP, json!({"id": "good", "input": {"task": "echo"}}));

    let expect = [
        ("no-input", "job has no `input`"),
        (
            "text-input",
            "input must be a JSON object with a \"task\" key, got a string",
        ),
        ("no-task", "input.task is required: one of echo"),
        ("bad-task", "input.task must be a string, got an array"),
        ("unknown", "unknown task \"summarise\""),
        ("bad-option", "input.sleep_ms must be a whole number"),
    ];
    for (id, message) in expect {
        let done = worker.done(id).await;
        assert_eq!(
            done.body["output"]["error_type"], "InvalidInput",
            "{id}: {}",
            done.body
        );
        assert!(
            done.body["output"]["error"]
                .as_str()
                .unwrap()
                .contains(message),
            "{id}: {}",
            done.body
        );
    }
    assert_eq!(worker.done("good").await.body["output"]["task"], "echo");
    let health = worker.health().await;
    assert_eq!(
        health["jobs"]["unanswerable"], 2,
        "the id-less job and the number: {health}"
    );
    assert_eq!(health["status"], "healthy");
    worker.stop().await;
}
