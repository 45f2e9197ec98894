//! The worker-facing routes of the mock queue (runpod-protocol.md §6.2): long-poll take and
//! batch take, job-done (the body parsed as JSON whatever its content type), job-stream, ping
//! and the job-stop long-poll.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::state::{DoneRecord, MockState, PingRecord, Route, StreamRecord, TakeRecord};

type Params = Query<BTreeMap<String, String>>;

/// The worker API routes.
pub(super) fn routes() -> Router<Arc<MockState>> {
    Router::new()
        .route("/v2/{endpoint}/job-take/{worker}", get(take))
        .route("/v2/{endpoint}/job-take-batch/{worker}", get(take_batch))
        .route("/v2/{endpoint}/job-stop/{worker}", get(stop))
        .route("/v2/{endpoint}/job-done/{worker}/{job}", post(done))
        .route("/v2/{endpoint}/job-stream/{worker}/{job}", post(stream))
        .route("/v2/{endpoint}/ping/{worker}", get(ping))
}

/// A JSON error body with `status`.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Counts the request, checks the key, and applies an injected fault.
pub(super) fn gate(state: &MockState, route: Route, headers: &HeaderMap) -> Result<(), Response> {
    let fault = state.with(|inner| {
        *inner.requests.entry(route).or_default() += 1;
        inner.faults.get(&route).copied()
    });
    if let Some(key) = &state.api_key {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if presented.is_empty() {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "missing Authorization header: send the API key, raw or as `Bearer KEY`",
            ));
        }
        if !key.matches_header(presented) {
            return Err(error(StatusCode::UNAUTHORIZED, "wrong API key"));
        }
    }
    if let Some(fault) = fault {
        if rand::random::<f64>() < fault.rate {
            let status =
                StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Err(error(status, "injected fault"));
        }
    }
    Ok(())
}

async fn take(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker)): Path<(String, String)>,
    Query(query): Params,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = gate(&state, Route::Take, &headers) {
        return refused;
    }
    take_jobs(state, endpoint, worker, None, query).await
}

async fn take_batch(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker)): Path<(String, String)>,
    Query(query): Params,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = gate(&state, Route::Take, &headers) {
        return refused;
    }
    let batch_size = query
        .get("batch_size")
        .and_then(|n| n.parse::<usize>().ok());
    match batch_size {
        Some(n) if n > 0 => take_jobs(state, endpoint, worker, Some(n), query).await,
        _ => error(
            StatusCode::BAD_REQUEST,
            "job-take-batch needs batch_size, a positive integer",
        ),
    }
}

/// Hands out up to the requested number of jobs, holding the request while there are none.
async fn take_jobs(
    state: Arc<MockState>,
    endpoint: String,
    worker: String,
    batch_size: Option<usize>,
    query: BTreeMap<String, String>,
) -> Response {
    let wanted = batch_size.unwrap_or(1);
    let deadline = tokio::time::Instant::now() + state.long_poll;
    loop {
        let arrived = state.job_arrived.notified();
        tokio::pin!(arrived);
        // Register for the wake-up before looking, so a job enqueued in between is not missed.
        arrived.as_mut().enable();
        let jobs = state.with(|inner| {
            let queue = inner.endpoint(&endpoint);
            let count = wanted.min(queue.pending.len());
            let jobs: Vec<Value> = queue.pending.drain(..count).collect();
            for job in &jobs {
                if let Some(id) = job.get("id").and_then(Value::as_str) {
                    queue.in_progress.insert(id.to_owned(), worker.clone());
                    if let Some(status) = queue.statuses.get_mut(id) {
                        status.status = "IN_PROGRESS";
                        status.started = Some(std::time::Instant::now());
                    }
                }
            }
            let timed_out = tokio::time::Instant::now() >= deadline;
            if !jobs.is_empty() || timed_out {
                queue.takes.push(TakeRecord {
                    worker: worker.clone(),
                    batch_size,
                    job_in_progress: query.get("job_in_progress").cloned(),
                    returned: jobs.len(),
                });
            }
            jobs
        });
        if !jobs.is_empty() {
            return match batch_size {
                None => Json(jobs.into_iter().next().unwrap_or_default()).into_response(),
                Some(_) => Json(Value::Array(jobs)).into_response(),
            };
        }
        if tokio::time::Instant::now() >= deadline {
            return StatusCode::NO_CONTENT.into_response();
        }
        // Woken or timed out, loop once more: a timeout records the empty take and answers 204.
        let _ = tokio::time::timeout_at(deadline, arrived).await;
    }
}

async fn stop(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = gate(&state, Route::Stop, &headers) {
        return refused;
    }
    let deadline = tokio::time::Instant::now() + state.long_poll;
    loop {
        let arrived = state.stop_arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let ids = state.with(|inner| {
            inner
                .endpoint(&endpoint)
                .stops
                .remove(&worker)
                .unwrap_or_default()
        });
        if !ids.is_empty() {
            return Json(json!({ "jobsToStop": ids })).into_response();
        }
        if tokio::time::timeout_at(deadline, arrived).await.is_err() {
            return StatusCode::NO_CONTENT.into_response();
        }
    }
}

fn parse_body(body: &Bytes, what: &str) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("{what} body is not JSON: {e}"),
        )
    })
}

fn not_held(job: &str, worker: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "job {job} is not held by worker {worker} (unknown, finished, expired or requeued)"
        ),
    )
}

async fn done(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker, job)): Path<(String, String, String)>,
    Query(query): Params,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = gate(&state, Route::Done, &headers) {
        return refused;
    }
    let body = match parse_body(&body, "job-done") {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let progress = body.get("status").and_then(Value::as_str) == Some("IN_PROGRESS");
    let accepted = state.with(|inner| {
        let queue = inner.endpoint(&endpoint);
        if queue.in_progress.get(&job) != Some(&worker) {
            return false;
        }
        let record = DoneRecord {
            job_id: job.clone(),
            worker: worker.clone(),
            is_stream: query.get("isStream").cloned(),
            body,
        };
        if let Some(status) = queue.statuses.get_mut(&job) {
            let error = record.body.get("error").filter(|e| e.is_string()).cloned();
            status.output = record.body.get("output").cloned();
            if !progress {
                status.status = if error.is_some() {
                    "FAILED"
                } else {
                    "COMPLETED"
                };
                status.error = error;
                status.finished = Some(std::time::Instant::now());
            }
        }
        if progress {
            queue.progress.push(record);
        } else {
            queue.in_progress.remove(&job);
            queue.done.push(record);
        }
        true
    });
    if accepted {
        StatusCode::OK.into_response()
    } else {
        not_held(&job, &worker)
    }
}

async fn stream(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker, job)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = gate(&state, Route::Stream, &headers) {
        return refused;
    }
    let body = match parse_body(&body, "job-stream") {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let accepted = state.with(|inner| {
        let queue = inner.endpoint(&endpoint);
        let held = queue.in_progress.get(&job) == Some(&worker);
        if held {
            queue.streams.push(StreamRecord {
                job_id: job.clone(),
                body,
            });
        }
        held
    });
    if accepted {
        StatusCode::OK.into_response()
    } else {
        not_held(&job, &worker)
    }
}

async fn ping(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker)): Path<(String, String)>,
    Query(query): Params,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = gate(&state, Route::Ping, &headers) {
        return refused;
    }
    let job_ids = query
        .get("job_id")
        .map(|ids| {
            ids.split(',')
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    state.with(|inner| {
        inner.endpoint(&endpoint).pings.push(PingRecord {
            worker,
            job_ids,
            query,
            at: std::time::Instant::now(),
        });
    });
    StatusCode::OK.into_response()
}
