//! The routes of a load-balancing worker: `/runsync` (the queue API's shape, so a client
//! switches by changing its URL), `/stream` (a streaming job's chunks as server-sent events),
//! OpenAI's `/v1/*` (as the queue's OpenAI route serves it), beside `/health`, `/metrics` and the
//! ping. A request that cannot get its slot and its memory within the local queue's bound, or
//! that finds the waiting room full, gets `429` with `Retry-After`; a draining worker `503`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde_json::{json, Value};

use super::request::{self, RunRequest};
use super::SubmitterSlot;
use crate::health;
use crate::observed::WorkerSlot;
use crate::outcome::JobError;
use crate::runner::{DirectAnswer, NotTaken, PendingJob};
use runpod_protocol::limits::{LOAD_BALANCER_REQUEST_TIMEOUT, MAX_LOAD_BALANCER_BODY};
use runpod_protocol::{openai, ApiKey};

/// The API key the routes ask for (`RUNPOD_AI_API_KEY`); an empty one asks for none.
#[derive(Clone, Default)]
pub struct Gate(pub ApiKey);

#[derive(Clone)]
struct Routes {
    submitter: SubmitterSlot,
    slot: WorkerSlot,
}

/// The routes a load-balancing worker serves on `PORT` beside `/health`, `/ready`, `/metrics`
/// and `/ping` ([`health::serve`] adds those): the job routes (behind `gate`), the ping at
/// `ping_path` too, and a 404 that lists the routes.
pub fn router(submitter: SubmitterSlot, slot: WorkerSlot, gate: Gate, ping_path: &str) -> Router {
    let state = Routes {
        submitter,
        slot: slot.clone(),
    };
    let jobs = Router::new()
        .route("/runsync", post(runsync))
        .route("/stream", post(stream))
        .route("/v1/{*path}", get(openai_route).post(openai_route))
        .layer(DefaultBodyLimit::max(MAX_LOAD_BALANCER_BODY))
        .route_layer(axum::middleware::from_fn_with_state(gate, check_key))
        .with_state(state);
    jobs.merge(health_router(slot, ping_path))
        .fallback(unknown_route)
}

/// The ping at `ping_path` (`HEALTH_CHECK_PATH`), beside what [`health::serve`] serves on
/// every port (`/ping` among them): all a separate `PORT_HEALTH` adds.
pub fn health_router(slot: WorkerSlot, ping_path: &str) -> Router {
    if ping_path == "/ping" {
        Router::new()
    } else {
        health::ping_route(slot, ping_path)
    }
}

async fn check_key(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    let Gate(key) = gate;
    if key.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if key.matches_header(presented) {
        return next.run(request).await;
    }
    let message = "missing or wrong API key: send `Authorization: Bearer KEY`";
    if request.uri().path().starts_with("/v1/") {
        let body = openai::error_object("invalid_request_error", "invalid_api_key", message);
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    error_reply(StatusCode::UNAUTHORIZED, "Unauthorized", message)
}

async fn unknown_route(request: Request) -> Response {
    let message = format!(
        "no route {} {}: this worker serves POST /runsync, POST /stream, POST /v1/embeddings, \
         GET /v1/models, GET /ping, GET /health and GET /metrics",
        request.method(),
        request.uri().path()
    );
    error_reply(StatusCode::NOT_FOUND, "InvalidInput", &message)
}

/// An error before any job ran, in the seed's error shape.
fn error_reply(status: StatusCode, error_type: &str, message: &str) -> Response {
    let body = json!({ "success": false, "error": message, "error_type": error_type });
    (status, Json(body)).into_response()
}

/// A body the server would not read: too large (413), or cut short.
fn unreadable(rejection: BytesRejection) -> Response {
    let status = rejection.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "the body is over the limit of {} MB",
            MAX_LOAD_BALANCER_BODY / 1_000_000
        )
    } else {
        format!("the body could not be read: {}", rejection.body_text())
    };
    error_reply(status, "InvalidInput", &message)
}

/// Why no job was started, as the routes say it.
enum Refused {
    /// Still loading its models.
    Starting,
    /// Draining, or being replaced.
    Draining,
    /// The waiting room is full: the retry signal.
    Full(JobError),
}

impl Routes {
    fn submit(&self, request: RunRequest, stream: bool) -> Result<PendingJob, Refused> {
        let submitter = self.submitter.get().ok_or(Refused::Starting)?;
        submitter
            .submit(request.input, request.deadline, stream)
            .map_err(|not_taken| match not_taken {
                NotTaken::Draining => Refused::Draining,
                NotTaken::Full(error) => Refused::Full(error),
            })
    }

    fn worker_id(&self) -> Option<String> {
        self.slot.get().map(|observed| observed.worker_id.clone())
    }
}

