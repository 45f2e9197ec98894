//! `local` as a user runs it: its queue outlives a worker that must be replaced, and it serves
//! only its own endpoint.

use std::process::Command;

use serde_json::{json, Value};

use crate::helpers::WAIT;
use crate::local_process::LocalProcess;

const KEY: &str = "local-test-key";

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replaces_a_worker_that_must_be_replaced_and_its_queue_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runpod.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [handler]
            max_concurrency = 2
            max_consecutive_ooms = 2
            [gpu]
            simulate = "24GB"
            [queue]
            empty_poll_floor_ms = 50
            backoff_initial_ms = 100
            spool_dir = "{}"
            [handlers.echo]
            max_concurrency = 2
            device = "cpu"
            "#,
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let local = LocalProcess::start(&config, KEY, &[]);
    let (base, health) = (local.base.clone(), local.worker_health.clone());
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(WAIT * 4)
        .build()
        .unwrap();
    let api = format!("{base}/v2/local");

    // Only its own endpoint exists: a job sent elsewhere would wait forever.
    let (status, body) = send(
        client
            .post(format!("{base}/v2/locla/run"))
            .json(&json!({"input": {}})),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // Two OOMs in a row: the worker asks to be replaced and drains.
    let mut failed = Vec::new();
    for _ in 0..2 {
        let oom = json!({"input": {"task": "echo", "fail": "oom"}});
        let (_, body) = send(client.post(format!("{api}/runsync")).json(&oom)).await;
        assert_eq!(body["status"], "FAILED", "{body}");
        assert_eq!(
            body["output"]["error_type"], "InsufficientGPUMemory",
            "{body}"
        );
        failed.push(body["id"].as_str().unwrap().to_owned());
    }

    // A fresh worker takes the next job; the queue and its results are still there.
    let next = json!({"input": {"task": "echo", "after": "replacement"}});
    let (status, body) = send(client.post(format!("{api}/runsync")).json(&next)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "COMPLETED", "{body}");
    assert_eq!(body["output"]["after"], "replacement");
    assert_eq!(body["workerId"], "local-worker-2", "{body}");
    for id in &failed {
        let (status, body) = send(client.get(format!("{api}/status/{id}"))).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("FAILED")),
            "{body}"
        );
        assert_eq!(body["workerId"], "local-worker");
    }
    let worker_health = reqwest::get(&health).await.unwrap();
    assert_eq!(
        worker_health.status(),
        200,
        "the fresh worker serves /health at the printed address"
    );

    let pid = local.pid().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let mut child = local.into_child();
    let exited =
        tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || child.wait())).await;
    let Ok(code) = exited else {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!("local did not exit within {WAIT:?} of SIGTERM");
    };
    let code = code.unwrap().unwrap();
    assert_eq!(code.code(), Some(0), "drained and exited cleanly");
}
