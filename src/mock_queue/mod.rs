//! The mock job queue: a real HTTP server that speaks the RunPod worker API, for local use and
//! for tests. Any endpoint id in the path is served, each its own queue.
//!
//! [`MockQueue`] is the handle tests use: start it on `127.0.0.1:0`, enqueue jobs, inject
//! faults, queue stop signals, and await what the workers did without sleeping.

// Route helpers return `Result<_, Response>` so a refusal is an early return; the large error
// variant costs nothing that matters in a mock server.
#[allow(clippy::result_large_err)]
mod client_api;
mod state;
#[allow(clippy::result_large_err)]
mod worker_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use state::{
    DoneRecord, EndpointQueue, Fault, Inner, JobStatus, MockState, PingRecord, Route, StreamRecord,
    TakeRecord,
};

use crate::secret::ApiKey;

/// Default time a take or stop request is held when there is nothing to give.
pub const DEFAULT_LONG_POLL: Duration = Duration::from_secs(20);

/// How a mock queue is set up.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Required on every request when set (raw or `Bearer`).
    pub api_key: Option<ApiKey>,
    /// How long empty takes and stops are held.
    pub long_poll: Duration,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            long_poll: DEFAULT_LONG_POLL,
        }
    }
}

/// The mock's routes over `state`.
pub fn router(state: Arc<MockState>) -> Router {
    worker_api::routes()
        .merge(client_api::routes())
        .fallback(|| async {
            worker_api::error(StatusCode::NOT_FOUND, "no such route in the job API")
        })
        .with_state(state)
}

/// A running mock queue.
pub struct MockQueue {
    state: Arc<MockState>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl MockQueue {
    /// Serves on `listener` until dropped.
    pub async fn start(listener: TcpListener, options: MockOptions) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(MockState::new(options.api_key, options.long_poll));
        let stop = CancellationToken::new();
        let app = router(state.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await;
        });
        Ok(Self { state, addr, stop })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The shared state (records, faults).
    pub fn state(&self) -> &Arc<MockState> {
        &self.state
    }

    /// Queues a job object (`{"id", "input", ...}`, or anything, to test bad jobs).
    pub fn enqueue(&self, endpoint: &str, job: Value) {
        self.state
            .with(|inner| inner.endpoint(endpoint).pending.push_back(job));
        self.state.job_arrived.notify_waiters();
    }

    /// Tells `worker` to stop `job_id` through job-stop.
    pub fn stop_job(&self, endpoint: &str, worker: &str, job_id: &str) {
        self.state.with(|inner| {
            inner
                .endpoint(endpoint)
                .stops
                .entry(worker.to_owned())
                .or_default()
                .push(job_id.to_owned());
        });
        self.state.stop_arrived.notify_waiters();
    }

    /// Injects (or with `None`, clears) a fault on `route`.
    pub fn set_fault(&self, route: Route, fault: Option<Fault>) {
        self.state.with(|inner| match fault {
            Some(fault) => inner.faults.insert(route, fault),
            None => inner.faults.remove(&route),
        });
    }

    /// Requests seen on `route`.
    pub fn requests(&self, route: Route) -> u64 {
        self.state
            .read(|inner| inner.requests.get(&route).copied().unwrap_or(0))
    }

    /// A copy of `endpoint`'s queue and records.
    pub fn endpoint(&self, endpoint: &str) -> EndpointQueue {
        self.state
            .read(|inner| inner.endpoints.get(endpoint).cloned().unwrap_or_default())
    }

    /// Waits for job-done of `job_id` on `endpoint`.
    pub async fn wait_done(
        &self,
        endpoint: &str,
        job_id: &str,
        timeout: Duration,
    ) -> Option<DoneRecord> {
        self.state
            .wait_for(timeout, |inner| {
                inner
                    .endpoints
                    .get(endpoint)?
                    .done
                    .iter()
                    .find(|d| d.job_id == job_id)
                    .cloned()
            })
            .await
    }
}

impl Drop for MockQueue {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
