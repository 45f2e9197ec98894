//! The client-facing routes of the mock queue (runpod-protocol.md §2), enough for `local`:
//! `POST /run`, `POST /runsync?wait=`, `GET /status/{id}` and `GET /health`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::state::{JobStatus, MockState, Route};
use super::worker_api::{error, gate};

/// `/run` bodies above this are refused (the platform's limit).
const RUN_LIMIT: usize = 10 * 1_000_000;
/// `/runsync` bodies above this are refused.
const RUNSYNC_LIMIT: usize = 20 * 1_000_000;

/// The client API routes.
pub(super) fn routes() -> Router<Arc<MockState>> {
    Router::new()
        .route("/v2/{endpoint}/run", post(run))
        .route("/v2/{endpoint}/runsync", post(runsync))
        .route("/v2/{endpoint}/status/{job}", get(status))
        .route("/v2/{endpoint}/health", get(health))
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
            format!("request body is over the {} MB limit", limit / 1_000_000),
        ));
    }
    let Ok(Value::Object(mut submitted)) = serde_json::from_slice::<Value>(body) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object like {\"input\": {...}}",
        ));
    };
    if !submitted.get("input").is_some_and(Value::is_object) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "`input` is required and must be a JSON object",
        ));
    }
    let id = format!("{prefix}{}-u1", uuid::Uuid::new_v4());
    submitted.insert("id".into(), Value::String(id.clone()));
    state.with(|inner| {
        let queue = inner.endpoint(endpoint);
        queue.statuses.insert(id.clone(), JobStatus::queued());
        queue.pending.push_back(Value::Object(submitted));
    });
    state.job_arrived.notify_waiters();
    Ok(id)
}

fn status_body(id: &str, status: &JobStatus) -> Value {
    let ms =
        |from: Instant, to: Option<Instant>| to.map(|t| t.duration_since(from).as_millis() as u64);
    let mut body = json!({ "id": id, "status": status.status });
    if let Some(delay) = ms(status.submitted, status.started) {
        body["delayTime"] = json!(delay);
    }
    if let (Some(started), Some(_)) = (status.started, status.finished) {
        body["executionTime"] = json!(ms(started, status.finished));
    }
    if let Some(output) = &status.output {
        body["output"] = output.clone();
    }
    if let Some(error) = &status.error {
        body["error"] = error.clone();
    }
    body
}

async fn run(
    State(state): State<Arc<MockState>>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = gate(&state, Route::Client, &headers) {
        return refused;
    }
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
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = gate(&state, Route::Client, &headers) {
        return refused;
    }
    let id = match submit(&state, &endpoint, &body, RUNSYNC_LIMIT, "sync-") {
        Ok(id) => id,
        Err(refused) => return refused,
    };
    let wait = Duration::from_millis(wait.wait.unwrap_or(90_000).clamp(1_000, 300_000));
    let find = |inner: &super::Inner| inner.endpoints.get(&endpoint)?.statuses.get(&id).cloned();
    let finished = state
        .wait_for(wait, |inner| find(inner).filter(JobStatus::is_final))
        .await;
    let current = finished.or_else(|| state.read(find));
    match current {
        Some(status) => Json(status_body(&id, &status)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("job {id} not found")),
    }
}

async fn status(
    State(state): State<Arc<MockState>>,
    Path((endpoint, job)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = gate(&state, Route::Client, &headers) {
        return refused;
    }
    let found = state.read(|inner| inner.endpoints.get(&endpoint)?.statuses.get(&job).cloned());
    match found {
        Some(status) => Json(status_body(&job, &status)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("job {job} not found")),
    }
}

async fn health(
    State(state): State<Arc<MockState>>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = gate(&state, Route::Client, &headers) {
        return refused;
    }
    let body = state.read(|inner| {
        let queue = inner.endpoints.get(&endpoint).cloned().unwrap_or_default();
        let count = |s: &str| queue.statuses.values().filter(|j| j.status == s).count();
        let recent = std::time::Instant::now() - Duration::from_secs(60);
        let workers: std::collections::BTreeSet<_> = queue
            .pings
            .iter()
            .filter(|p| p.at > recent)
            .map(|p| p.worker.clone())
            .collect();
        let running: std::collections::BTreeSet<_> = queue.in_progress.values().cloned().collect();
        json!({
            "jobs": {
                "completed": count("COMPLETED"),
                "failed": count("FAILED"),
                "inProgress": count("IN_PROGRESS"),
                "inQueue": queue.pending.len(),
                "retried": 0,
            },
            "workers": {
                "idle": workers.difference(&running).count(),
                "initializing": 0,
                "ready": workers.len(),
                "running": running.len(),
                "throttled": 0,
                "unhealthy": 0,
            },
        })
    });
    Json(body).into_response()
}
