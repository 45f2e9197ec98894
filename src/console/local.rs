//! The console on the local endpoint: the page (no key), and its data routes, which need the
//! endpoint's API key: the worker's `/health` and history (fetched from the worker's port),
//! the queue's counts and workers, the recent jobs, one job's input and output (cut short when
//! large) and the handlers' sample inputs, embedded at build time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::{page, since_of, Mode, Since};
use mock_queue::{endpoint_health, EndpointQueue, JobBody, JobRecord, MockState};

/// Jobs listed, newest first.
const JOBS_LISTED: usize = 50;
/// Characters of an input or output shown; the rest is cut (a 20 MB result must not be sent
/// to the page every time it is clicked).
const SHOWN_CHARS: usize = 16_000;
/// How long the worker's port may take to answer.
const WORKER_TIMEOUT: Duration = Duration::from_secs(3);

/// The sample inputs of `handler/test_inputs/`, embedded at build time.
const SAMPLES: [&str; 4] = [
    include_str!("../../handler/test_inputs/classify.json"),
    include_str!("../../handler/test_inputs/extract.json"),
    include_str!("../../handler/test_inputs/echo.json"),
    include_str!("../../handler/test_inputs/example_torchscript.json"),
];

/// What the local console reads.
#[derive(Debug, Clone)]
pub struct LocalConsole {
    /// The mock queue's state (jobs, workers, the key).
    pub mock: Arc<MockState>,
    /// The endpoint id the console shows.
    pub endpoint: String,
    /// The worker's HTTP base, `http://127.0.0.1:PORT`.
    pub worker: String,
    client: reqwest::Client,
}

