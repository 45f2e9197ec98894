//! The mock queue's state: per-endpoint queues and what the workers did, recorded for tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{watch, Notify};

use crate::secret::ApiKey;

/// A route of the worker API (for fault injection and request counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// `GET job-take` and `GET job-take-batch`.
    Take,
    /// `GET job-stop`.
    Stop,
    /// `POST job-done`.
    Done,
    /// `POST job-stream`.
    Stream,
    /// `GET ping`.
    Ping,
    /// The client API (`/run`, `/runsync`, `/status`, `/health`).
    Client,
}

/// A job's status as the client API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    /// `IN_QUEUE`, `IN_PROGRESS`, `COMPLETED` or `FAILED`.
    pub status: &'static str,
    /// The output (or the latest progress update).
    pub output: Option<Value>,
    /// The error string of a FAILED job.
    pub error: Option<Value>,
    /// When it was submitted.
    pub submitted: Instant,
    /// When a worker took it.
    pub started: Option<Instant>,
    /// When it ended.
    pub finished: Option<Instant>,
}

impl JobStatus {
    /// A job just submitted.
    pub fn queued() -> Self {
        Self {
            status: "IN_QUEUE",
            output: None,
            error: None,
            submitted: Instant::now(),
            started: None,
            finished: None,
        }
    }

    /// Whether it has ended.
    pub fn is_final(&self) -> bool {
        matches!(self.status, "COMPLETED" | "FAILED")
    }
}

/// A failure injected on a route: answer `status` to a fraction `rate` of its requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    /// The status to answer.
    pub status: u16,
    /// The fraction of requests that get it (0.0–1.0).
    pub rate: f64,
}

/// One job-take request as the mock saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct TakeRecord {
    /// The worker id in the path.
    pub worker: String,
    /// `batch_size` for job-take-batch, `None` for job-take.
    pub batch_size: Option<usize>,
    /// The `job_in_progress` query parameter.
    pub job_in_progress: Option<String>,
    /// How many jobs it returned.
    pub returned: usize,
}

/// One job-done POST.
#[derive(Debug, Clone, PartialEq)]
pub struct DoneRecord {
    /// The job id in the path.
    pub job_id: String,
    /// The worker id in the path.
    pub worker: String,
    /// The `isStream` query parameter.
    pub is_stream: Option<String>,
    /// The body, parsed as JSON whatever its content type.
    pub body: Value,
}

/// One job-stream POST.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    /// The job id in the path.
    pub job_id: String,
    /// The body (`{"output": chunk}`).
    pub body: Value,
}

/// One ping.
#[derive(Debug, Clone, PartialEq)]
pub struct PingRecord {
    /// The worker id in the path.
    pub worker: String,
    /// The `job_id` list (empty when absent).
    pub job_ids: Vec<String>,
    /// Every query parameter.
    pub query: BTreeMap<String, String>,
    /// When it arrived.
    pub at: Instant,
}

/// One endpoint's queue and records.
#[derive(Debug, Clone, Default)]
pub struct EndpointQueue {
    /// Jobs waiting to be taken (whole job objects).
    pub pending: VecDeque<Value>,
    /// Job id → the worker holding it.
    pub in_progress: HashMap<String, String>,
    /// Final job-done bodies, in arrival order.
    pub done: Vec<DoneRecord>,
    /// Progress updates (`"status": "IN_PROGRESS"` bodies).
    pub progress: Vec<DoneRecord>,
    /// Stream chunks, in arrival order.
    pub streams: Vec<StreamRecord>,
    /// Pings, in arrival order.
    pub pings: Vec<PingRecord>,
    /// Takes, in arrival order.
    pub takes: Vec<TakeRecord>,
    /// Worker id → job ids it should stop.
    pub stops: HashMap<String, Vec<String>>,
    /// Jobs submitted through the client API, by id.
    pub statuses: HashMap<String, JobStatus>,
}

/// Everything behind the lock.
#[derive(Debug, Default)]
pub struct Inner {
    /// Endpoint id → its queue.
    pub endpoints: HashMap<String, EndpointQueue>,
    /// Injected faults.
    pub faults: HashMap<Route, Fault>,
    /// Requests seen per route (including refused and faulted ones).
    pub requests: HashMap<Route, u64>,
}

impl Inner {
    /// The queue of `endpoint`, created on first use.
    pub fn endpoint(&mut self, endpoint: &str) -> &mut EndpointQueue {
        self.endpoints.entry(endpoint.to_owned()).or_default()
    }
}

/// The shared state of a mock queue server.
#[derive(Debug)]
pub struct MockState {
    inner: Mutex<Inner>,
    /// Woken when a job is enqueued.
    pub(super) job_arrived: Notify,
    /// Woken when a stop signal is queued.
    pub(super) stop_arrived: Notify,
    /// Bumped on every change, so tests can await a condition instead of sleeping.
    changed: watch::Sender<u64>,
    /// Required on every request when set.
    pub(super) api_key: Option<ApiKey>,
    /// How long take and stop requests are held when there is nothing to give.
    pub(super) long_poll: Duration,
}

impl MockState {
    /// Empty state.
    pub fn new(api_key: Option<ApiKey>, long_poll: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            job_arrived: Notify::new(),
            stop_arrived: Notify::new(),
            changed: watch::channel(0).0,
            api_key,
            long_poll,
        }
    }

    /// Reads or changes the state; every call counts as a change for [`MockState::wait_for`].
    pub fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let value = f(&mut self.lock());
        self.changed.send_modify(|n| *n += 1);
        value
    }

    /// Reads the state without signalling a change.
    pub fn read<T>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        f(&self.lock())
    }

    /// Waits until `f` returns `Some`, re-checking after every change, at most `timeout`.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        f: impl Fn(&Inner) -> Option<T>,
    ) -> Option<T> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Mark the current version seen before checking, so a change made between the
            // check and the wait still wakes us.
            changes.borrow_and_update();
            if let Some(value) = self.read(&f) {
                return Some(value);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
