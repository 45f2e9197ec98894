//! One job as the mock queue keeps it: where it is in its life, who holds it and until when,
//! and what `/status` says of it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

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

/// One job and everything known about it.
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// The job object handed to workers (`id`, `input`, `webhook`, `policy`, ...).
    pub raw: Value,
    /// Where it is.
    pub state: JobState,
    /// The worker holding it.
    pub holder: Option<String>,
    /// The last worker that held it (`workerId` in `/status`).
    pub last_worker: Option<String>,
    /// When the holder's lease runs out unless a ping renews it.
    pub lease_until: Option<Instant>,
    /// The output, or the latest progress update.
    pub output: Option<Value>,
    /// The error string of a FAILED job.
    pub error: Option<Value>,
    /// Stream chunks not yet read through `/stream`.
    pub stream: VecDeque<Value>,
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
    /// A record for a job object, reading its policy (the platform's defaults where it has
    /// none; submissions are validated before this) and webhook, kept for `retention` once
    /// it ends.
    pub fn new(raw: Value, retention: Duration) -> Self {
        let policy_ms = |key: &str| {
            raw.get("policy")
                .and_then(|p| p.get(key))
                .and_then(Value::as_u64)
                .map(Duration::from_millis)
        };
        Self {
            execution_timeout: policy_ms("executionTimeout")
                .unwrap_or(runpod_protocol::limits::EXECUTION_TIMEOUT),
            ttl: policy_ms("ttl").unwrap_or(runpod_protocol::limits::JOB_TTL),
            retention,
            webhook: raw
                .get("webhook")
                .and_then(Value::as_str)
                .map(str::to_owned),
            raw,
            state: JobState::InQueue,
            holder: None,
            last_worker: None,
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

    /// The `/status` body.
    pub fn status_body(&self, id: &str) -> Value {
        let ms = |d: Duration| d.as_millis() as u64;
        let mut body = json!({ "id": id, "status": self.state.as_str() });
        if let Some(started) = self.started {
            body["delayTime"] = json!(ms(started.duration_since(self.submitted)));
            if let Some(finished) = self.finished {
                body["executionTime"] = json!(ms(finished.duration_since(started)));
            }
        }
        if let Some(output) = &self.output {
            body["output"] = output.clone();
        }
        if let Some(error) = &self.error {
            body["error"] = error.clone();
        }
        if let Some(worker) = &self.last_worker {
            body["workerId"] = json!(worker);
        }
        if self.retries > 0 {
            body["retries"] = json!(self.retries);
        }
        body
    }
}

/// The earlier of two moments, either of which may be absent.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
