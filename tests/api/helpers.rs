//! Starting a mock queue (on its own runtime thread, so a test can block the worker's runtime
//! without silencing the queue) and an in-process worker against it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mock_queue::{MockOptions, MockQueue};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use worker::config::Config;
use worker::handlers::{Handler, HandlerSet, JobContext, Prepared};
use worker::outcome::JobError;
use worker::queue::QueueEndpoints;
use worker::runner::{run_worker, Fitness, StartupError, WorkerExit, WorkerSetup};

pub const EP: &str = "ep";
pub const WORKER: &str = "w1";
pub const WAIT: Duration = Duration::from_secs(15);

/// Starts a mock queue on its own thread and runtime; it lives as long as the returned value.
pub fn spawn_mock(long_poll: Duration) -> Arc<MockQueue> {
    spawn_mock_with_lease(long_poll, Duration::from_secs(30))
}

/// The same, with a lease timeout.
pub fn spawn_mock_with_lease(long_poll: Duration, lease_timeout: Duration) -> Arc<MockQueue> {
    spawn_mock_with(MockOptions {
        long_poll,
        lease_timeout,
        ..test_mock_options()
    })
}

/// Options for test mocks: the key `test-key`, quick webhook retries, webhooks to this
/// machine, and `policy` durations under the platform's minimums accepted (tests use short
/// deadlines).
pub fn test_mock_options() -> MockOptions {
    MockOptions {
        api_key: Some(runpod_protocol::ApiKey::new("test-key")),
        webhook_retry_delay: Duration::from_millis(200),
        strict_policy_minimums: false,
        // The tests' webhook servers are on 127.0.0.1.
        allow_private_webhooks: true,
        ..MockOptions::default()
    }
}

/// A mock with any options, on its own thread and runtime.
pub fn spawn_mock_with(options: MockOptions) -> Arc<MockQueue> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mock = Arc::new(MockQueue::start(listener, options).await.unwrap());
            tx.send(mock.clone()).unwrap();
            // Serve until the test drops its handle (then only this one is left).
            while Arc::strong_count(&mock) > 1 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    });
    rx.recv().unwrap()
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_runpod-worker");
/// The document parser's child process.
pub const PARSER: &str = env!("CARGO_BIN_EXE_runpod-parse");
/// The binary that links libtorch (`runpod-worker` execs it for the model commands).
pub const TORCH_BIN: &str = env!("CARGO_BIN_EXE_runpod-worker-torch");

/// `runpod.toml` with only echo: a worker process that starts without loading a model.
pub const ECHO_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/echo.toml");

