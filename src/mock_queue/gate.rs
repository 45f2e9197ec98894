//! The checks every route passes first: the request is counted, the API key checked (raw or
//! `Bearer`), the endpoint id checked where only some exist, and an injected fault applied.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::replies::error;
use super::state::{MockState, Route};

/// The gate as a middleware: refuses, or passes the request on.
pub(super) async fn check(
    State((state, route)): State<(Arc<MockState>, Route)>,
    request: Request,
    next: Next,
) -> Response {
    match gate(&state, route, request.headers(), request.uri().path()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused,
    }
}

/// Counts the request, checks the key and the endpoint id, and applies an injected fault.
fn gate(state: &MockState, route: Route, headers: &HeaderMap, path: &str) -> Result<(), Response> {
    let fault = state.with(|inner| {
        *inner.requests.entry(route).or_default() += 1;
        let times = inner.request_times.entry(route).or_default();
        if times.len() < super::state::REQUEST_TIMES_KEPT {
            times.push(std::time::Instant::now());
        }
        inner.faults.get(&route).copied()
    });
    if let Some(key) = &state.options.api_key {
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
    if let Some(served) = &state.options.endpoint_ids {
        check_endpoint(served, path)?;
    }
    if let Some(fault) = fault {
        if rand::random::<f64>() < fault.rate {
            // Status 200 injects a garbage body with the wrong content type.
            if fault.status == 200 {
                let html = [(axum::http::header::CONTENT_TYPE, "text/html")];
                return Err((html, "<html>upstream error</html>").into_response());
            }
            let status =
                StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Err(error(status, "injected fault"));
        }
    }
    Ok(())
}

/// A 404 unless the endpoint id in `path` (`/v2/{endpoint}/...`) is one of `served`: a job
/// sent to an endpoint no worker serves would wait forever.
fn check_endpoint(served: &[String], path: &str) -> Result<(), Response> {
    let endpoint = endpoint_of(path);
    if served.iter().any(|id| *id == endpoint) {
        return Ok(());
    }
    let routes: Vec<String> = served.iter().map(|id| format!("/v2/{id}")).collect();
    Err(error(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {endpoint:?} here: this queue serves {}",
            routes.join(", ")
        ),
    ))
}

/// The endpoint id in `path` (`/v2/{endpoint}/...`), percent-decoded as the routes' `Path`
/// extractor decodes it, so the gate and the rate limit see the id the route serves.
pub(super) fn endpoint_of(path: &str) -> Cow<'_, str> {
    let raw = path
        .strip_prefix("/v2/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    percent_encoding::percent_decode_str(raw).decode_utf8_lossy()
}
