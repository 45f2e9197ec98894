//! One job as the mock queue keeps it: where it is in its life, who holds it and until when,
//! and what `/status` says of it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::body::JobBody;

/// Where a job is in its life (docs/runpod-protocol.md §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting to be taken.
    InQueue,
    /// Held by a worker.
    InProgress,
    /// Ended with an output.
    Completed,
    /// Ended with an error.
    Failed,
    /// Cancelled by the client.
    Cancelled,
    /// Ran past `policy.executionTimeout` (plus grace).
    TimedOut,
}

impl JobState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InQueue => "IN_QUEUE",
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::TimedOut => "TIMED_OUT",
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::InQueue | Self::InProgress)
    }
}

/// One job and everything known about it. What it carries (its body, its output, its
/// chunks) is kept as JSON text ([`super::body`]).
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// The job object handed to workers (`id`, `input`, `webhook`, `policy`, ...).
    pub body: JobBody,
    /// Where it is.
    pub state: JobState,
    /// The worker holding it.
    pub holder: Option<String>,
    /// The last worker that held it (`workerId` in `/status`).
    pub last_worker: Option<String>,
    /// The worker whose lease on it ran out, while no one has taken it since (nor `/retry`
    /// sent it again): that worker's result is still the job's answer.
    pub lease_lost_by: Option<String>,
    /// When the holder's lease runs out unless a ping renews it.
    pub lease_until: Option<Instant>,
    /// The output, or the latest progress update.
    pub output: Option<Box<RawValue>>,
    /// The error string of a FAILED job.
    pub error: Option<Value>,
    /// Stream chunks not yet read through `/stream`.
    pub stream: VecDeque<Box<RawValue>>,
    /// When it was submitted.
    pub submitted: Instant,
    /// When a worker last took it.
    pub started: Option<Instant>,
    /// When it ended.
    pub finished: Option<Instant>,
    /// `policy.executionTimeout`, or the platform's default.
    pub execution_timeout: Duration,
    /// `policy.ttl`, or the platform's default.
    pub ttl: Duration,
    /// How long it is kept once it has ended.
    pub retention: Duration,
    /// Where to POST the final `/status` body.
    pub webhook: Option<String>,
    /// Times it went back to the queue after a lease expired.
    pub retries: u32,
    /// When its entry in the ticker's index is due ([`JobRecord::next_deadline`] when it
    /// was last set); `None`: it has none.
    pub(crate) scheduled: Option<Instant>,
}

impl JobRecord {
    /// A record for a job object, with its policy (the platform's defaults where it has
    /// none; submissions are validated before this) and webhook, kept for `retention` once
    /// it ends.
    pub fn new(body: JobBody, retention: Duration) -> Self {
        Self {
            execution_timeout: body
                .execution_timeout()
                .unwrap_or(runpod_protocol::limits::EXECUTION_TIMEOUT),
            ttl: body.ttl().unwrap_or(runpod_protocol::limits::JOB_TTL),
            retention,
            webhook: body.webhook().map(str::to_owned),
            body,
            state: JobState::InQueue,
            holder: None,
            last_worker: None,
            lease_lost_by: None,
            lease_until: None,
            output: None,
            error: None,
            stream: VecDeque::new(),
            submitted: Instant::now(),
            started: None,
            finished: None,
            retries: 0,
            scheduled: None,
        }
    }

    /// The first moment one of its deadlines passes: its ttl; once it has ended, the end of
    /// its retention; while held, its lease and its execution timeout plus `timeout_grace`.
    /// `None`: never (a deadline past what `Instant` can hold).
    pub fn next_deadline(&self, timeout_grace: Duration) -> Option<Instant> {
        let ttl = self.submitted.checked_add(self.ttl);
        let other = match self.state {
            JobState::InQueue => None,
            JobState::InProgress => {
                let started = self.started.unwrap_or(self.submitted);
                let timeout = self
                    .execution_timeout
                    .checked_add(timeout_grace)
                    .and_then(|limit| started.checked_add(limit));
                earliest(self.lease_until, timeout)
            }
            _ => self
                .finished
                .and_then(|finished| finished.checked_add(self.retention)),
        };
        earliest(ttl, other)
    }

    /// Whether it ended more than its retention ago (then it is deleted).
    pub fn retention_over(&self, now: Instant) -> bool {
        self.state.is_final()
            && self
                .finished
                .is_some_and(|finished| now.saturating_duration_since(finished) >= self.retention)
    }

    /// The `/status` body, as JSON text (the output as it is kept, not copied into a tree).
    pub fn status_body(&self, id: &str) -> String {
        let ms = |d: Duration| d.as_millis() as u64;
        let delay_time = self
            .started
            .map(|started| ms(started.duration_since(self.submitted)));
        let execution_time = self
            .started
            .zip(self.finished)
            .map(|(started, finished)| ms(finished.duration_since(started)));
        let body = StatusBody {
            delay_time,
            error: self.error.as_ref(),
            execution_time,
            id,
            output: self.output.as_deref(),
            retries: self.retries,
            status: self.state.as_str(),
            worker_id: self.last_worker.as_deref(),
        };
        serde_json::to_string(&body).expect("a status body always serializes")
    }

    /// The bytes its body, output, error and unread chunks take.
    pub fn stored_bytes(&self) -> usize {
        self.body.stored_bytes()
            + self.output.as_ref().map_or(0, |output| output.get().len())
            + self
                .error
                .as_ref()
                .map_or(0, |error| error.to_string().len())
            + self
                .stream
                .iter()
                .map(|chunk| chunk.get().len())
                .sum::<usize>()
    }
}

/// `/status`'s fields, in the order the mock has always written them.
#[derive(Serialize)]
struct StatusBody<'a> {
    #[serde(rename = "delayTime", skip_serializing_if = "Option::is_none")]
    delay_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a Value>,
    #[serde(rename = "executionTime", skip_serializing_if = "Option::is_none")]
    execution_time: Option<u64>,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "is_zero")]
    retries: u32,
    status: &'static str,
    #[serde(rename = "workerId", skip_serializing_if = "Option::is_none")]
    worker_id: Option<&'a str>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The earlier of two moments, either of which may be absent.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