/// Sends signal `name` (`TERM`, `STOP`, `CONT`, ...) to process `pid`, which must exist.
pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// The real binary as a `serve` worker against the mock at `base`, with echo only
/// ([`ECHO_CONFIG`]; set `RUNPOD_WORKER_CONFIG` for another config).
pub fn worker_command(base: &str, worker: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .arg("--http-port")
        .arg("0")
        .env_remove("RUNPOD_ENDPOINT_ID")
        .env("RUNPOD_PING_INTERVAL", "200")
        // The SDK's switch, as its own tests use it: the test machine's disk is not the point.
        .env("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
        .env("RUNPOD_WORKER_CONFIG", ECHO_CONFIG)
        .envs(QueueEndpoints::env_for(base, EP, worker, "test-key"))
        .stdout(Stdio::null());
    command
}

/// The test config's worker against the queue at `base` (worker id `worker`), handlers built
/// from the config, its HTTP endpoints on a free port; it stops when `shutdown` is cancelled.
pub async fn setup_against(base: &str, worker: &str, shutdown: &CancellationToken) -> WorkerSetup {
    let mut endpoints = QueueEndpoints::for_queue(base, EP, worker, "test-key");
    endpoints.ping_interval = Duration::from_millis(200);
    WorkerSetup {
        config: test_config(),
        endpoints,
        handlers: None,
        gpu: None,
        http_listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        shutdown: shutdown.clone(),
        require_cuda: true,
        fitness: Fitness::skipped(),
        pages: Some(Box::new(runpod_worker::console::worker_console)),
        shares_process: false,
    }
}

/// An HTTP client that sends the test key (as the SDK client does, with `Bearer`).
pub fn client_with_key() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", "Bearer test-key".parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A config with short waits, suitable for tests.
pub fn test_config() -> Config {
    let mut config = Config::from_toml(
        r#"
        [handler]
        max_concurrency = 4
        [queue]
        empty_poll_floor_ms = 50
        backoff_initial_ms = 100
        backoff_max_ms = 1000
        rate_limited_wait_s = 1
        delivery_retry_s = 2
        # A stopped test worker abandons its idle long-poll at once (the grace for an answer
        # on its way has its own test, in shutdown.rs, on the real binary).
        take_answer_grace_ms = 0
        [handlers.echo]
        max_concurrency = 4
        device = "cpu"
        "#,
    )
    .unwrap();
    config.server.port = 0;
    // The document parser is part of the worker's setup: the one cargo built beside the tests.
    config.handler.parser = Some(PARSER.into());
    // Each test its own spool, never the repository's.
    config.queue.spool_dir = std::env::temp_dir().join(format!(
        "runpod-worker-test-spool-{}",
        uuid::Uuid::new_v4().simple()
    ));
    // Many workers share this test process, so its RSS grows with every other test's models:
    // the recycle rule is off except where a test turns it on.
    config.handler.recycle_memory_factor = 0.0;
    config
}

pub struct TestWorker {
    pub mock: Arc<MockQueue>,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<WorkerExit, StartupError>>,
    pub http: String,
}

impl TestWorker {
    /// Starts a worker with `config`, handlers adjusted by `customise`, pinging every `ping_ms`.
    pub async fn start(
        config: Config,
        customise: impl FnOnce(HandlerSet) -> HandlerSet,
        ping_ms: u64,
    ) -> Self {
        let mock = spawn_mock(Duration::from_secs(2));
        Self::start_on(mock, config, customise, ping_ms).await
    }

    pub async fn start_on(
        mock: Arc<MockQueue>,
        config: Config,
        customise: impl FnOnce(HandlerSet) -> HandlerSet,
        ping_ms: u64,
    ) -> Self {
        let simulated = config.gpu.simulate.is_some();
        let handlers =
            customise(HandlerSet::build(&config, simulated, simulated).expect("handlers load"));
        Self::start_with(mock, config, Some(handlers), None, true, ping_ms).await
    }

    /// Starts a worker with every part given: handlers (`None`: built from the config), a GPU
    /// probe (`None`: detected), and whether a GPU libtorch cannot use stops it.
    pub async fn start_with(
        mock: Arc<MockQueue>,
        config: Config,
        handlers: Option<HandlerSet>,
        gpu: Option<Arc<dyn worker::gpu::GpuProbe>>,
        require_cuda: bool,
        ping_ms: u64,
    ) -> Self {
        let mut endpoints = QueueEndpoints::for_queue(&mock.base_url(), EP, WORKER, "test-key");
        endpoints.ping_interval = Duration::from_millis(ping_ms);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let setup = WorkerSetup {
            config,
            endpoints,
            handlers,
            gpu,
            http_listener: listener,
            shutdown: shutdown.clone(),
            require_cuda,
            fitness: Fitness::skipped(),
            pages: Some(Box::new(runpod_worker::console::worker_console)),
            shares_process: false,
        };
        let handle = tokio::spawn(run_worker(setup));
        // Until it is ready, /health describes a worker that is starting: wait for `/ready`
        // (or for the worker to end, for tests of start-up failures).
        let deadline = std::time::Instant::now() + WAIT;
        while !handle.is_finished() && std::time::Instant::now() < deadline {
            let ready = reqwest::get(format!("{http}/ready")).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            mock,
            shutdown,
            handle,
            http,
        }
    }

    pub fn enqueue(&self, id: &str, input: Value) {
        self.mock.enqueue(EP, json!({ "id": id, "input": input }));
    }

    pub async fn done(&self, id: &str) -> mock_queue::DoneRecord {
        self.mock
            .wait_done(EP, id, WAIT)
            .await
            .unwrap_or_else(|| panic!("no job-done for {id} within {WAIT:?}"))
    }

    /// Waits until the worker's latest heartbeat lists every one of `ids`: it holds them.
    pub async fn wait_held(&self, ids: &[&str]) {
        let held = self
            .mock
            .state()
            .wait_for(WAIT, |i| {
                let last = i.endpoints.get(EP)?.pings.last()?;
                ids.iter()
                    .all(|id| last.job_ids.iter().any(|j| j == id))
                    .then_some(())
            })
            .await;
        assert!(held.is_some(), "the worker never held {ids:?}");
    }

    /// Waits until the worker's latest heartbeat lists `count` jobs.
    pub async fn wait_held_count(&self, count: usize) {
        let held = self
            .mock
            .state()
            .wait_for(WAIT, |i| {
                (i.endpoints.get(EP)?.pings.last()?.job_ids.len() == count).then_some(())
            })
            .await;
        assert!(held.is_some(), "the worker never held {count} jobs");
    }

    pub async fn health(&self) -> Value {
        reqwest::get(format!("{}/health", self.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The worker's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `/metrics` once `counted` holds of it, or as it is after [`WAIT`]: counters bumped
    /// after the queue's answer (a result's fate) land a moment after the mock saw the post.
    pub async fn metrics_once(&self, counted: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        let mut metrics = self.metrics().await;
        while !counted(&metrics) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            metrics = self.metrics().await;
        }
        metrics
    }

    /// Drains and waits for the worker to return.
    pub async fn stop(self) -> WorkerExit {
        self.shutdown.cancel();
        self.finished().await
    }

    /// Waits for the worker to return by itself.
    pub async fn finished(self) -> WorkerExit {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("worker ended")
            .unwrap()
            .unwrap()
    }

    /// How many results the queue accepted for `id`.
    pub fn results_for(&self, id: &str) -> usize {
        self.mock
            .endpoint(EP)
            .done
            .iter()
            .filter(|d| d.job_id == id)
            .count()
    }
}

/// A handler that holds every job until released, recording how many ran at once.
pub struct GateHandler {
    running: AtomicUsize,
    pub max_seen: AtomicUsize,
    started: watch::Sender<usize>,
    release: Semaphore,
    /// When set, concurrency is also counted on this shared counter (across handlers).
    shared: Option<Arc<GateHandler>>,
}

impl Default for GateHandler {
    fn default() -> Self {
        Self {
            running: AtomicUsize::new(0),
            max_seen: AtomicUsize::new(0),
            started: watch::channel(0).0,
            release: Semaphore::new(0),
            shared: None,
        }
    }
}

impl GateHandler {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A gate whose concurrency also counts on `shared`.
    pub fn sharing(shared: &Arc<GateHandler>) -> Arc<Self> {
        Arc::new(Self {
            shared: Some(shared.clone()),
            ..Self::default()
        })
    }

    /// Lets `n` held jobs finish.
    pub fn release(&self, n: usize) {
        self.release.add_permits(n);
    }

    /// Waits until at least `n` jobs have started.
    pub async fn wait_started(&self, n: usize) {
        let mut rx = self.started.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|s| *s >= n))
            .await
            .expect("jobs started")
            .unwrap();
    }

    fn enter(&self) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_seen.fetch_max(now, Ordering::SeqCst);
        if let Some(shared) = &self.shared {
            shared.enter();
        }
        self.started.send_modify(|s| *s += 1);
    }

    fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        if let Some(shared) = &self.shared {
            shared.leave();
        }
    }

    pub fn max(&self) -> usize {
        self.max_seen.load(Ordering::SeqCst)
    }

    /// How many jobs have started so far.
    pub fn started(&self) -> usize {
        *self.started.borrow()
    }
}

#[async_trait]
impl Handler for GateHandler {
    async fn run(&self, ctx: JobContext, _prepared: Prepared) -> Result<Value, JobError> {
        self.enter();
        let gate = self.shared.as_deref().unwrap_or(self);
        let permit = gate.release.acquire().await;
        permit.expect("gate open").forget();
        self.leave();
        Ok(json!({ "job": ctx.job_id }))
    }
}

/// A PDF file of these objects (numbered from 1, the first the catalog), with its xref table.
pub fn pdf_of(objects: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(object);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}
