//! The console: one page (HTML, CSS and JavaScript embedded in the binary, nothing fetched from
//! elsewhere) that shows the GPU memory, the handlers, the queue and the recent jobs live, from
//! JSON it polls every second.
//!
//! It is served in two places, from the same files:
//! - the worker's own port, beside `/health` ([`worker_routes`]): read-only and without a key,
//!   as `/health` is (the image binds it to 0.0.0.0), so it shows ids, states, timings and
//!   error types, never a job's input or output;
//! - the local endpoint ([`local_routes`]): the page is public, its data routes need the
//!   endpoint's API key (sent by the page in the `Authorization` header, never in a URL), and
//!   it adds the queue, each job's input and output, and a submit form.
//!
//! Its routes are `/` and `/console/...`, never one of the platform's paths.

pub mod history;
mod local;

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use history::History;
pub use local::{local_routes, LocalConsole};

use worker::observed::WorkerSlot;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

/// Which console a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The worker's port: read-only, no job content.
    Worker,
    /// The local endpoint: the queue, job content, submissions (with the key).
    Local,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Local => "local",
        }
    }
}

/// Scripts and styles only from this origin (no inline script, so data that slipped into the
/// page could not run), fetches only to it, never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page for `mode`.
pub fn page(mode: Mode) -> Response {
    let html = PAGE.replace("{{MODE}}", mode.as_str());
    asset("text/html; charset=utf-8", html)
}

fn asset(content_type: &'static str, body: impl IntoResponse) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// The page's script and style, for either mode.
fn assets<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/console/page.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/console/page.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// `?since=` of the history route: samples after this (ms since the epoch).
#[derive(Debug, Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

/// The console on the worker's port, with its history sampled until `stop`: what `serve` and
/// `local` pass the worker as the pages beside `/health` (`worker::runner::PortPages`).
pub fn worker_console(slot: WorkerSlot, stop: CancellationToken) -> Router {
    let history = Arc::new(History::default());
    tokio::spawn(history::sample(slot.clone(), history.clone(), stop));
    worker_routes(slot, history)
}

/// The console on the worker's port: `/`, its assets, `/console/api/history` and
/// `/console/api/jobs` (ids, states, timings and error types only).
pub fn worker_routes(slot: WorkerSlot, history: Arc<History>) -> Router {
    Router::new()
        .route("/", get(|| async { page(Mode::Worker) }))
        .route("/console/api/history", get(worker_history))
        .route("/console/api/jobs", get(worker_jobs))
        .with_state((slot, history))
        .merge(assets())
}

async fn worker_history(
    State((_, history)): State<(WorkerSlot, Arc<History>)>,
    since: Result<Query<Since>, QueryRejection>,
) -> Response {
    match since_of(since) {
        Ok(since) => Json(json!({ "samples": history.since(since) })).into_response(),
        Err(refused) => refused.into_response(),
    }
}

/// A `?since=` that is not a number of milliseconds: answered with a JSON 400 that names it
/// (axum's own refusal is plain text).
struct BadSince(String);

impl IntoResponse for BadSince {
    fn into_response(self) -> Response {
        let message = format!(
            "since must be milliseconds since the Unix epoch ({})",
            self.0
        );
        (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
    }
}

/// `?since=` as read, or why it cannot be.
fn since_of(query: Result<Query<Since>, QueryRejection>) -> Result<u64, BadSince> {
    query
        .map(|Query(since)| since.since)
        .map_err(|e| BadSince(e.body_text()))
}

async fn worker_jobs(State((slot, _)): State<(WorkerSlot, Arc<History>)>) -> Response {
    let jobs = slot.get().map(|w| w.recent.view()).unwrap_or_default();
    Json(json!({ "jobs": jobs })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    async fn get_text(app: Router, path: &str) -> (StatusCode, String, Option<String>) {
        let response = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let csp = response
            .headers()
            .get(header::CONTENT_SECURITY_POLICY)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap(), csp)
    }

    #[tokio::test]
    async fn the_worker_console_is_read_only_and_self_contained() {
        let app = worker_routes(WorkerSlot::default(), Arc::new(History::default()));
        let (status, html, csp) = get_text(app.clone(), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(html.contains(r#"data-mode="worker""#), "{html}");
        assert!(csp.unwrap().contains("script-src 'self'"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no external assets"
        );
        let (_, script, _) = get_text(app.clone(), "/console/page.js").await;
        assert!(!script.contains("innerHTML"), "data is set as text only");
        assert!(
            !script.contains("https://"),
            "nothing fetched from elsewhere"
        );
        let (status, jobs, _) = get_text(app.clone(), "/console/api/jobs").await;
        assert_eq!((status, jobs.as_str()), (StatusCode::OK, r#"{"jobs":[]}"#));
        // The worker's console has no route to a job's content, and no samples.
        for path in ["/console/api/jobs/some-id", "/console/api/samples"] {
            let (status, _, _) = get_text(app.clone(), path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
    }
}
