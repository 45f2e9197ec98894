//! The mock job queue: a real HTTP server that speaks the RunPod job API from both sides — the
//! worker API the SDK's worker uses, and the client API the SDK's `Endpoint` uses — for local
//! use (`local`, `mock-queue`) and for tests. Any endpoint id in the path is its own queue.
//!
//! Jobs held by a worker carry a lease that the worker's pings renew; an expired lease sends
//! the job back to the queue, and the old holder's late result is refused. Submissions are
//! checked as the platform checks them, and finished jobs are deleted after their retention,
//! so a long-running mock holds only the jobs it must.
//!
//! [`MockQueue`] is the handle tests use: start it on `127.0.0.1:0`, enqueue jobs, inject
//! faults, queue stop signals, and await what the workers did without sleeping.
//!
//! For parity with the platform, the client API can apply its documented per-route rate limits
//! ([`RateLimits`], off by default), and `/stream` is held until there is a chunk or the job has
//! ended (at most [`MockOptions::stream_hold`]), as the JavaScript client's polling expects.

// Route helpers return `Result<_, Response>` so a refusal is an early return; the large error
// variant costs nothing that matters in a mock server.
mod body;
#[allow(clippy::result_large_err)]
mod client_api;
mod deadlines;
#[allow(clippy::result_large_err)]
mod gate;
mod health;
mod jobs;
mod leases;
mod lifecycle;
#[allow(clippy::result_large_err)]
mod openai;
mod options;
pub mod policy;
mod rate_limit;
mod replies;
mod signals;
mod state;
mod submit;
#[allow(clippy::result_large_err)]
mod worker_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use body::JobBody;
pub use health::endpoint_health;
pub use jobs::{JobRecord, JobState};
pub use options::{MockOptions, MAX_JOBS};
pub use rate_limit::{LimitedRoute, RateLimits};
pub use state::{
    DoneRecord, EndpointQueue, Fault, Inner, MockState, PingRecord, ResultHeaders, Route,
    StreamRecord, TakeRecord, TickerStats, WaiterStats,
};

/// Bodies above this are cut off (413) before any route sees them. job-done and job-stream
/// refuse bodies over the platform's limits (20 MB, 1 MB) themselves, with the platform's 400.
const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// The mock's routes over `state`.
pub fn router(state: Arc<MockState>) -> Router {
    worker_api::routes(&state)
        .merge(client_api::routes(&state))
        .merge(openai::routes(&state))
        .fallback(|method: Method, uri: Uri| async move {
            replies::error(
                StatusCode::NOT_FOUND,
                format!("no route for {method} {}", uri.path()),
            )
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            replies::error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {}", uri.path()),
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(body_limit_in_json))
        .with_state(state)
}

/// Bodies over [`BODY_LIMIT`] get the mock's JSON error, as every other refusal does: refused
/// from their `Content-Length` before the body is read (so a client that sent
/// `Expect: 100-continue` is never told to go on), or, for a body without a length, once the
/// limit is crossed (axum's own 413 is plain text).
async fn body_limit_in_json(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        replies::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than the mock's limit of {BODY_LIMIT} bytes"),
        )
    };
    if declared.is_some_and(|length| length > BODY_LIMIT as u64) {
        return too_large();
    }
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        return too_large();
    }
    response
}

/// Serves the mock on `listener` (routes plus the lease, deadline and retention checks)
/// until `stop`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<MockState>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, state, stop, Router::new()).await
}

/// [`serve`], with `extra` routes beside the mock's (`local`'s console).
pub async fn serve_with(
    listener: TcpListener,
    state: Arc<MockState>,
    stop: CancellationToken,
    extra: Router,
) -> std::io::Result<()> {
    tokio::spawn(leases::run(state.clone(), stop.clone()));
    let header_read_timeout = state.options.header_read_timeout;
    let app = extra.merge(router(state));
    http_server::serve_http1(listener, app, header_read_timeout, stop).await
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
        Self::start_with(listener, options, |_| Router::new()).await
    }

    /// [`MockQueue::start`], with routes beside the mock's, made from its state (`local`'s
    /// console reads the jobs and the workers there).
    pub async fn start_with(
        listener: TcpListener,
        options: MockOptions,
        extra: impl FnOnce(&Arc<MockState>) -> Router,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(MockState::new(options));
        let stop = CancellationToken::new();
        let extra = extra(&state);
        tokio::spawn(serve_with(listener, state.clone(), stop.clone(), extra));
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

    /// Queues a job object (`{"id", "input", ...}`, or anything, to test bad jobs), unchecked,
    /// kept like a `/run` job once it ends.
    pub fn enqueue(&self, endpoint: &str, job: Value) {
        self.enqueue_all(endpoint, [job]);
    }

    /// Queues several jobs at once: a waiting take sees all of them.
    pub fn enqueue_all(&self, endpoint: &str, jobs: impl IntoIterator<Item = Value>) {
        let retention = self.state.options.run_retention;
        // Made into text before the lock is taken, as a submission is.
        let jobs: Vec<JobBody> = jobs.into_iter().map(JobBody::from).collect();
        self.state.with(|inner| {
            for job in jobs {
                inner.push(endpoint, job, retention);
            }
        });
        self.state.wake();
    }

    /// Tells `worker` to stop `job_id` through job-stop.
    pub fn stop_job(&self, endpoint: &str, worker: &str, job_id: &str) {
        self.state
            .with(|inner| inner.endpoint(endpoint).stop(worker, job_id));
        self.state.wake();
    }

    /// Delays every answer on `route` by `delay` (`None`: none), as a slow queue would.
    pub fn set_delay(&self, route: Route, delay: Option<Duration>) {
        self.state.set_delay(route, delay);
    }

    /// Holds every answer on `route` for `delay` after it is made (a take's jobs already
    /// taken), before it is sent, as a queue sending a large answer would.
    pub fn set_answer_delay(&self, route: Route, delay: Option<Duration>) {
        self.state.set_answer_delay(route, delay);
    }

    /// The most requests on `route` ever being answered at once.
    pub fn most_in_flight(&self, route: Route) -> usize {
        self.state.most_in_flight(route)
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

    /// Waits until `route` has seen `count` requests (within `timeout`), and returns when
    /// each of the first `count` arrived.
    pub async fn wait_for_requests(
        &self,
        route: Route,
        count: usize,
        timeout: Duration,
    ) -> Option<Vec<std::time::Instant>> {
        self.state
            .wait_for(timeout, |inner| {
                let times = inner.request_times.get(&route)?;
                (times.len() >= count).then(|| times[..count].to_vec())
            })
            .await
    }

    /// A copy of `endpoint`'s queue and records.
    pub fn endpoint(&self, endpoint: &str) -> EndpointQueue {
        self.state
            .read(|inner| inner.endpoints.get(endpoint).cloned().unwrap_or_default())
    }

    /// Waits for job-done of `job_id` on `endpoint` (with `record_history`).
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
