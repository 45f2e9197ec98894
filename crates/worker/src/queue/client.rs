//! `QueueClient`: the worker's HTTP calls to the job API (take, stop, ping, done, stream).
//!
//! Reads are one-shot and report what went wrong; the loops that call them own the pacing.
//! Result POSTs retry by themselves (5xx, 429, timeouts, refused connections) within
//! `[queue].delivery_retry_s`, because a result given up on is a job lost.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::StatusCode;
use serde_json::value::RawValue;
use serde_json::Value;

use super::backoff::Backoff;
use crate::config::QueueConfig;
use runpod_protocol::job::{parse_take_body, BadJob, Job, JobLimits};
use runpod_protocol::QueueEndpoints;

/// The version sent as `runpod_version` and in `User-Agent`.
pub const WORKER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A failed call to the queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// 429: slow down.
    #[error("the queue asked us to slow down (429)")]
    RateLimited,
    /// Any other unexpected status.
    #[error("the queue answered {0}")]
    Status(u16),
    /// No answer: refused, reset, timed out.
    #[error("the queue could not be reached: {0}")]
    Transport(String),
    /// An answer that is not what the protocol says.
    #[error("{0}")]
    Body(String),
}

/// Why a result could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// 404: the queue no longer knows the job (expired, or requeued to another worker).
    #[error("the queue no longer knows job {0} (404): it expired or was handed to another worker")]
    Gone(String),
    /// Another 4xx: retrying the same body cannot help.
    #[error("the queue refused the result with {status}: {reason}")]
    Rejected {
        /// The status.
        status: u16,
        /// What the queue said, cut short.
        reason: String,
    },
    /// Retried for `[queue].delivery_retry_s` without success.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The stream URL is not configured.
    #[error("RUNPOD_WEBHOOK_POST_STREAM is not set; stream chunks cannot be delivered")]
    NoStreamUrl,
}

/// How long a take's body may go on arriving once the worker is shutting down.
const TAKE_BODY_GRACE: Duration = Duration::from_secs(3);

/// What one take brought.
#[derive(Debug)]
pub struct TakeResponse {
    /// The jobs, each valid or not.
    pub jobs: Vec<Result<Job, BadJob>>,
    /// How long the queue held the request (a long-poll holds it; a quick empty answer does not).
    pub held: Duration,
}

/// HTTP client for one worker's queue URLs.
#[derive(Debug, Clone)]
pub struct QueueClient {
    http: reqwest::Client,
    endpoints: QueueEndpoints,
    config: QueueConfig,
    job_limits: JobLimits,
}

