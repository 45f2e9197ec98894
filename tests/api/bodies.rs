//! The exact job-done and job-stream bodies.

use serde_json::{json, Value};

use crate::helpers::{test_config, TestWorker, EP};

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
    let chunks: Vec<Value> = worker
        .mock
        .endpoint(EP)
        .streams
        .into_iter()
        .filter(|s| s.job_id == "st")
        .map(|s| s.body)
        .collect();
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
