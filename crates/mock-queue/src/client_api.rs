//! The client-facing routes of the mock queue (docs/runpod-protocol.md §2): `/run`,
//! `/runsync?wait=`, `/status`, `/status-sync?wait=` (the JavaScript client's), `/stream`
//! (each chunk delivered once, held until there is one), `/cancel`, `/retry`, `/purge-queue` and
//! `/health`, with the documented bodies and statuses, and the documented rate limits where
//! they are on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::body::JobBody;
use super::jobs::{JobRecord, JobState};
use super::policy;
use runpod_protocol::limits::{MAX_RUNSYNC_BODY, MAX_RUN_BODY};

use super::rate_limit::LimitedRoute;
use super::replies::{error, json_text, unknown_job};
use super::state::{EndpointQueue, Inner, MockState, Route};
use super::submit::{submit, Via};

/// The client API routes, behind the gate.
pub(super) fn routes(state: &Arc<MockState>) -> Router<Arc<MockState>> {
    // Inside the gate: a request without the key is a 401 and takes no place in the window.
    let limited = |route: LimitedRoute| {
        axum::middleware::from_fn_with_state((state.clone(), route), super::gate::check_rate)
    };
    Router::new()
        .route(
            "/v2/{endpoint}/run",
            post(run).route_layer(limited(LimitedRoute::Run)),
        )
        .route(
            "/v2/{endpoint}/runsync",
            post(runsync).route_layer(limited(LimitedRoute::RunSync)),
        )
        .route("/v2/{endpoint}/status/{job}", get(status).post(status))
        .route(
            "/v2/{endpoint}/status-sync/{job}",
            get(status_sync).post(status_sync),
        )
        .route("/v2/{endpoint}/stream/{job}", get(stream).post(stream))
        .route(
            "/v2/{endpoint}/cancel/{job}",
            post(cancel).route_layer(limited(LimitedRoute::Cancel)),
        )
        .route("/v2/{endpoint}/retry/{job}", post(retry))
        .route(
            "/v2/{endpoint}/purge-queue",
            post(purge).route_layer(limited(LimitedRoute::PurgeQueue)),
        )
        .route("/v2/{endpoint}/health", get(super::health::health))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Route::Client),
            super::gate::check,
        ))
}

async fn run(
    State(state): State<Arc<MockState>>,
    Path(endpoint): Path<String>,
    body: Bytes,
) -> Response {
    match submit(&state, &endpoint, &body, MAX_RUN_BODY, Via::Run) {
        Ok(id) => Json(json!({ "id": id, "status": "IN_QUEUE" })).into_response(),
        Err(refused) => refused.into_response(),
    }
}

/// `?wait=` of `/runsync` and `/status-sync`, or the JSON 400 that names it.
fn wait_of(query: Option<&str>) -> Result<Duration, Response> {
    let raw = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(key, _)| key == "wait")
            .map(|(_, value)| value.into_owned())
    });
    policy::parse_wait(raw.as_deref()).map_err(|e| {
        let body = json!({ "error": e.to_string(), "field": e.field });
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    })
}

async fn runsync(
    State(state): State<Arc<MockState>>,
    Path(endpoint): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let wait = match wait_of(query.as_deref()) {
        Ok(wait) => wait,
        Err(refused) => return refused,
    };
    match submit(&state, &endpoint, &body, MAX_RUNSYNC_BODY, Via::RunSync) {
        Ok(id) => settled_status(&state, &endpoint, &id, wait).await,
        Err(refused) => refused.into_response(),
    }
}

/// `/status-sync/{id}?wait=`: `/status` once the job has ended, or after `wait` (the JS
/// client's `runSync` polls it when a job outlasts `/runsync`'s wait).
async fn status_sync(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    match wait_of(query.as_deref()) {
        Ok(wait) => settled_status(&state, &endpoint, &job, wait).await,
        Err(refused) => refused,
    }
}

/// The `/status` body of `job` once it has ended (or is gone), or when `wait` is over.
async fn settled_status(state: &MockState, endpoint: &str, job: &str, wait: Duration) -> Response {
    fn record<'a>(inner: &'a Inner, endpoint: &str, job: &str) -> Option<&'a JobRecord> {
        inner.endpoints.get(endpoint)?.jobs.get(job)
    }
    // The body is read in the same look as the final state: a retention that ends just then
    // cannot turn a finished job into a 404.
    let settled = state
        .wait_for_job(job, wait, |inner| match record(inner, endpoint, job) {
            Some(record) if !record.state.is_final() => None,
            found => Some(found.map(|r| r.status_body(job))),
        })
        .await;
    let body = match settled {
        Some(body) => body,
        None => state.read(|inner| record(inner, endpoint, job).map(|r| r.status_body(job))),
    };
    match body {
        Some(body) => json_text(body),
        None => unknown_job(&state.options, job),
    }
}

/// What a route does to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Reads it (`/status`), or takes its unread chunks (`/stream`): nothing a deadline or a
    /// waiting request depends on.
    Read,
    /// Changes its state (`/cancel`, `/retry`): its deadline is set again, and the requests
    /// waiting on it look again.
    Change,
}

