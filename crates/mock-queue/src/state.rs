//! The mock queue's state: per-endpoint jobs with their leases, and what the workers did,
//! recorded for tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{watch, Notify};

use super::body::JobBody;
use super::deadlines::Deadlines;
use super::jobs::JobRecord;
use super::options::MockOptions;
use super::rate_limit::RateLimiter;
use super::signals::JobSignals;

/// A route group (for fault injection and request counts).
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
    /// The client API (`/run`, `/runsync`, `/status`, `/stream`, `/cancel`, ...).
    Client,
}

impl Route {
    /// Parses the names `--fault` uses: job-take, job-stop, job-done, job-stream, ping, client.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "job-take" | "take" => Self::Take,
            "job-stop" | "stop" => Self::Stop,
            "job-done" | "done" => Self::Done,
            "job-stream" | "stream" => Self::Stream,
            "ping" => Self::Ping,
            "client" => Self::Client,
            _ => return None,
        })
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

/// One job-done POST that was accepted.
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
    /// The `X-Request-ID` and `Content-Type` headers.
    pub headers: ResultHeaders,
}

/// The headers of a result POST that the SDK sets (docs/runpod-protocol.md §1.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultHeaders {
    /// `X-Request-ID`: the SDK's job id.
    pub request_id: Option<String>,
    /// `Content-Type`: the SDK labels its JSON `application/x-www-form-urlencoded`.
    pub content_type: Option<String>,
}

impl ResultHeaders {
    /// Reads them from a request's headers.
    pub fn of(headers: &axum::http::HeaderMap) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            request_id: text("x-request-id"),
            content_type: text("content-type"),
        }
    }
}

/// One job-stream POST that was accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    /// The job id in the path.
    pub job_id: String,
    /// The body (`{"output": chunk}`).
    pub body: Value,
    /// The `X-Request-ID` and `Content-Type` headers.
    pub headers: ResultHeaders,
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

/// One endpoint's jobs and records.
#[derive(Debug, Clone, Default)]
pub struct EndpointQueue {
    /// Job objects waiting to be taken, in order (each shares its text with its record).
    pub pending: VecDeque<JobBody>,
    /// Every known job by id (queued, held or ended).
    pub jobs: HashMap<String, JobRecord>,
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
    /// Jobs that went back to the queue after their lease expired.
    pub retried: u64,
    /// Each worker's latest ping (what `/health` counts), kept whether or not the history is;
    /// forgotten a lease after it arrived.
    pub workers: HashMap<String, PingRecord>,
}

impl EndpointQueue {
    /// The worker holding `job_id`, if any.
    pub fn holder_of(&self, job_id: &str) -> Option<&str> {
        self.jobs.get(job_id)?.holder.as_deref()
    }

    /// The bytes this queue's jobs take in memory: their ids, bodies, outputs, errors and
    /// unread stream chunks, as the mock stores them (JSON text; a queued job's body is shared
    /// by the queue and its record). The test history is not counted.
    pub fn stored_bytes(&self) -> usize {
        let records: usize = self
            .jobs
            .iter()
            .map(|(id, job)| id.len() + job.stored_bytes())
            .sum();
        // Jobs queued without a record (no string id: tests' bad jobs).
        let unrecorded: usize = self
            .pending
            .iter()
            .filter(|job| job.id().is_none_or(|id| !self.jobs.contains_key(id)))
            .map(JobBody::stored_bytes)
            .sum();
        records + unrecorded
    }

    /// Jobs held by workers now.
    pub fn held(&self) -> usize {
        self.jobs.values().filter(|j| j.holder.is_some()).count()
    }

