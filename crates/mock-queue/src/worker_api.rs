//! The worker-facing routes of the mock queue (docs/runpod-protocol.md §6.2): long-poll take and
//! batch take, job-done (the body parsed as JSON whatever its content type), job-stream, ping
//! and the job-stop long-poll.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::body::{owned, raw_of, string_field, top_level, JobBody, TopLevel};
use super::jobs::JobState;
use super::replies::{error, json_text, unknown_job};
use super::state::{
    DoneRecord, MockState, PingRecord, ResultHeaders, Route, StreamRecord, TakeRecord,
};

type Params = Query<BTreeMap<String, String>>;

/// The worker API routes, each behind the gate with its route's label.
pub(super) fn routes(state: &Arc<MockState>) -> Router<Arc<MockState>> {
    let gate = |route: Route| {
        axum::middleware::from_fn_with_state((state.clone(), route), super::gate::check)
    };
    Router::new()
        .route(
            "/v2/{endpoint}/job-take/{worker}",
            get(take).route_layer(gate(Route::Take)),
        )
        .route(
            "/v2/{endpoint}/job-take-batch/{worker}",
            get(take_batch).route_layer(gate(Route::Take)),
        )
        .route(
            "/v2/{endpoint}/job-stop/{worker}",
            get(stop).route_layer(gate(Route::Stop)),
        )
        .route(
            "/v2/{endpoint}/job-done/{worker}/{job}",
            post(done).route_layer(gate(Route::Done)),
        )
        .route(
            "/v2/{endpoint}/job-stream/{worker}/{job}",
            post(stream).route_layer(gate(Route::Stream)),
        )
        .route(
            "/v2/{endpoint}/ping/{worker}",
            get(ping).route_layer(gate(Route::Ping)),
        )
}

async fn take(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker)): Path<(String, String)>,
    Query(query): Params,
) -> Response {
    take_jobs(state, endpoint, worker, None, query).await
}

async fn take_batch(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker)): Path<(String, String)>,
    Query(query): Params,
) -> Response {
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
    let lease_timeout = state.options.lease_timeout;
    let record_history = state.options.record_history;
    let deadline = tokio::time::Instant::now() + state.options.long_poll;
    loop {
        let arrived = state.job_arrived.notified();
        tokio::pin!(arrived);
        // Register for the wake-up before looking, so a job enqueued in between is not missed.
        arrived.as_mut().enable();
        let jobs = state.with(|inner| {
            // A take on an endpoint that has no queue yet finds nothing, and makes none
            // (unless tests read its record): any id in a path would otherwise leave one.
            let queue = if record_history {
                inner.endpoint(&endpoint)
            } else {
                match inner.endpoints.get_mut(&endpoint) {
                    Some(queue) => queue,
                    None => return Vec::new(),
                }
            };
            let count = wanted.min(queue.pending.len());
            let jobs: Vec<JobBody> = queue.pending.drain(..count).collect();
            let now = std::time::Instant::now();
            let mut taken = Vec::with_capacity(jobs.len());
            for job in &jobs {
                let id = job.id().unwrap_or_default();
                if let Some(record) = queue.jobs.get_mut(id) {
                    record.state = JobState::InProgress;
                    record.holder = Some(worker.clone());
                    record.last_worker = Some(worker.clone());
                    record.lease_lost_by = None;
                    record.lease_until = Some(now + lease_timeout);
                    record.started = Some(now);
                    taken.push(id);
                }
            }
            let timed_out = tokio::time::Instant::now() >= deadline;
            if record_history && (!jobs.is_empty() || timed_out) {
                queue.takes.push(TakeRecord {
                    worker: worker.clone(),
                    batch_size,
                    job_in_progress: query.get("job_in_progress").cloned(),
                    returned: jobs.len(),
                });
            }
            for id in taken {
                inner.reschedule(&endpoint, id);
                inner.job_changed(id);
            }
            jobs
        });
        if !jobs.is_empty() {
            tracing::info!(
                "{} by {worker}{}: {} job(s)",
                if batch_size.is_some() {
                    "job-take-batch"
                } else {
                    "job-take"
                },
                batch_size
                    .map(|n| format!(" (batch_size={n})"))
                    .unwrap_or_default(),
                jobs.len()
            );
            // The jobs' text as it was queued: no tree is built, however large the input.
            let texts = jobs.iter().map(|job| job.text().get());
            return match batch_size {
                None => json_text(texts.collect::<String>()),
                Some(_) => json_text(format!("[{}]", texts.collect::<Vec<_>>().join(","))),
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
) -> Response {
    let deadline = tokio::time::Instant::now() + state.options.long_poll;
    loop {
        let arrived = state.stop_arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let ids = state.with(|inner| {
            let ids = inner
                .endpoints
                .get_mut(&endpoint)
                .and_then(|queue| queue.stops.remove(&worker))
                .unwrap_or_default();
            if !ids.is_empty() && !state.options.record_history {
                inner.forget_if_idle(&endpoint);
            }
            ids
        });
        if !ids.is_empty() {
            return Json(json!({ "jobsToStop": ids })).into_response();
        }
        if tokio::time::timeout_at(deadline, arrived).await.is_err() {
            return StatusCode::NO_CONTENT.into_response();
        }
    }
}

/// Refuses a body over `limit` as the platform does: 400 with the sizes (a 413 would be the
/// HTTP convention, but a worker must handle the 400 the platform really sends).
fn check_size(body: &Bytes, limit: usize, what: &str) -> Result<(), Response> {
    if body.len() <= limit {
        return Ok(());
    }
    Err(error(
        StatusCode::BAD_REQUEST,
        format!(
            "{what} body is {} bytes, over the limit of {limit} bytes",
            body.len()
        ),
    ))
}

/// The body's top-level fields, each as its text (none when it is not an object).
fn parse_body<'a>(body: &'a Bytes, what: &str) -> Result<TopLevel<'a>, Response> {
    top_level(body).map(Option::unwrap_or_default).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("{what} body is not JSON: {e}"),
        )
    })
}

