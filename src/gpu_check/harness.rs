//! A worker in this process against a mock queue in this process, as the checks drive it:
//! submit jobs, wait for their results, read `/health` while they run.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use mock_queue::{MockOptions, MockQueue};
use runpod_protocol::ApiKey;
use worker::config::Config;
use worker::queue::QueueEndpoints;
use worker::runner::{run_worker, StartupError, WorkerExit, WorkerSetup};

/// The endpoint id the checks use.
pub(super) const ENDPOINT: &str = "gpu-check";
/// The key of the check's mock queue.
pub(super) const KEY: &str = "gpu-check-key";
/// Longest wait for one job's result.
const RESULT_WAIT: Duration = Duration::from_secs(120);

/// A mock queue with the check's options.
pub(super) async fn mock_queue() -> Result<Arc<MockQueue>, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let options = MockOptions {
        api_key: Some(ApiKey::new(KEY)),
        long_poll: Duration::from_secs(2),
        ..MockOptions::default()
    };
    MockQueue::start(listener, options)
        .await
        .map(Arc::new)
        .map_err(|e| format!("cannot start the mock queue: {e}"))
}

/// Quick pacing for a worker under check.
pub(super) fn quick(mut config: Config) -> Config {
    config.queue.empty_poll_floor_ms = 20;
    config.queue.backoff_initial_ms = 50;
    config.queue.backoff_max_ms = 500;
    config.queue.delivery_retry_s = 5;
    config.gpu.sample_interval_ms = 20;
    config.server.host = "127.0.0.1".to_owned();
    config.server.port = 0;
    config.queue.spool_dir = std::env::temp_dir().join(format!(
        "runpod-worker-gpu-check-spool-{}",
        uuid::Uuid::new_v4().simple()
    ));
    config
}

/// One in-process worker.
pub(super) struct Harness {
    pub(super) mock: Arc<MockQueue>,
    http: String,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<WorkerExit, StartupError>>,
    client: reqwest::Client,
}

/// A job's answer: its output, or its error object (`error_type`, `retry_after`, ...).
pub(super) type Answer = Result<Value, Value>;

impl Harness {
    /// Starts a worker with `config` (its handlers built from it) against `mock`, and waits
    /// until it is ready.
    pub(super) async fn start(mock: Arc<MockQueue>, config: Config) -> Result<Self, String> {
        let worker_id = format!("check-{}", uuid::Uuid::new_v4().simple());
        let mut endpoints = QueueEndpoints::for_queue(&mock.base_url(), ENDPOINT, &worker_id, KEY);
        endpoints.ping_interval = Duration::from_millis(500);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen on loopback: {e}"))?;
        let http = format!(
            "http://{}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let shutdown = CancellationToken::new();
        let setup = WorkerSetup {
            config,
            endpoints,
            handlers: None,
            gpu: None,
            http_listener: listener,
            shutdown: shutdown.clone(),
            require_cuda: false,
            // A developer's machine is what it is: no fitness checks.
            fitness: worker::runner::Fitness::skipped(),
            pages: None,
            shares_process: false,
        };
        let harness = Self {
            mock,
            http,
            shutdown,
            handle: tokio::spawn(run_worker(setup)),
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(|e| e.to_string())?,
        };
        harness.wait_ready().await?;
        Ok(harness)
    }

    async fn wait_ready(&self) -> Result<(), String> {
        for _ in 0..6000 {
            if self.handle.is_finished() {
                return Err("the worker stopped while starting".to_owned());
            }
            let ready = self.client.get(format!("{}/ready", self.http)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the worker did not become ready within 5 minutes".to_owned())
    }

    /// The worker's `/health`.
    pub(super) async fn health(&self) -> Value {
        match self
            .client
            .get(format!("{}/health", self.http))
            .send()
            .await
        {
            Ok(response) => response.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// Queues one job.
    pub(super) fn submit(&self, id: &str, input: Value) {
        self.mock
            .enqueue(ENDPOINT, json!({ "id": id, "input": input }));
    }

    /// Queues several jobs at once.
    pub(super) fn submit_all(&self, jobs: impl IntoIterator<Item = (String, Value)>) {
        self.mock.enqueue_all(
            ENDPOINT,
            jobs.into_iter()
                .map(|(id, input)| json!({ "id": id, "input": input })),
        );
    }

    /// Waits for `id`'s result.
    pub(super) async fn answer(&self, id: &str) -> Answer {
        answer_of(&self.mock, id).await
    }

    /// Submits one job and waits for its result.
    pub(super) async fn run(&self, id: &str, input: Value) -> Answer {
        self.submit(id, input);
        self.answer(id).await
    }

    /// Drains and stops the worker.
    pub(super) async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }
}

/// Waits for `id`'s result on `mock`.
pub(super) async fn answer_of(mock: &MockQueue, id: &str) -> Answer {
    let Some(done) = mock.wait_done(ENDPOINT, id, RESULT_WAIT).await else {
        return Err(json!({ "error_type": "NoResult", "error": "no result within 2 minutes" }));
    };
    match done.body.get("error").and_then(Value::as_str) {
        Some(text) => Err(serde_json::from_str(text).unwrap_or(json!({ "error": text }))),
        None => Ok(done.body.get("output").cloned().unwrap_or(Value::Null)),
    }
}

/// The `error_type` of an answer, or `"ok"`.
pub(super) fn kind_of(answer: &Answer) -> String {
    match answer {
        Ok(_) => "ok".to_owned(),
        Err(e) => e
            .get("error_type")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned(),
    }
}
