//! `/v2/{endpoint}/openai/v1/*`: the platform's OpenAI-compatible route. A request becomes a
//! job whose input carries `openai_route` (the path after `/openai`) and `openai_input` (the
//! body), waited for as `/runsync` waits, and answered in OpenAI's shape: the job's output with
//! 200, or a failed job as OpenAI's error object, the retry signal as a 429 with `Retry-After`,
//! a route the worker does not serve (its error says `Invalid URL (...)`, as OpenAI's does) as
//! a 404.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::value::RawValue;
use serde_json::Value;

use super::jobs::JobState;
use super::replies::json_text;
use super::state::{MockState, Route};
use super::submit::{submit, Via};
use runpod_protocol::limits::MAX_RUNSYNC_BODY;
use runpod_protocol::openai;

/// How long a request waits for its job (`/runsync`'s default).
const WAIT: Duration = Duration::from_secs(90);

/// The OpenAI routes, behind the gate (the API key, as the platform asks for it).
pub(super) fn routes(state: &Arc<MockState>) -> Router<Arc<MockState>> {
    Router::new()
        .route("/v2/{endpoint}/openai/{*path}", get(forward).post(forward))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Route::Client),
            super::gate::check,
        ))
}

/// OpenAI's error object, with `status`.
fn openai_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    (status, Json(openai::error_object(kind, code, message))).into_response()
}

async fn forward(
    State(state): State<Arc<MockState>>,
    Path((endpoint, path)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    // The body goes into the job as it was sent (checked to be JSON, not parsed into a tree).
    let openai_input = if body.is_empty() {
        "null"
    } else {
        match serde_json::from_slice::<&RawValue>(&body) {
            Ok(input) => input.get(),
            Err(_) => {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_json",
                    "We could not parse the JSON body of your request.",
                )
            }
        }
    };
    let route = Value::String(format!("/{path}"));
    let job =
        format!(r#"{{"input": {{"openai_route": {route}, "openai_input": {openai_input}}}}}"#);
    let id = match submit(
        &state,
        &endpoint,
        job.as_bytes(),
        MAX_RUNSYNC_BODY,
        Via::RunSync,
    ) {
        Ok(id) => id,
        Err(refused) => return refused.into_response(),
    };
    let ended = state
        .wait_for_job(&id, WAIT, |inner| {
            let record = inner.endpoints.get(&endpoint)?.jobs.get(&id)?;
            record
                .state
                .is_final()
                .then(|| (record.state, record.output.clone()))
        })
        .await;
    match ended {
        Some((JobState::Completed, output)) => {
            json_text(output.map_or_else(|| "null".to_owned(), |o| o.get().to_owned()))
        }
        Some((JobState::Failed, output)) => {
            // An error object: small, parsed to read its type.
            let output = output.and_then(|o| serde_json::from_str(o.get()).ok());
            failed(&output.unwrap_or(Value::Null))
        }
        Some((other, _)) => openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            other.as_str(),
            &format!("the request's job ended {}", other.as_str()),
        ),
        None => openai_error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "timeout",
            "the request's job did not end in time",
        ),
    }
}

/// A failed job's error result (`error_type`, `error`, `retry_after`) in OpenAI's terms.
fn failed(output: &Value) -> Response {
    let (status, body, retry_after) = openai::failed_reply(output);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(body)).into_response();
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(after));
    }
    response
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn the_retry_signal_becomes_a_429_with_retry_after() {
        let response = failed(&json!({
            "success": false, "error": "GPU memory exhausted, retry shortly",
            "error_type": "InsufficientGPUMemory", "retry_after": 10
        }));
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "10");
        let invalid = failed(&json!({"error": "bad", "error_type": "InvalidInput"}));
        assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
        let body = axum::body::to_bytes(invalid.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["message"], "bad");
    }
}
