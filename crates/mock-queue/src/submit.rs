//! Taking a job in from `/run` or `/runsync`: the body's size and shape, the `policy` and
//! `webhook` checks, the queue bound, and the job object that workers receive.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::body::{is_object, top_level, JobBody, TopLevel};
use super::options::MockOptions;
use super::policy::{self, FieldError};
use super::state::MockState;

/// Which route a job came in through: it sets the id's form and how long its result is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// `/run`: `<uuid>-u1`, kept `run_retention`.
    Run,
    /// `/runsync`: `sync-<uuid>-u1`, kept `runsync_retention`.
    RunSync,
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum SubmitError {
    /// Over the route's size limit.
    #[error("request body of {size} bytes is over the {} MB limit", limit / 1_000_000)]
    TooLarge { size: usize, limit: usize },
    /// Not JSON at all.
    #[error("the body is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// JSON, but not an object.
    #[error("the body must be a JSON object like {{\"input\": {{...}}}}")]
    NotObject,
    /// No `input`.
    #[error("`input` is required: {{\"input\": {{...}}}}")]
    NoInput,
    /// `input` is not an object.
    #[error("`input` must be a JSON object")]
    InputNotObject,
    /// A field the platform would refuse.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// `--max-queued` jobs are waiting.
    #[error("the queue is full ({0} jobs waiting); retry later")]
    QueueFull(usize),
    /// The endpoint keeps `--max-jobs` jobs already.
    #[error(
        "endpoint {endpoint:?} keeps {kept} jobs, its most (--max-jobs): queued, running, and \
         finished ones until their retention ends; retry once some have gone, or start the \
         queue with a larger --max-jobs"
    )]
    TooManyKept { endpoint: String, kept: usize },
}

impl IntoResponse for SubmitError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::QueueFull(_) | Self::TooManyKept { .. } => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        };
        let mut body = json!({ "error": self.to_string() });
        if let Self::Field(e) = &self {
            body["field"] = json!(e.field);
        }
        (status, Json(body)).into_response()
    }
}

/// Checks a submit body, queues the job on `endpoint`, and returns its id.
pub(super) fn submit(
    state: &MockState,
    endpoint: &str,
    body: &[u8],
    limit: usize,
    via: Via,
) -> Result<String, SubmitError> {
    if body.len() > limit {
        return Err(SubmitError::TooLarge {
            size: body.len(),
            limit,
        });
    }
    let submitted = match top_level(body) {
        Ok(Some(fields)) => fields,
        Ok(None) => return Err(SubmitError::NotObject),
        Err(e) => return Err(SubmitError::NotJson(e)),
    };
    check(&submitted, &state.options)?;
    let (prefix, retention) = match via {
        Via::Run => ("", state.options.run_retention),
        Via::RunSync => ("sync-", state.options.runsync_retention),
    };
    let id = format!("{prefix}{}-u1", uuid::Uuid::new_v4());
    // Only the documented top-level keys reach the worker; others are discarded, as
    // documented. Each is copied as it was sent: the job is kept as text, never as a tree.
    let field = |key: &str| submitted.get(key).copied();
    let job = JobObject {
        id: &id,
        input: field("input"),
        policy: field("policy"),
        s3_config: field("s3Config"),
        webhook: field("webhook"),
    };
    let job = serde_json::value::to_raw_value(&job).map_err(SubmitError::NotJson)?;
    // Read before the queue's lock is taken.
    let job = JobBody::new(job);
    enqueue(state, endpoint, job, retention)?;
    Ok(id)
}

/// A job object as workers receive it, its fields in the order the mock has always sent.
#[derive(Serialize)]
struct JobObject<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a RawValue>,
    #[serde(rename = "s3Config", skip_serializing_if = "Option::is_none")]
    s3_config: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<&'a RawValue>,
}

/// The checks on the submitted fields, in the order a client would fix them. Only the small
/// fields are parsed (`policy`, `webhook`); `input` is only seen to be an object.
fn check(submitted: &TopLevel<'_>, options: &MockOptions) -> Result<(), SubmitError> {
    match submitted.get("input") {
        Some(input) if is_object(input) => {}
        Some(_) => return Err(SubmitError::InputNotObject),
        None => return Err(SubmitError::NoInput),
    }
    let parsed =
        |raw: &RawValue| serde_json::from_str::<Value>(raw.get()).map_err(SubmitError::NotJson);
    if let Some(policy) = submitted.get("policy") {
        policy::check_policy(&parsed(policy)?, options.strict_policy_minimums)?;
    }
    if let Some(webhook) = submitted.get("webhook") {
        policy::check_webhook(&parsed(webhook)?, options.allow_private_webhooks)?;
    }
    Ok(())
}

/// Queues `job` unless `--max-queued` jobs are waiting already, or the endpoint keeps
/// `--max-jobs` jobs.
fn enqueue(
    state: &MockState,
    endpoint: &str,
    job: JobBody,
    retention: Duration,
) -> Result<(), SubmitError> {
    let MockOptions {
        max_queued,
        max_jobs,
        ..
    } = state.options;
    state.with(|inner| {
        if let Some(queue) = inner.endpoints.get(endpoint) {
            if let Some(max) = max_queued.filter(|max| queue.pending.len() >= *max) {
                return Err(SubmitError::QueueFull(max));
            }
            if let Some(max) = max_jobs.filter(|max| queue.jobs.len() >= *max) {
                return Err(SubmitError::TooManyKept {
                    endpoint: endpoint.to_owned(),
                    kept: max,
                });
            }
        }
        inner.push(endpoint, job, retention);
        Ok(())
    })?;
    state.wake();
    Ok(())
}
