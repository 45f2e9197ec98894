//! The checks every route passes first: the request is counted, the API key checked (raw or
//! `Bearer`), and an injected fault applied.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::state::{MockState, Route};
use super::worker_api::error;

/// The gate as a middleware: refuses, or passes the request on.
pub(super) async fn check(
    State((state, route)): State<(Arc<MockState>, Route)>,
    request: Request,
    next: Next,
) -> Response {
    match gate(&state, route, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused,
    }
}

/// Counts the request, checks the key, and applies an injected fault.
fn gate(state: &MockState, route: Route, headers: &HeaderMap) -> Result<(), Response> {
    let fault = state.with(|inner| {
        *inner.requests.entry(route).or_default() += 1;
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
