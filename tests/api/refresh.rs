//! Fresh workers on purpose: `refresh_worker` after every job, and a worker whose memory grew
//! past `recycle_memory_factor` (a leak) asking to be replaced before an OOM kill does it.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use worker::handlers::{Handler, JobContext, Prepared};
use worker::outcome::JobError;
use worker::runner::WorkerExit;

use crate::helpers::{test_config, TestWorker, EP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_worker_ends_the_worker_after_one_job_with_stop_pod_on_its_result() {
    let mut config = test_config();
    config.handler.refresh_worker = true;
    config.handler.max_concurrency = 1;
    let worker = TestWorker::start(config, |h| h, 100).await;
    worker.enqueue("first", json!({"task": "echo", "n": 1}));
    let done = worker.done("first").await;
    assert_eq!(
        done.body,
        json!({"output": {"task": "echo", "n": 1}, "stopPod": true})
    );
    worker.enqueue("second", json!({"task": "echo", "n": 2}));
    let mock = worker.mock.clone();
    assert_eq!(worker.finished().await, WorkerExit::Refreshed);
    let left = mock.endpoint(EP);
    assert!(
        left.done.iter().all(|d| d.job_id != "second"),
        "the next job is left to a fresh worker"
    );
    assert_eq!(left.pending.len(), 1, "still queued");
}

/// A handler that keeps the memory each job asks for (`mb`), as a leaking library would.
#[derive(Default)]
struct Leaky(Mutex<Vec<Vec<u8>>>);

#[async_trait::async_trait]
impl Handler for Leaky {
    async fn run(&self, ctx: JobContext, _prepared: Prepared) -> Result<Value, JobError> {
        let mb = ctx.input.get("mb").and_then(Value::as_u64).unwrap_or(0) as usize;
        // Written, so the pages are resident.
        self.0.lock().unwrap().push(vec![1u8; mb * 1_000_000]);
        Ok(json!({"kept_mb": mb}))
    }
}

fn rss() -> u64 {
    docparse::child::status_bytes("self", "VmRSS").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_memory_grew_past_the_factor_asks_to_be_replaced_and_drains() {
    let mut config = test_config();
    config.handler.recycle_memory_factor = 1.5;
    let leaky = Arc::new(Leaky::default());
    let handler = leaky.clone();
    let worker = TestWorker::start(config, |h| h.with_handler("echo", handler), 100).await;

    // Past 1.5× of the level after warm-up whatever the other tests in this process hold.
    let mb = (rss() / 1_000_000) + 300;
    worker.enqueue("leak", json!({"task": "echo", "mb": mb}));
    let done = worker.done("leak").await;
    assert_eq!(done.body["stopPod"], true, "{}", done.body);
    assert_eq!(done.body["output"]["kept_mb"], mb);
    assert_eq!(worker.finished().await, WorkerExit::Refreshed);
    leaky.0.lock().unwrap().clear();
}