/// The whole body as a tree, for the test history only (`record_history`).
fn history_of(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

async fn done(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker, job)): Path<(String, String, String)>,
    Query(query): Params,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let checked = check_size(&body, state.options.max_result_size, "job-done")
        .and_then(|()| parse_body(&body, "job-done"));
    let fields = match checked {
        Ok(fields) => fields,
        Err(refused) => return refused,
    };
    let progress = string_field(&fields, "status").as_deref() == Some("IN_PROGRESS");
    // The error string is parsed; the output is kept as its text.
    let error_text = string_field(&fields, "error").map(Value::String);
    let output = fields.get("output").map(|output| owned(output));
    let record_history = state.options.record_history;
    let mut webhook = None;
    let outcome = state.with(|inner| {
        let Some(queue) = inner.endpoints.get_mut(&endpoint) else {
            return Err(unknown_job(&state.options, &job));
        };
        let reclaimed = reclaim(queue, &job, &worker, state.options.lease_timeout);
        let Some(record) = queue.jobs.get_mut(&job) else {
            return Err(unknown_job(&state.options, &job));
        };
        if record.holder.as_deref() != Some(worker.as_str()) {
            // A late result from a worker that lost the job (lease expired and taken by
            // another, cancelled, timed out): refuse it, and tell that worker to stop.
            let message = format!(
                "job {job} is not held by worker {worker} (it is {})",
                record.state.as_str()
            );
            queue.stop(&worker, &job);
            return Err(error(StatusCode::NOT_FOUND, message));
        }
        record.output = output;
        if !progress {
            record.state = if error_text.is_some() {
                JobState::Failed
            } else {
                JobState::Completed
            };
            record.error = error_text;
            record.holder = None;
            record.lease_until = None;
            record.finished = Some(std::time::Instant::now());
            webhook = record
                .webhook
                .clone()
                .map(|url| (url, record.status_body(&job)));
        }
        if record_history {
            let entry = DoneRecord {
                job_id: job.clone(),
                worker: worker.clone(),
                is_stream: query.get("isStream").cloned(),
                body: history_of(&body),
                headers: ResultHeaders::of(&headers),
            };
            match progress {
                true => queue.progress.push(entry),
                false => queue.done.push(entry),
            }
        }
        if !progress || reclaimed {
            inner.reschedule(&endpoint, &job);
        }
        inner.job_changed(&job);
        Ok(())
    });
    state.wake();
    if let Some((url, body)) = webhook {
        tokio::spawn(super::leases::deliver_webhook(state, url, body));
    }
    match outcome {
        Ok(()) => StatusCode::OK.into_response(),
        Err(refused) => refused,
    }
}