    /// Whether nothing is kept for this endpoint: no job, no worker, no stop signal and no
    /// history (so a long-running mock can forget it).
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
            && self.jobs.is_empty()
            && self.workers.is_empty()
            && self.stops.is_empty()
            && self.done.is_empty()
            && self.progress.is_empty()
            && self.streams.is_empty()
            && self.pings.is_empty()
            && self.takes.is_empty()
    }

    /// Asks `worker` to stop `job_id`.
    pub fn stop(&mut self, worker: &str, job_id: &str) {
        self.stops
            .entry(worker.to_owned())
            .or_default()
            .push(job_id.to_owned());
    }

    /// Removes a queued job from `pending`.
    pub fn unqueue(&mut self, job_id: &str) -> bool {
        let before = self.pending.len();
        self.pending.retain(|job| job.id() != Some(job_id));
        self.pending.len() != before
    }
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
    /// When the first [`REQUEST_TIMES_KEPT`] requests of each route arrived (tests measure
    /// request pacing from them instead of counting over a fixed sleep).
    pub request_times: HashMap<Route, Vec<std::time::Instant>>,
    /// What the lease ticker has done: its cost is the records it visits.
    pub ticker: TickerStats,
    /// Every job's and every worker's next deadline, for the ticker.
    pub(crate) deadlines: Deadlines,
    /// [`MockOptions::timeout_grace`], for the jobs' deadlines.
    pub(crate) timeout_grace: Duration,
    /// Jobs changed under the lock now, whose waiters [`MockState::with`] wakes once it is
    /// released.
    pub(crate) changed_jobs: Vec<String>,
}

/// What the lease ticker (leases, deadlines, retention) has done since the mock started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickerStats {
    /// Ticks run.
    pub ticks: u64,
    /// Job and worker records looked at, over all ticks.
    pub visited: u64,
}

/// Arrival times kept per route.
pub(super) const REQUEST_TIMES_KEPT: usize = 1000;

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
    /// Woken when a job is queued.
    pub(super) job_arrived: Notify,
    /// Woken when a stop signal is queued.
    pub(super) stop_arrived: Notify,
    /// Bumped on every change, so tests can await a condition instead of sleeping.
    changed: watch::Sender<u64>,
    /// Per job: wakes the requests waiting on it, and only those.
    signals: JobSignals,
    /// The client requests waiting on a job, and how often they were woken.
    waiters: watch::Sender<WaiterStats>,
    /// How the mock behaves.
    pub options: MockOptions,
    /// Counts client requests against `options.rate_limits`, when set.
    rate_limiter: Option<RateLimiter>,
    /// For webhooks.
    pub(super) http: reqwest::Client,
    /// Per route: requests being answered, and an injected delay (kept apart from `inner`,
    /// whose changes wake every waiter).
    flights: Mutex<HashMap<Route, Flight>>,
}

/// The client requests waiting on one job (`/runsync`, `/status-sync`, `/stream`, the OpenAI
/// route), and how often one was woken to look at its job again.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WaiterStats {
    /// Requests waiting now.
    pub waiting: usize,
    /// Times a waiting request was woken by a change (not by its own timeout).
    pub woken: u64,
}

/// Counts a waiter while it waits.
struct Waiting<'a>(&'a watch::Sender<WaiterStats>);

impl<'a> Waiting<'a> {
    fn new(stats: &'a watch::Sender<WaiterStats>) -> Self {
        stats.send_modify(|s| s.waiting += 1);
        Self(stats)
    }

    fn woken(&self) {
        self.0.send_modify(|s| s.woken += 1);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|s| s.waiting -= 1);
    }
}

/// One route's requests being answered, and the delay injected before each is answered.
#[derive(Debug, Default, Clone, Copy)]
struct Flight {
    delay: Option<Duration>,
    /// Injected after the answer is made (the jobs it hands out already taken), before it is
    /// sent: an answer on its way.
    answer_delay: Option<Duration>,
    now: usize,
    most: usize,
}