impl QueueClient {
    /// A client for `endpoints`, paced by `config`.
    pub fn new(endpoints: QueueEndpoints, config: QueueConfig) -> Result<Self, QueueError> {
        let mut headers = HeaderMap::new();
        if !endpoints.api_key.is_empty() {
            let mut value = HeaderValue::from_str(endpoints.api_key.expose()).map_err(|_| {
                QueueError::Body(
                    "RUNPOD_AI_API_KEY holds characters not allowed in a header".into(),
                )
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(format!("runpod-worker/{WORKER_VERSION}"))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| QueueError::Transport(e.to_string()))?;
        let job_limits = JobLimits {
            max_bytes: usize::try_from(config.max_job_size.bytes()).unwrap_or(usize::MAX),
            ..JobLimits::default()
        };
        Ok(Self {
            http,
            endpoints,
            config,
            job_limits,
        })
    }

    /// The URLs in use.
    pub fn endpoints(&self) -> &QueueEndpoints {
        &self.endpoints
    }

    /// Takes up to `max` jobs: a single take for 1, a batch take above.
    ///
    /// `cancel` abandons the request while the queue is still holding it (`Ok(None)`), after
    /// `take_answer_grace_ms` more: the queue may have taken the jobs for us already and be
    /// sending them (a large answer takes a while to build). Once the answer has started to
    /// arrive it is read to the end: dropping those jobs would leave them to the lease timeout.
    pub async fn take(
        &self,
        max: usize,
        job_in_progress: bool,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<TakeResponse>, QueueError> {
        let url = match max {
            0 | 1 => self.endpoints.take_url(job_in_progress),
            n => self.endpoints.take_batch_url(n, job_in_progress),
        };
        let started = Instant::now();
        let request = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(self.config.long_poll_timeout_s))
            .send();
        tokio::pin!(request);
        let response = tokio::select! {
            response = &mut request => response,
            () = cancel.cancelled() => {
                let grace = Duration::from_millis(self.config.take_answer_grace_ms);
                match tokio::time::timeout(grace, &mut request).await {
                    Ok(response) => response,
                    // No answer begun: the queue still holds the request, with no job for us.
                    Err(_) => return Ok(None),
                }
            }
        }
        .map_err(transport)?;
        let status = response.status();
        let jobs = match status {
            // 400 is what the platform sends with FlashBoot when there is no job (SDK).
            StatusCode::NO_CONTENT | StatusCode::BAD_REQUEST => Vec::new(),
            StatusCode::TOO_MANY_REQUESTS => return Err(QueueError::RateLimited),
            s if s.is_success() => {
                // An answer that has started is read to its end (its jobs are ours now), but a
                // body that stalls must not hold up a shutdown: a few seconds, then it is left
                // (the queue hands its jobs out again when their leases run out).
                let stalled_at_shutdown = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(TAKE_BODY_GRACE).await;
                };
                let body = tokio::select! {
                    body = response.bytes() => body.map_err(transport)?,
                    () = stalled_at_shutdown => return Err(QueueError::Body(
                        "a job-take answer stalled in its body during shutdown; left unread".to_owned(),
                    )),
                };
                parse_take_body(&body, self.job_limits).map_err(QueueError::Body)?
            }
            s => return Err(QueueError::Status(s.as_u16())),
        };
        Ok(Some(TakeResponse {
            jobs,
            held: started.elapsed(),
        }))
    }

    /// Long-polls the stop channel: the ids of jobs to abandon. Empty when the channel is off.
    pub async fn poll_stop(&self) -> Result<Vec<String>, QueueError> {
        let Some(url) = self.endpoints.stop_url() else {
            return Ok(Vec::new());
        };
        let response = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(self.config.long_poll_timeout_s))
            .send()
            .await
            .map_err(transport)?;
        match response.status() {
            StatusCode::NO_CONTENT => Ok(Vec::new()),
            StatusCode::TOO_MANY_REQUESTS => Err(QueueError::RateLimited),
            s if s.is_success() => {
                let body: Value = response.json().await.map_err(|e| {
                    QueueError::Body(format!(
                        "job-stop answered with a body that is not JSON ({e})"
                    ))
                })?;
                Ok(body
                    .get("jobsToStop")
                    .and_then(Value::as_array)
                    .map(|ids| {
                        ids.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default())
            }
            s => Err(QueueError::Status(s.as_u16())),
        }
    }

    /// The heartbeat: liveness plus the ids of the jobs this worker holds.
    pub async fn ping(&self, job_ids: &[String]) -> Result<(), QueueError> {
        let Some(url) = &self.endpoints.ping else {
            return Ok(());
        };
        let mut query: Vec<(&str, String)> = Vec::new();
        if !job_ids.is_empty() {
            query.push(("job_id", job_ids.join(",")));
        }
        query.push(("runpod_version", WORKER_VERSION.to_owned()));
        let response = self
            .http
            .get(url)
            .query(&query)
            .timeout(self.endpoints.ping_interval.max(Duration::from_millis(500)) * 2)
            .send()
            .await
            .map_err(transport)?;
        status_ok(response.status())
    }

    /// The SDK's start-up failure report: `status=unhealthy&check=..&reason=..`.
    pub async fn report_unhealthy(&self, check: &str, reason: &str) -> Result<(), QueueError> {
        let Some(url) = &self.endpoints.ping else {
            return Ok(());
        };
        let reason: String = reason.chars().take(256).collect();
        let response = self
            .http
            .get(url)
            .query(&[
                ("status", "unhealthy"),
                ("check", check),
                ("reason", &reason),
                ("runpod_version", WORKER_VERSION),
            ])
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(transport)?;
        status_ok(response.status())
    }

    /// POSTs a job's final body to job-done.
    pub async fn post_done(
        &self,
        job_id: &str,
        body: &RawValue,
        is_stream: bool,
    ) -> Result<(), DeliveryError> {
        let url = self.endpoints.done_url(job_id, is_stream);
        self.deliver(&url, job_id, body.get().as_bytes()).await
    }

    /// POSTs `body` to `url` with the result-delivery retries (re-sending spooled results).
    pub async fn deliver_to(
        &self,
        url: &str,
        job_id: &str,
        body: &RawValue,
    ) -> Result<(), DeliveryError> {
        self.deliver(url, job_id, body.get().as_bytes()).await
    }

    /// POSTs a progress update (`{"status": "IN_PROGRESS", "output": update}`) to job-done,
    /// as the SDK's `progress_update` does. One attempt, briefly: the job waits for it, and the
    /// next update says more anyway.
    pub async fn post_progress(&self, job_id: &str, update: &Value) -> Result<(), QueueError> {
        let url = self.endpoints.done_url(job_id, false);
        let body = serde_json::json!({ "status": "IN_PROGRESS", "output": update });
        let response = self
            .http
            .post(&url)
            .headers(sdk_result_headers(job_id))
            .body(body.to_string())
            .timeout(PROGRESS_TIMEOUT)
            .send()
            .await
            .map_err(transport)?;
        status_ok(response.status())
    }

    /// POSTs one stream chunk (`{"output": chunk}`) to job-stream.
    pub async fn post_stream(&self, job_id: &str, chunk: &Value) -> Result<(), DeliveryError> {
        let url = self
            .endpoints
            .stream_url(job_id)
            .ok_or(DeliveryError::NoStreamUrl)?;
        let body = serde_json::to_vec(&serde_json::json!({ "output": chunk }))
            .unwrap_or_else(|_| b"{}".to_vec());
        self.deliver(&url, job_id, &body).await
    }

    async fn deliver(&self, url: &str, job_id: &str, body: &[u8]) -> Result<(), DeliveryError> {
        let deadline = Instant::now() + Duration::from_secs(self.config.delivery_retry_s);
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.backoff_initial_ms),
            Duration::from_millis(self.config.backoff_max_ms),
        );
        // Shared by every attempt without a copy.
        let payload = bytes::Bytes::copy_from_slice(body);
        // The SDK's headers (rp_http.py): the platform is built for them. The job id rides on
        // the result only, never on takes (the SDK's header leaks onto later takes).
        let headers = sdk_result_headers(job_id);
        loop {
            let attempt = self
                .http
                .post(url)
                .headers(headers.clone())
                .body(payload.clone())
                .timeout(Duration::from_secs(60))
                .send()
                .await;
            let last = match attempt {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                    return Err(DeliveryError::Gone(job_id.to_owned()))
                }
                // 408 and 429 say "not now", not "never".
                Ok(r)
                    if r.status().is_client_error()
                        && r.status() != StatusCode::TOO_MANY_REQUESTS
                        && r.status() != StatusCode::REQUEST_TIMEOUT =>
                {
                    let status = r.status().as_u16();
                    return Err(DeliveryError::Rejected {
                        status,
                        reason: refusal_reason(r).await,
                    });
                }
                Ok(r) => format!("the queue answered {}", r.status().as_u16()),
                Err(e) => transport(e).to_string(),
            };
            let delay = backoff.next_delay();
            if Instant::now() + delay > deadline {
                return Err(DeliveryError::Exhausted {
                    attempts: backoff.failures(),
                    last,
                });
            }
            tracing::warn!(
                job_id,
                "result delivery failed ({last}); retrying in {delay:?}"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

/// How long one progress update may take.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);

/// What the official SDK labels its (JSON) result bodies with.
const SDK_RESULT_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

/// The header that carries a result's job id.
const REQUEST_ID: &str = "X-Request-ID";

/// The SDK's headers on a result POST. An id that cannot be a header value (the worker
/// still answers ids with control characters, by their URL) goes without `X-Request-ID`.
fn sdk_result_headers(job_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        reqwest::header::CONTENT_TYPE,
        HeaderValue::from_static(SDK_RESULT_CONTENT_TYPE),
    );
    headers.insert("charset", HeaderValue::from_static("utf-8"));
    if let Ok(id) = HeaderValue::from_str(job_id) {
        headers.insert(REQUEST_ID, id);
    }
    headers
}

/// How much of a refusal's body is kept for the log and the replacement result.
const REFUSAL_REASON_CHARS: usize = 200;

/// The first characters of a refusal's body (the platform says why there), on one line.
async fn refusal_reason(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    let reason: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(REFUSAL_REASON_CHARS)
        .collect();
    if reason.trim().is_empty() {
        "no reason given".to_owned()
    } else {
        reason
    }
}

fn status_ok(status: StatusCode) -> Result<(), QueueError> {
    match status {
        s if s.is_success() => Ok(()),
        StatusCode::TOO_MANY_REQUESTS => Err(QueueError::RateLimited),
        s => Err(QueueError::Status(s.as_u16())),
    }
}

fn transport(error: reqwest::Error) -> QueueError {
    // reqwest's message names the URL (never the headers), and a queue URL may carry a token
    // in its query: it is left out (the log formatter redacts any URL that gets through).
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    QueueError::Transport(format!("{kind}: {}", error.without_url()))
}
