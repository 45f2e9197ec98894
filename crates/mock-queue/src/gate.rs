//! The checks every route passes first: the request is counted, the API key checked (raw or
//! `Bearer`), the endpoint id checked where only some exist, and an injected fault applied;
//! then, on the client routes that have one, the platform's rate limit ([`check_rate`]).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::rate_limit::{retry_after_secs, LimitedRoute, RateLimits};
use super::replies::error;
use super::state::{MockState, Route};

/// The gate as a middleware: refuses, or passes the request on.
pub(super) async fn check(
    State((state, route)): State<(Arc<MockState>, Route)>,
    request: Request,
    next: Next,
) -> Response {
    match gate(&state, route, request.headers(), request.uri().path()) {
        Ok(()) => {
            let (delay, answer_delay) = state.begin_flight(route);
            let _flight = InFlight(&state, route);
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let answer = next.run(request).await;
            if let Some(delay) = answer_delay {
                tokio::time::sleep(delay).await;
            }
            answer
        }
        Err(refused) => refused,
    }
}

/// A request being answered; counted until answered or dropped.
struct InFlight<'a>(&'a MockState, Route);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.end_flight(self.1);
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

/// The limit as a middleware on one route: passes the request on, or answers 429. Without
/// limits (the default) every request passes.
pub(super) async fn check_rate(
    State((state, route)): State<(Arc<MockState>, LimitedRoute)>,
    request: Request,
    next: Next,
) -> Response {
    let Some(limiter) = state.rate_limiter() else {
        return next.run(request).await;
    };
    let endpoint = endpoint_of(request.uri().path());
    match limiter.admit(&endpoint, route, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => too_many(limiter.limits(), route, &endpoint, wait),
    }
}

/// The 429: what the limit is, and `Retry-After` in whole seconds (rounded up, at least 1).
fn too_many(limits: &RateLimits, route: LimitedRoute, endpoint: &str, wait: Duration) -> Response {
    let secs = retry_after_secs(wait);
    let message = format!(
        "rate limit exceeded: {} allows {} requests per {} s on endpoint {endpoint:?}; \
         retry after {secs} s",
        route.path(),
        limits.limit(route),
        limits.window.as_secs_f64(),
    );
    let mut response = error(StatusCode::TOO_MANY_REQUESTS, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response.into_response()
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