impl MockState {
    /// Empty state.
    pub fn new(options: MockOptions) -> Self {
        Self {
            inner: Mutex::new(Inner {
                timeout_grace: options.timeout_grace,
                ..Inner::default()
            }),
            job_arrived: Notify::new(),
            stop_arrived: Notify::new(),
            changed: watch::channel(0).0,
            signals: JobSignals::default(),
            waiters: watch::channel(WaiterStats::default()).0,
            rate_limiter: options.rate_limits.map(RateLimiter::new),
            options,
            // A webhook's redirect is not followed: a 307 would re-POST the job's result to
            // wherever the webhook's server points.
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            flights: Mutex::default(),
        }
    }

    fn flights(&self) -> MutexGuard<'_, HashMap<Route, Flight>> {
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a request of `route` as being answered; returns the delays to inject before it
    /// is handled and after (before its answer is sent).
    pub(super) fn begin_flight(&self, route: Route) -> (Option<Duration>, Option<Duration>) {
        let mut flights = self.flights();
        let flight = flights.entry(route).or_default();
        flight.now += 1;
        flight.most = flight.most.max(flight.now);
        (flight.delay, flight.answer_delay)
    }

    /// A request of `route` has been answered (or dropped).
    pub(super) fn end_flight(&self, route: Route) {
        if let Some(flight) = self.flights().get_mut(&route) {
            flight.now = flight.now.saturating_sub(1);
        }
    }

    /// Delays every answer of `route` by `delay` (`None`: no delay).
    pub fn set_delay(&self, route: Route, delay: Option<Duration>) {
        self.flights().entry(route).or_default().delay = delay;
    }

    /// Holds every answer of `route` for `delay` once it is made, before it is sent (a take's
    /// jobs are then taken, their answer on its way); `None`: no delay.
    pub fn set_answer_delay(&self, route: Route, delay: Option<Duration>) {
        self.flights().entry(route).or_default().answer_delay = delay;
    }

    /// The most requests of `route` ever answered at once.
    pub fn most_in_flight(&self, route: Route) -> usize {
        self.flights().get(&route).map_or(0, |flight| flight.most)
    }

    /// Reads or changes the state; every call counts as a change for [`MockState::wait_for`].
    /// The requests waiting on a job are woken only if the change was to that job
    /// ([`Inner::job_changed`]).
    pub fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let (value, changed_jobs) = {
            let mut inner = self.lock();
            let value = f(&mut inner);
            (value, std::mem::take(&mut inner.changed_jobs))
        };
        self.changed.send_modify(|n| *n += 1);
        self.signals.notify(&changed_jobs);
        value
    }

    /// Reads the state without signalling a change.
    pub fn read<T>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        f(&self.lock())
    }

    /// The rate limiter, where limits are on.
    pub(super) fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.rate_limiter.as_ref()
    }

    /// Wakes long-polls after jobs were queued or stop signals added.
    pub fn wake(&self) {
        self.job_arrived.notify_waiters();
        self.stop_arrived.notify_waiters();
    }

    /// Waits until `f` returns `Some`, re-checking after every change, at most `timeout`.
    /// For tests: it looks again after any change at all; the client routes wait on their
    /// own job instead.
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

    /// For a client request waiting on `job` (`/runsync`, `/status-sync`, `/stream`, the
    /// OpenAI route): waits until `f` returns `Some`, at most `timeout`, looking again only
    /// when `job` has changed. Counted in [`MockState::waiters`].
    pub(super) async fn wait_for_job<T>(
        &self,
        job: &str,
        timeout: Duration,
        f: impl Fn(&Inner) -> Option<T>,
    ) -> Option<T> {
        let waiting = Waiting::new(&self.waiters);
        // Subscribed before the first look, so a change made in between still wakes us.
        let mut changes = self.signals.subscribe(job);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(value) = self.read(&f) {
                return Some(value);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return None;
            }
            waiting.woken();
        }
    }

    /// The client requests waiting on a job now, and how often one was woken: a test awaits
    /// a number of waiters with `wait_for` on it.
    pub fn waiters(&self) -> watch::Receiver<WaiterStats> {
        self.waiters.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
