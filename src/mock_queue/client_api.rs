//! The client-facing routes of the mock queue (runpod-protocol.md §2): `/run`,
//! `/runsync?wait=`, `/status`, `/stream` (each chunk delivered once), `/cancel`, `/retry`,
//! `/purge-queue` and `/health`, with the documented bodies and statuses.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::jobs::JobState;
use super::state::{EndpointQueue, MockState, Route};
use super::worker_api::{error, unknown_job};

/// `/run` bodies above this are refused (the platform's limit).
pub const RUN_LIMIT: usize = 10 * 1_000_000;
/// `/runsync` bodies above this are refused.
pub const RUNSYNC_LIMIT: usize = 20 * 1_000_000;

/// The client API routes, behind the gate.
pub(super) fn routes(state: &Arc<MockState>) -> Router<Arc<MockState>> {
    Router::new()
        .route("/v2/{endpoint}/run", post(run))
        .route("/v2/{endpoint}/runsync", post(runsync))
        .route("/v2/{endpoint}/status/{job}", get(status).post(status))
        .route("/v2/{endpoint}/stream/{job}", get(stream).post(stream))
        .route("/v2/{endpoint}/cancel/{job}", post(cancel))
        .route("/v2/{endpoint}/retry/{job}", post(retry))
        .route("/v2/{endpoint}/purge-queue", post(purge))
        .route("/v2/{endpoint}/health", get(health))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Route::Client),
            super::gate::check,
        ))
}

/// Reads a submit body, queues the job, and returns its id.
fn submit(
    state: &MockState,
    endpoint: &str,
    body: &Bytes,
    limit: usize,
    prefix: &str,
) -> Result<String, Response> {
    if body.len() > limit {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {} bytes is over the {} MB limit",
                body.len(),
                limit / 1_000_000
            ),
        ));
    }
    let submitted = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "the body must be a JSON object like {\"input\": {...}}",
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            ))
        }
    };
    match submitted.get("input") {
        Some(Value::Object(_)) => {}
        Some(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "`input` must be a JSON object",
            ))
        }
        None => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "`input` is required: {\"input\": {...}}",
            ))
        }
    }
    // Only the documented top-level keys reach the worker; others are discarded, as documented.
    let mut job = serde_json::Map::new();
    for key in ["input", "webhook", "policy", "s3Config"] {
        if let Some(value) = submitted.get(key) {
            job.insert(key.to_owned(), value.clone());
        }
    }
    let id = format!("{prefix}{}-u1", uuid::Uuid::new_v4());
    job.insert("id".into(), Value::String(id.clone()));
    let max_queued = state.options.max_queued;
    let queued = state.with(|inner| {
        let queue = inner.endpoint(endpoint);
        if max_queued.is_some_and(|max| queue.pending.len() >= max) {
            return false;
        }
        queue.push(Value::Object(job));
        true
    });
    if !queued {
        return Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the queue is full ({} jobs waiting); retry later",
                max_queued.unwrap_or(0)
            ),
        ));
    }
    state.wake();
    Ok(id)
}

async fn run(
    State(state): State<Arc<MockState>>,
    Path(endpoint): Path<String>,
    body: Bytes,
) -> Response {
    match submit(&state, &endpoint, &body, RUN_LIMIT, "") {
        Ok(id) => Json(json!({ "id": id, "status": "IN_QUEUE" })).into_response(),
        Err(refused) => refused,
    }
}

#[derive(Deserialize)]
struct Wait {
    wait: Option<u64>,
}

async fn runsync(
    State(state): State<Arc<MockState>>,
    Path(endpoint): Path<String>,
    Query(wait): Query<Wait>,
    body: Bytes,
) -> Response {
    let id = match submit(&state, &endpoint, &body, RUNSYNC_LIMIT, "sync-") {
        Ok(id) => id,
        Err(refused) => return refused,
    };
    let wait = Duration::from_millis(wait.wait.unwrap_or(90_000).clamp(1_000, 300_000));
    let body_of = |inner: &super::Inner, only_final: bool| {
        let job = inner.endpoints.get(&endpoint)?.jobs.get(&id)?;
        (!only_final || job.state.is_final()).then(|| job.status_body(&id))
    };
    let finished = state.wait_for(wait, |inner| body_of(inner, true)).await;
    match finished.or_else(|| state.read(|inner| body_of(inner, false))) {
        Some(body) => Json(body).into_response(),
        None => unknown_job(&id),
    }
}