impl Refused {
    /// In the seed's shape (the retry signal's object for a full worker).
    fn into_response(self) -> Response {
        match self {
            Self::Starting => error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "Starting",
                "the worker is still loading its models; retry once /ping answers 200",
            ),
            Self::Draining => error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "Draining",
                "the worker is shutting down and takes no new request; send it to another",
            ),
            Self::Full(error) => {
                let retry_after = error.retry_after;
                with_retry_after(
                    (StatusCode::TOO_MANY_REQUESTS, Json(error.to_object())).into_response(),
                    retry_after,
                )
            }
        }
    }

    /// In OpenAI's shape.
    fn into_openai_response(self) -> Response {
        let unavailable = |code: &str, message: &str| {
            let body = openai::error_object("server_error", code, message);
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        };
        match self {
            Self::Starting => unavailable("starting", "the worker is still loading its models"),
            Self::Draining => unavailable("draining", "the worker is shutting down"),
            Self::Full(error) => openai_failure(&error),
        }
    }
}

fn with_retry_after(mut response: Response, seconds: Option<u64>) -> Response {
    if let Some(seconds) = seconds {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// The queue API's `/runsync` (and `/status`) body for a finished request: an error result goes
/// as `output` (the error object) and as `error` (its JSON text), as the queue shows it.
fn status_body(answer: &DirectAnswer, worker_id: Option<String>) -> Value {
    let ms = |d: Duration| d.as_millis() as u64;
    let mut body = json!({
        "id": answer.id,
        "delayTime": ms(answer.delay),
        "executionTime": ms(answer.execution),
    });
    match &answer.result {
        Ok(output) => {
            body["status"] = json!("COMPLETED");
            body["output"] = output.clone();
        }
        Err(error) => {
            let object = error.to_object();
            body["status"] = json!("FAILED");
            body["error"] = json!(object.to_string());
            body["output"] = object;
        }
    }
    if let Some(worker_id) = worker_id {
        body["workerId"] = json!(worker_id);
    }
    body
}

/// The retry signal's `retry_after`, when the answer is one (the request may succeed later).
fn retry_after_of(answer: &DirectAnswer) -> Option<u64> {
    answer.result.as_ref().err().and_then(|e| e.retry_after)
}

/// The job ended without an answer: its stop came from the worker (never the client, which
/// would not be reading).
fn unanswered() -> Response {
    error_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "Interrupted",
        "the request's job was stopped before it could answer; send it again",
    )
}

/// Reads a `/runsync` or `/stream` body and submits it: the pending job, or the response that
/// refuses it (unreadable, malformed, or not taken).
#[allow(clippy::result_large_err)] // the refusal is the reply itself, returned at once
fn submit_body(
    routes: &Routes,
    body: Result<Bytes, BytesRejection>,
    stream: bool,
) -> Result<PendingJob, Response> {
    let body = body.map_err(unreadable)?;
    let request = request::parse(&body)
        .map_err(|message| error_reply(StatusCode::BAD_REQUEST, "InvalidInput", &message))?;
    routes
        .submit(request, stream)
        .map_err(Refused::into_response)
}

/// A finished request as `/runsync` answers it: 200 with the queue API's body, or 429 with
/// `Retry-After` for the retry signal.
fn runsync_reply(answer: &DirectAnswer, worker_id: Option<String>) -> Response {
    let retry_after = retry_after_of(answer);
    let status = if retry_after.is_some() {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::OK
    };
    let body = status_body(answer, worker_id);
    with_retry_after((status, Json(body)).into_response(), retry_after)
}

async fn runsync(State(routes): State<Routes>, body: Result<Bytes, BytesRejection>) -> Response {
    let mut pending = match submit_body(&routes, body, false) {
        Ok(pending) => pending,
        Err(refused) => return refused,
    };
    match (&mut pending.answer).await {
        Ok(answer) => runsync_reply(&answer, routes.worker_id()),
        Err(_) => unanswered(),
    }
}

/// `POST /stream`: the job's chunks as server-sent events, each `{"output": chunk}`, then an
/// event `done` with the `/runsync` body. A request refused before any chunk (the retry signal)
/// is answered as `/runsync` would answer it, with its status code.
async fn stream(State(routes): State<Routes>, body: Result<Bytes, BytesRejection>) -> Response {
    let mut pending = match submit_body(&routes, body, true) {
        Ok(pending) => pending,
        Err(refused) => return refused,
    };
    let Some(mut chunks) = pending.chunks.take() else {
        return unanswered();
    };
    // The first chunk or the answer, before the status code is chosen: a request refused before
    // it streamed anything (the retry signal) is answered as `/runsync` would answer it.
    let answer = tokio::select! {
        biased;
        answer = &mut pending.answer => answer,
        chunk = chunks.recv() => match chunk {
            Some(chunk) => {
                let events = events(chunks, Some(chunk), None, pending, routes.worker_id());
                return Sse::new(events).keep_alive(KeepAlive::default()).into_response();
            }
            // No chunk will come: the answer is there or on its way.
            None => (&mut pending.answer).await,
        },
    };
    let Ok(answer) = answer else {
        return unanswered();
    };
    if retry_after_of(&answer).is_some() && chunks.is_empty() {
        return runsync_reply(&answer, routes.worker_id());
    }
    let events = events(chunks, None, Some(answer), pending, routes.worker_id());
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The event stream: `first` (already read), the rest of the chunks, then `done` with the
/// answer (`answer`, when already read). The answer is awaited beside the chunks, not after
/// them: a job's chunk channel closes only when its model threads return, and a timed-out call
/// that ignores cancellation must not hold the stream's end (nor, at SIGTERM, the server's).
/// The pending job travels with the stream, so a client that goes away stops its job.
fn events(
    chunks: tokio::sync::mpsc::Receiver<Value>,
    first: Option<Value>,
    answer: Option<DirectAnswer>,
    pending: PendingJob,
    worker_id: Option<String>,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    struct State {
        chunks: tokio::sync::mpsc::Receiver<Value>,
        first: Option<Value>,
        /// `None` until the answer is known; then the answer, or `None` if the job was
        /// stopped without one.
        answer: Option<Option<DirectAnswer>>,
        pending: Option<PendingJob>,
        worker_id: Option<String>,
    }
    fn chunk_event(chunk: Value) -> Event {
        Event::default().data(json!({ "output": chunk }).to_string())
    }
    let state = State {
        chunks,
        first,
        answer: answer.map(Some),
        pending: Some(pending),
        worker_id,
    };
    futures::stream::unfold(state, |mut state| async move {
        let mut pending = state.pending.take()?;
        if let Some(chunk) = state.first.take() {
            state.pending = Some(pending);
            return Some((Ok(chunk_event(chunk)), state));
        }
        if state.answer.is_none() {
            tokio::select! {
                biased;
                chunk = state.chunks.recv() => match chunk {
                    Some(chunk) => {
                        state.pending = Some(pending);
                        return Some((Ok(chunk_event(chunk)), state));
                    }
                    None => state.answer = Some((&mut pending.answer).await.ok()),
                },
                answer = &mut pending.answer => state.answer = Some(answer.ok()),
            }
        }
        // The answer is known: what the job streamed before it still goes first.
        if let Ok(chunk) = state.chunks.try_recv() {
            state.pending = Some(pending);
            return Some((Ok(chunk_event(chunk)), state));
        }
        let body = match state.answer.take().flatten() {
            Some(answer) => status_body(&answer, state.worker_id.clone()),
            None => json!({ "status": "FAILED", "error": "the request's job was stopped" }),
        };
        let event = Event::default().event("done").data(body.to_string());
        Some((Ok(event), state))
    })
}

/// OpenAI's routes, as the platform's OpenAI route serves them: the request becomes a job of
/// `openai_route` and `openai_input`, answered in OpenAI's shape.
async fn openai_route(
    State(routes): State<Routes>,
    Path(path): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let body = openai::error_object(
                "invalid_request_error",
                "invalid_body",
                &rejection.body_text(),
            );
            return (status, Json(body)).into_response();
        }
    };
    let text = std::str::from_utf8(&body).unwrap_or_default();
    if let Some(message) = runpod_protocol::job::oversized_integer_problem(text, "body") {
        let body = openai::error_object("invalid_request_error", "invalid_number", &message);
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }
    let openai_input: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(input) => input,
            Err(_) => {
                let body = openai::error_object(
                    "invalid_request_error",
                    "invalid_json",
                    "We could not parse the JSON body of your request.",
                );
                return (StatusCode::BAD_REQUEST, Json(body)).into_response();
            }
        }
    };
    let request = RunRequest {
        input: json!({ "openai_route": format!("/v1/{path}"), "openai_input": openai_input }),
        deadline: LOAD_BALANCER_REQUEST_TIMEOUT,
    };
    let mut pending = match routes.submit(request, false) {
        Ok(pending) => pending,
        Err(refused) => return refused.into_openai_response(),
    };
    let Ok(answer) = (&mut pending.answer).await else {
        return unanswered();
    };
    match answer.result {
        Ok(output) => (StatusCode::OK, Json(output)).into_response(),
        Err(error) => openai_failure(&error),
    }
}

fn openai_failure(error: &JobError) -> Response {
    let (status, body, retry_after) = openai::failed_reply(&error.to_object());
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    with_retry_after((status, Json(body)).into_response(), retry_after)
}