/// Gives job `id` back to `worker` when its lease on it ran out while it was stopped (SIGSTOP,
/// a frozen VM) and no one has taken it since, nor `/retry` sent it again: the worker is still
/// on it, and its progress, chunks and result are the job's (refusing them would have it run
/// twice for nothing). It is held again, with a fresh lease, and leaves the queue. Whether it
/// was.
fn reclaim(
    queue: &mut super::state::EndpointQueue,
    id: &str,
    worker: &str,
    lease: Duration,
) -> bool {
    let Some(record) = queue.jobs.get_mut(id) else {
        return false;
    };
    let lost_by_this_worker = record.holder.is_none()
        && record.state == JobState::InQueue
        && record.lease_lost_by.as_deref() == Some(worker);
    if !lost_by_this_worker {
        return false;
    }
    record.state = JobState::InProgress;
    record.holder = Some(worker.to_owned());
    record.lease_lost_by = None;
    record.lease_until = Some(std::time::Instant::now() + lease);
    queue.pending.retain(|queued| queued.id() != Some(id));
    tracing::info!(
        job_id = %id,
        "worker {worker}, whose lease on it ran out, is still on it: held again (no one had \
         taken the job since)"
    );
    true
}

async fn stream(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker, job)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let checked = check_size(&body, state.options.max_stream_chunk, "job-stream")
        .and_then(|()| parse_body(&body, "job-stream"));
    let chunk = match checked {
        Ok(fields) => fields
            .get("output")
            .map_or_else(|| raw_of(&Value::Null), |c| owned(c)),
        Err(refused) => return refused,
    };
    let outcome = state.with(|inner| {
        let Some(queue) = inner.endpoints.get_mut(&endpoint) else {
            return Err(unknown_job(&state.options, &job));
        };
        let reclaimed = reclaim(queue, &job, &worker, state.options.lease_timeout);
        let Some(record) = queue.jobs.get_mut(&job) else {
            return Err(unknown_job(&state.options, &job));
        };
        if record.holder.as_deref() != Some(worker.as_str()) {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("job {job} is not held by worker {worker}"),
            ));
        }
        record.stream.push_back(chunk);
        if state.options.record_history {
            queue.streams.push(StreamRecord {
                job_id: job.clone(),
                body: history_of(&body),
                headers: ResultHeaders::of(&headers),
            });
        }
        if reclaimed {
            inner.reschedule(&endpoint, &job);
        }
        // Its `/stream` request may be held waiting for a chunk.
        inner.job_changed(&job);
        Ok(())
    });
    match outcome {
        Ok(()) => StatusCode::OK.into_response(),
        Err(refused) => refused,
    }
}

async fn ping(
    State(state): State<Arc<MockState>>,
    Path((endpoint, worker)): Path<(String, String)>,
    Query(query): Params,
) -> Response {
    let job_ids = query
        .get("job_id")
        .map(|ids| {
            ids.split(',')
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if query.get("status").map(String::as_str) == Some("unhealthy") {
        tracing::warn!(
            "worker {worker} reports itself unhealthy: check={} reason={}",
            query.get("check").map(String::as_str).unwrap_or("?"),
            query.get("reason").map(String::as_str).unwrap_or("?")
        );
    }
    let lease_timeout = state.options.lease_timeout;
    state.with(|inner| {
        let queue = inner.endpoint(&endpoint);
        let now = std::time::Instant::now();
        // A lease only moves later: the ticker finds the renewal when the old one comes due.
        for id in &job_ids {
            if let Some(record) = queue.jobs.get_mut(id) {
                if record.holder.as_deref() == Some(worker.as_str()) {
                    record.lease_until = Some(now + lease_timeout);
                }
            }
        }
        let ping = PingRecord {
            worker,
            job_ids,
            query,
            at: now,
        };
        if state.options.record_history {
            queue.pings.push(ping.clone());
        }
        inner.note_ping(&endpoint, ping, lease_timeout);
    });
    StatusCode::OK.into_response()
}