impl LocalConsole {
    /// The console of `endpoint` on `mock`, with the worker's endpoints at `worker`.
    pub fn new(mock: Arc<MockState>, endpoint: &str, worker: &str) -> Self {
        Self {
            mock,
            endpoint: endpoint.to_owned(),
            worker: worker.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .timeout(WORKER_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }
}

/// The local console's routes: `/` and its assets without a key, `/console/api/*` with it.
pub fn local_routes(console: LocalConsole) -> Router {
    let console = Arc::new(console);
    let api = Router::new()
        .route("/console/api/health", get(worker_health))
        .route("/console/api/history", get(worker_history))
        .route("/console/api/queue", get(queue))
        .route("/console/api/jobs", get(jobs))
        .route("/console/api/jobs/{id}", get(job))
        .route("/console/api/samples", get(samples))
        .route_layer(axum::middleware::from_fn_with_state(
            console.clone(),
            require_key,
        ))
        .with_state(console);
    Router::new()
        .route("/", get(|| async { page(Mode::Local) }))
        .merge(super::assets())
        .merge(api)
}

/// The endpoint's key, raw or `Bearer`, in the `Authorization` header (never in a URL, where
/// it would end up in logs and history).
async fn require_key(
    State(console): State<Arc<LocalConsole>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &console.mock.options.api_key {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !key.matches_header(presented) {
            let body = json!({ "error": "send the endpoint's API key: Authorization: Bearer KEY" });
            return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
        }
    }
    next.run(request).await
}

/// Passes a GET of the worker's `path` on: its status and JSON, or a 502 while no worker
/// answers (one that is being replaced, say).
async fn from_worker(console: &LocalConsole, path: &str) -> Response {
    let url = format!("{}{path}", console.worker);
    let answered = async {
        let response = console.client.get(&url).send().await?;
        let status = response.status().as_u16();
        let body: Value = response.json().await?;
        Ok::<_, reqwest::Error>((status, body))
    };
    match answered.await {
        Ok((status, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, Json(body)).into_response()
        }
        Err(e) => {
            let body = json!({ "error": format!("the worker does not answer: {e}") });
            (StatusCode::BAD_GATEWAY, Json(body)).into_response()
        }
    }
}

async fn worker_health(State(console): State<Arc<LocalConsole>>) -> Response {
    from_worker(&console, "/health").await
}

async fn worker_history(
    State(console): State<Arc<LocalConsole>>,
    since: Result<Query<Since>, QueryRejection>,
) -> Response {
    match since_of(since) {
        Ok(since) => from_worker(&console, &format!("/console/api/history?since={since}")).await,
        Err(refused) => refused.into_response(),
    }
}

/// Reads the endpoint's queue (an empty one before anything was submitted).
fn with_queue<T>(console: &LocalConsole, f: impl FnOnce(&EndpointQueue) -> T) -> T {
    console.mock.read(|inner| {
        let empty = EndpointQueue::default();
        f(inner.endpoints.get(&console.endpoint).unwrap_or(&empty))
    })
}

async fn queue(State(console): State<Arc<LocalConsole>>) -> Json<Value> {
    let lease = console.mock.options.lease_timeout;
    Json(with_queue(&console, |queue| {
        let now = Instant::now();
        let mut workers: Vec<Value> = queue
            .workers
            .iter()
            .map(|(id, ping)| {
                let ago = now.saturating_duration_since(ping.at);
                json!({
                    "id": id,
                    "last_ping_ms": ago.as_millis() as u64,
                    "alive": ago < lease,
                    "jobs_held": ping.job_ids.len(),
                    "status": ping.query.get("status"),
                })
            })
            .collect();
        workers.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        json!({ "health": endpoint_health(queue, lease), "workers": workers })
    }))
}

/// The largest output read for an error object: the worker's error object is a few hundred
/// bytes; a larger output is a result, and parsing it for every row of the list would hold
/// the queue's lock for nothing.
const ERROR_OBJECT_MAX: usize = 64 * 1024;

/// A job's `error_type` and `retry_after`: from its output (the worker's error object), or
/// from the error string that carries the same object.
fn failure(record: &JobRecord) -> (Option<String>, Option<u64>) {
    let from = |v: &Value| {
        let error_type = v.get("error_type")?.as_str()?.to_owned();
        Some((error_type, v.get("retry_after").and_then(Value::as_u64)))
    };
    let output = record
        .output
        .as_ref()
        .filter(|output| output.get().len() <= ERROR_OBJECT_MAX)
        .and_then(|output| serde_json::from_str::<Value>(output.get()).ok());
    let parsed = record
        .error
        .as_ref()
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str::<Value>(s).ok());
    output
        .as_ref()
        .and_then(from)
        .or_else(|| parsed.as_ref().and_then(from))
        .map_or((None, None), |(t, r)| (Some(t), r))
}

/// One row of the recent jobs: no input or output (those are fetched one job at a time).
fn row(id: &str, record: &JobRecord, now: Instant) -> Value {
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_millis() as u64;
    let task = record
        .body
        .task()
        .map(|t| t.chars().take(80).collect::<String>());
    let delay = ms(record.submitted, record.started.unwrap_or(now));
    let execution = record
        .started
        .map(|s| ms(s, record.finished.unwrap_or(now)));
    let (error_type, retry_after) = if record.state.is_final() {
        failure(record)
    } else {
        (None, None)
    };
    json!({
        "id": id,
        "task": task,
        "status": record.state.as_str(),
        "delay_ms": delay,
        "execution_ms": execution,
        "worker": record.last_worker,
        "retries": record.retries,
        "error_type": error_type,
        "retry_after": retry_after,
    })
}

async fn jobs(State(console): State<Arc<LocalConsole>>) -> Json<Value> {
    let now = Instant::now();
    let jobs = with_queue(&console, |queue| {
        let mut records: Vec<(&String, &JobRecord)> = queue.jobs.iter().collect();
        records.sort_by(|a, b| b.1.submitted.cmp(&a.1.submitted).then(a.0.cmp(b.0)));
        records
            .into_iter()
            .take(JOBS_LISTED)
            .map(|(id, record)| row(id, record, now))
            .collect::<Vec<_>>()
    });
    Json(json!({ "jobs": jobs }))
}

/// `value` as pretty JSON, cut to [`SHOWN_CHARS`]: the text, whether it was cut, and its
/// length in characters.
fn shown(value: Option<&Value>) -> (Option<String>, bool, usize) {
    let Some(value) = value else {
        return (None, false, 0);
    };
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let chars = text.chars().count();
    if chars <= SHOWN_CHARS {
        return (Some(text), false, chars);
    }
    (Some(text.chars().take(SHOWN_CHARS).collect()), true, chars)
}

async fn job(State(console): State<Arc<LocalConsole>>, Path(id): Path<String>) -> Response {
    let now = Instant::now();
    // Only copies are made under the queue's lock (the body's is shared); the parsing and
    // pretty-printing (seconds for a 10 MB output) happen after it is released, so the queue's
    // own routes never wait for them.
    let found = with_queue(&console, |queue| {
        let record = queue.jobs.get(&id)?;
        // A failed job's output is the error object; its `error` string says the same.
        let output = match (&record.output, &record.error) {
            (Some(output), _) => Some(output.get().to_owned()),
            (None, Some(error)) => Some(error.to_string()),
            (None, None) => None,
        };
        Some((row(&id, record, now), record.body.clone(), output))
    });
    // Off the async threads too: a large output takes a while to print.
    let detail = |(mut body, job, output): (Value, JobBody, Option<String>)| {
        let input = job.value().get_mut("input").map(Value::take);
        let output = output.and_then(|text| serde_json::from_str::<Value>(&text).ok());
        let (input, input_truncated, input_chars) = shown(input.as_ref());
        let (output, output_truncated, output_chars) = shown(output.as_ref());
        let extra = json!({
            "input": input,
            "input_truncated": input_truncated,
            "input_chars": input_chars,
            "output": output,
            "output_truncated": output_truncated,
            "output_chars": output_chars,
            "limit": SHOWN_CHARS,
        });
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        body
    };
    let found = match found {
        Some(parts) => tokio::task::spawn_blocking(move || detail(parts))
            .await
            .ok(),
        None => None,
    };
    match found {
        Some(body) => Json(body).into_response(),
        None => {
            let body = json!({ "error": "no such job (it may have passed its retention)" });
            (StatusCode::NOT_FOUND, Json(body)).into_response()
        }
    }
}

/// Each sample's input, by the task it names.
fn sample_inputs() -> Map<String, Value> {
    SAMPLES
        .iter()
        .filter_map(|text| {
            let input = serde_json::from_str::<Value>(text)
                .ok()?
                .get("input")?
                .clone();
            let task = input.get("task")?.as_str()?.to_owned();
            Some((task, input))
        })
        .collect()
}

async fn samples() -> Json<Value> {
    Json(Value::Object(sample_inputs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use mock_queue::MockOptions;
    use runpod_protocol::ApiKey;
    use tower::ServiceExt;

    fn console() -> LocalConsole {
        let options = MockOptions {
            api_key: Some(ApiKey::new("k")),
            ..MockOptions::default()
        };
        LocalConsole::new(
            Arc::new(MockState::new(options)),
            "local",
            "http://127.0.0.1:9",
        )
    }

    async fn get(app: &Router, path: &str, key: Option<&str>) -> (StatusCode, Value) {
        let mut request = axum::http::Request::get(path);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn the_page_is_public_and_its_data_needs_the_key() {
        let app = local_routes(console());
        let (status, _) = get(&app, "/", None).await;
        assert_eq!(status, StatusCode::OK);
        for path in [
            "/console/api/jobs",
            "/console/api/queue",
            "/console/api/samples",
        ] {
            assert_eq!(get(&app, path, None).await.0, StatusCode::UNAUTHORIZED);
            assert_eq!(
                get(&app, path, Some("no")).await.0,
                StatusCode::UNAUTHORIZED
            );
            assert_eq!(get(&app, path, Some("k")).await.0, StatusCode::OK, "{path}");
        }
        let (status, body) = get(&app, "/console/api/health", Some("k")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "no worker there: {body}");
    }

    #[tokio::test]
    async fn a_job_shows_its_input_and_output_cut_short_when_large() {
        let console = console();
        let mock = console.mock.clone();
        let big = "x".repeat(SHOWN_CHARS * 2);
        mock.with(|inner| {
            inner.push(
                "local",
                json!({"id": "a", "input": {"task": "echo", "text": big}}),
                Duration::from_secs(60),
            );
            let record = inner.endpoint("local").jobs.get_mut("a").unwrap();
            record.state = mock_queue::JobState::Failed;
            let error = json!({"error_type": "InsufficientGPUMemory", "retry_after": 4});
            record.output = Some(serde_json::value::to_raw_value(&error).unwrap());
        });
        let app = local_routes(console);
        let (_, list) = get(&app, "/console/api/jobs", Some("k")).await;
        let row = &list["jobs"][0];
        assert_eq!(row["task"], "echo");
        assert_eq!(row["error_type"], "InsufficientGPUMemory");
        assert_eq!(row["retry_after"], 4);
        assert!(row.get("input").is_none(), "the list carries no content");
        let (status, job) = get(&app, "/console/api/jobs/a", Some("k")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(job["input_truncated"], true);
        assert_eq!(job["input"].as_str().unwrap().chars().count(), SHOWN_CHARS);
        assert_eq!(job["output_truncated"], false);
        let (status, _) = get(&app, "/console/api/jobs/nope", Some("k")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn every_sample_is_a_job_input_naming_its_task() {
        let samples = sample_inputs();
        assert_eq!(samples.len(), SAMPLES.len(), "each file parses");
        assert_eq!(samples["classify"]["task"], "classify");
    }
}