/// Runs `f` on the job's record, or answers 404.
fn with_job(
    state: &MockState,
    endpoint: &str,
    job: &str,
    access: Access,
    f: impl FnOnce(&mut EndpointQueue) -> Response,
) -> Response {
    let found = state.with(|inner| {
        let queue = inner.endpoints.get_mut(endpoint)?;
        let answer = queue.jobs.contains_key(job).then(|| f(queue))?;
        if access == Access::Change {
            inner.reschedule(endpoint, job);
            inner.job_changed(job);
        }
        Some(answer)
    });
    found.unwrap_or_else(|| unknown_job(&state.options, job))
}

async fn status(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
) -> Response {
    with_job(&state, &endpoint, &job, Access::Read, |queue| {
        json_text(queue.jobs[&job].status_body(&job))
    })
}

/// `/stream/{id}`: the chunks not read before, each delivered once (the SDKs yield everything
/// they get). Held until there is a chunk or the job has ended, at most `stream_hold`: the
/// JavaScript client polls again at once, so an empty answer would only make it spin.
async fn stream(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
) -> Response {
    hold_stream(&state, &endpoint, &job).await;
    with_job(&state, &endpoint, &job, Access::Read, |queue| {
        let Some(record) = queue.jobs.get_mut(&job) else {
            return unknown_job(&state.options, &job);
        };
        let answer = StreamAnswer {
            id: &job,
            status: record.state.as_str(),
            stream: record
                .stream
                .drain(..)
                .map(|output| Chunk { output })
                .collect(),
        };
        json_text(serde_json::to_string(&answer).expect("chunks are JSON already"))
    })
}

/// `/stream`'s answer: the chunks as they were posted, not copied into a tree.
#[derive(Serialize)]
struct StreamAnswer<'a> {
    id: &'a str,
    status: &'static str,
    stream: Vec<Chunk>,
}

#[derive(Serialize)]
struct Chunk {
    output: Box<RawValue>,
}

/// Waits, at most `stream_hold`, until `job` has a chunk not read before, has ended, or is
/// gone; the answer is then whatever there is, as without the wait.
async fn hold_stream(state: &MockState, endpoint: &str, job: &str) {
    state
        .wait_for_job(job, state.options.stream_hold, |inner| {
            // An unknown endpoint or job is answered (404) at once, not held.
            let record = inner.endpoints.get(endpoint).and_then(|q| q.jobs.get(job));
            match record {
                Some(record) if record.stream.is_empty() && !record.state.is_final() => None,
                _ => Some(()),
            }
        })
        .await;
}

async fn cancel(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
) -> Response {
    let mut webhook = None;
    let response = with_job(&state, &endpoint, &job, Access::Change, |queue| {
        let record = queue.jobs.get(&job).expect("checked by with_job");
        if record.state.is_final() {
            return Json(json!({ "id": job, "status": record.state.as_str() })).into_response();
        }
        let holder = record.holder.clone();
        queue.unqueue(&job);
        if let Some(worker) = &holder {
            queue.stop(worker, &job);
        }
        let record = queue.jobs.get_mut(&job).expect("checked by with_job");
        record.state = JobState::Cancelled;
        record.holder = None;
        record.lease_until = None;
        record.finished = Some(Instant::now());
        webhook = record
            .webhook
            .clone()
            .map(|url| (url, record.status_body(&job)));
        Json(json!({ "id": job, "status": "CANCELLED" })).into_response()
    });
    // Its holder's job-stop long-poll has a signal now.
    state.wake();
    if let Some((url, body)) = webhook {
        tokio::spawn(super::leases::deliver_webhook(state, url, body));
    }
    response
}

async fn retry(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
) -> Response {
    let response = with_job(&state, &endpoint, &job, Access::Change, |queue| {
        let record = queue.jobs.get_mut(&job).expect("checked by with_job");
        if !matches!(record.state, JobState::Failed | JobState::TimedOut) {
            let message = format!(
                "only FAILED or TIMED_OUT jobs can be retried; job {job} is {}",
                record.state.as_str()
            );
            return error(StatusCode::BAD_REQUEST, message);
        }
        record.state = JobState::InQueue;
        // Sent again on purpose: a late result from its old holder is not its answer.
        record.lease_lost_by = None;
        record.output = None;
        record.error = None;
        record.finished = None;
        record.stream.clear();
        let body = record.body.clone();
        queue.pending.push_back(body);
        Json(json!({ "id": job, "status": "IN_QUEUE" })).into_response()
    });
    // A held take may have it.
    state.wake();
    response
}

async fn purge(State(state): State<Arc<MockState>>, Path(endpoint): Path<String>) -> Response {
    let (removed, ids) = state.with(|inner| {
        let Some(queue) = inner.endpoints.get_mut(&endpoint) else {
            return (0, Vec::new());
        };
        let removed: Vec<JobBody> = queue.pending.drain(..).collect();
        let ids: Vec<String> = removed
            .iter()
            .filter_map(JobBody::id)
            .map(str::to_owned)
            .collect();
        for id in &ids {
            inner.remove_job(&endpoint, id);
        }
        (removed.len(), ids)
    });
    if removed > 0 {
        tracing::info!(
            "purge-queue on {endpoint}: removed {removed} job(s): {}",
            ids.join(", ")
        );
    }
    // The platform's body, and which jobs they were: their /status is a 404 from now on.
    Json(json!({ "removed": removed, "status": "completed", "ids": ids })).into_response()
}
