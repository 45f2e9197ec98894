//! The mock's JSON replies: errors, shared by the routes and the gate in front of them, and
//! bodies the mock keeps as JSON text.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::options::MockOptions;

/// A JSON error body with `status`.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// `text`, JSON already, as a 200 with the JSON content type.
pub(super) fn json_text(text: impl Into<String>) -> Response {
    let json = [(header::CONTENT_TYPE, "application/json")];
    (json, text.into()).into_response()
}

/// 404 for a job id the queue does not know, with every reason it may have gone.
pub(super) fn unknown_job(options: &MockOptions, job: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "job {job} not found: never queued, purged, deleted at its policy.ttl, or ended \
             longer ago than results are kept ({} after /run, {} after /runsync)",
            readable(options.run_retention),
            readable(options.runsync_retention)
        ),
    )
}

/// `30 min`, `60 s`, `200 ms`.
fn readable(duration: std::time::Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => format!("{} ms", duration.as_millis()),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}
