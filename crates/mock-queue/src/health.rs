//! `GET /health` of an endpoint: its jobs by state, and its workers as their latest pings
//! describe them (alive for a lease after a ping; unhealthy if that ping said so).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::jobs::JobState;
use super::state::{EndpointQueue, MockState};

pub(super) async fn health(
    State(state): State<Arc<MockState>>,
    Path(endpoint): Path<String>,
) -> Response {
    let seen_within = state.options.lease_timeout;
    let body = state.read(|inner| {
        let empty = EndpointQueue::default();
        endpoint_health(
            inner.endpoints.get(&endpoint).unwrap_or(&empty),
            seen_within,
        )
    });
    Json(body).into_response()
}

/// The `/health` body of one endpoint's queue: its jobs by state, and its workers as seen
/// within `seen_within` of their latest ping (the console shows the same numbers).
pub fn endpoint_health(queue: &EndpointQueue, seen_within: std::time::Duration) -> Value {
    let count = |s: JobState| queue.jobs.values().filter(|j| j.state == s).count();
    let now = Instant::now();
    // (worker, whether its latest ping said it is unhealthy)
    let alive: Vec<(&str, bool)> = queue
        .workers
        .iter()
        .filter(|(_, ping)| now.saturating_duration_since(ping.at) < seen_within)
        .map(|(worker, ping)| {
            let status = ping.query.get("status").map(String::as_str);
            (worker.as_str(), status == Some("unhealthy"))
        })
        .collect();
    let running: BTreeSet<&str> = queue
        .jobs
        .values()
        .filter_map(|j| j.holder.as_deref())
        .collect();
    let unhealthy = alive.iter().filter(|(_, unhealthy)| *unhealthy).count();
    let idle = alive
        .iter()
        .filter(|(worker, unhealthy)| !unhealthy && !running.contains(worker))
        .count();
    json!({
        "jobs": {
            "completed": count(JobState::Completed),
            "failed": count(JobState::Failed) + count(JobState::TimedOut),
            "inProgress": count(JobState::InProgress),
            "inQueue": queue.pending.len(),
            "retried": queue.retried,
        },
        "workers": {
            "idle": idle,
            "initializing": 0,
            "ready": alive.len() - unhealthy,
            "running": running.len(),
            "throttled": 0,
            "unhealthy": unhealthy,
        },
    })
}