/// Runs `f` on the job's record, or answers 404.
fn with_job(
    state: &MockState,
    endpoint: &str,
    job: &str,
    f: impl FnOnce(&mut EndpointQueue) -> Response,
) -> Response {
    let found = state.with(|inner| {
        let queue = inner.endpoints.get_mut(endpoint)?;
        queue.jobs.contains_key(job).then(|| f(queue))
    });
    state.wake();
    found.unwrap_or_else(|| unknown_job(job))
}

async fn status(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
) -> Response {
    with_job(&state, &endpoint, &job, |queue| {
        Json(queue.jobs[&job].status_body(&job)).into_response()
    })
}

async fn stream(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
) -> Response {
    with_job(&state, &endpoint, &job, |queue| {
        let record = queue.jobs.get_mut(&job).expect("checked by with_job");
        // Each chunk is delivered once: the SDK polls and yields everything it gets.
        let chunks: Vec<Value> = record
            .stream
            .drain(..)
            .map(|c| json!({ "output": c }))
            .collect();
        Json(json!({ "id": job, "status": record.state.as_str(), "stream": chunks }))
            .into_response()
    })
}

async fn cancel(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
) -> Response {
    let mut webhook = None;
    let response = with_job(&state, &endpoint, &job, |queue| {
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
    if let Some((url, body)) = webhook {
        tokio::spawn(super::leases::deliver_webhook(state, url, body));
    }
    response
}

async fn retry(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
) -> Response {
    with_job(&state, &endpoint, &job, |queue| {
        let record = queue.jobs.get_mut(&job).expect("checked by with_job");
        if !matches!(record.state, JobState::Failed | JobState::TimedOut) {
            let message = format!(
                "only FAILED or TIMED_OUT jobs can be retried; job {job} is {}",
                record.state.as_str()
            );
            return error(StatusCode::BAD_REQUEST, message);
        }
        record.state = JobState::InQueue;
        record.output = None;
        record.error = None;
        record.finished = None;
        record.stream.clear();
        let raw = record.raw.clone();
        queue.pending.push_back(raw);
        Json(json!({ "id": job, "status": "IN_QUEUE" })).into_response()
    })
}

async fn purge(State(state): State<Arc<MockState>>, Path(endpoint): Path<String>) -> Response {
    let removed = state.with(|inner| {
        let queue = inner.endpoint(&endpoint);
        let removed: Vec<Value> = queue.pending.drain(..).collect();
        for raw in &removed {
            if let Some(id) = raw.get("id").and_then(Value::as_str) {
                queue.jobs.remove(id);
            }
        }
        removed.len()
    });
    Json(json!({ "removed": removed, "status": "completed" })).into_response()
}

async fn health(State(state): State<Arc<MockState>>, Path(endpoint): Path<String>) -> Response {
    let seen_within = state.options.lease_timeout;
    let body = state.read(|inner| {
        let empty = EndpointQueue::default();
        let queue = inner.endpoints.get(&endpoint).unwrap_or(&empty);
        let count = |s: JobState| queue.jobs.values().filter(|j| j.state == s).count();
        let now = Instant::now();
        // A worker is alive if it pinged within a lease; its last ping tells if it is unhealthy.
        let mut last: std::collections::BTreeMap<&str, &super::PingRecord> = Default::default();
        for ping in queue.pings.iter().filter(|p| now.duration_since(p.at) < seen_within) {
            last.insert(&ping.worker, ping);
        }
        let unhealthy: BTreeSet<&str> = last
            .iter()
            .filter(|(_, p)| p.query.get("status").map(String::as_str) == Some("unhealthy"))
            .map(|(w, _)| *w)
            .collect();
        let running: BTreeSet<&str> = queue.jobs.values().filter_map(|j| j.holder.as_deref()).collect();
        let ready = last.len() - unhealthy.len();
        json!({
            "jobs": {
                "completed": count(JobState::Completed),
                "failed": count(JobState::Failed) + count(JobState::TimedOut),
                "inProgress": count(JobState::InProgress),
                "inQueue": queue.pending.len(),
                "retried": queue.retried,
            },
            "workers": {
                "idle": last.keys().filter(|w| !running.contains(*w) && !unhealthy.contains(*w)).count(),
                "initializing": 0,
                "ready": ready,
                "running": running.len(),
                "throttled": 0,
                "unhealthy": unhealthy.len(),
            },
        })
    });
    Json(body).into_response()
}
