//! Running one admitted job on its handler, in two stages (prepare, then the model work), under
//! one cancel arm: the deadline, the queue's stop, the drain. Panics fail the job only.
//! Shared by the worker and `test-input`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::handlers::{HandlerEntry, JobContext, Prepared};
use crate::outcome::{ErrorType, JobError};

/// How a job's run ended.
#[derive(Debug)]
pub enum Execution {
    /// It ended with an output or an error result, to be posted.
    Finished(Result<Value, JobError>),
    /// It was stopped through the stop channel: nothing is posted.
    Cancelled,
}

/// Where a job's time limit comes from (for the `Timeout` message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    /// `[handler] execution_timeout`.
    Config,
    /// The job's `policy.executionTimeout`.
    Policy,
    /// The platform's default policy (the job set none).
    PlatformDefault,
}

/// The time a job may run, and the limit it comes from.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// Time left from now.
    pub left: Duration,
    /// The configured limit it derives from.
    pub limit: Duration,
    /// Which limit it is.
    pub source: LimitSource,
    /// What is left of the job's policy (or the platform's default one), which nothing
    /// extends: the queue gives up on the job then.
    pub policy_left: Duration,
    /// That policy's limit, and where it comes from.
    policy: (Duration, LimitSource),
}

impl Deadline {
    /// `execution_timeout` (from now) or what is left of the job's policy (counted by the
    /// queue from the take), whichever ends first. A job without a policy has the platform's
    /// default one (600 s): the queue times it out then anyway.
    pub fn of(execution_timeout: Duration, policy: Option<Duration>, since_take: Duration) -> Self {
        let (policy, source) = match policy {
            Some(policy) => (policy, LimitSource::Policy),
            None => (
                runpod_protocol::limits::EXECUTION_TIMEOUT,
                LimitSource::PlatformDefault,
            ),
        };
        let policy_left = policy.saturating_sub(since_take);
        if policy_left < execution_timeout {
            Self {
                left: policy_left,
                limit: policy,
                source,
                policy_left,
                policy: (policy, source),
            }
        } else {
            Self {
                left: execution_timeout,
                limit: execution_timeout,
                source: LimitSource::Config,
                policy_left,
                policy: (policy, source),
            }
        }
    }

    fn message(&self) -> String {
        let limit = format_duration(self.limit);
        match self.source {
            LimitSource::Policy => {
                format!("the job ran past its policy.executionTimeout of {limit}")
            }
            LimitSource::PlatformDefault => format!(
                "the job ran past the platform's default policy.executionTimeout of {limit}"
            ),
            LimitSource::Config => {
                format!("the job ran longer than its execution timeout of {limit}")
            }
        }
    }
}

/// The one cancel arm every stage of a job runs under: its deadline, the queue stopping it
/// (the stop channel), and the drain's grace running out. When one of them ends a stage, the
/// job's `ctx.cancel` is set, so work on other threads stops at its next safe point.
pub struct Bounds<'a> {
    deadline: Deadline,
    ends_at: tokio::time::Instant,
    policy_ends_at: tokio::time::Instant,
    stop: &'a CancellationToken,
    interrupt: &'a CancellationToken,
    job_cancel: CancellationToken,
}

impl<'a> Bounds<'a> {
    /// Bounds that end `deadline.left` from now; `job_cancel` is the job's `ctx.cancel`.
    pub fn new(
        deadline: Deadline,
        stop: &'a CancellationToken,
        interrupt: &'a CancellationToken,
        job_cancel: CancellationToken,
    ) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            ends_at: now + deadline.left,
            policy_ends_at: now + deadline.policy_left,
            deadline,
            stop,
            interrupt,
            job_cancel,
        }
    }

    /// Moves the deadline `waited` later (time the job spent waiting for GPU memory is local
    /// queue time, not its execution time), but never past its policy: the queue's own clock.
    pub fn extend(&mut self, waited: Duration) {
        let extended = self.ends_at + waited;
        if extended >= self.policy_ends_at {
            self.ends_at = self.policy_ends_at;
            (self.deadline.limit, self.deadline.source) = self.deadline.policy;
        } else {
            self.ends_at = extended;
        }
    }

    /// Runs `work` to its end, unless the job ends first:
    /// - `stop` abandons it: [`Execution::Cancelled`];
    /// - `interrupt` (the drain's grace period is over) ends it with `Interrupted`;
    /// - past the deadline it ends with `Timeout`.
    pub async fn within<T>(&self, work: impl Future<Output = T>) -> Result<T, Execution> {
        let ended = tokio::select! {
            value = work => return Ok(value),
            () = tokio::time::sleep_until(self.ends_at) => Execution::Finished(Err(JobError::new(
                ErrorType::Timeout,
                self.deadline.message(),
            ))),
            () = self.stop.cancelled() => Execution::Cancelled,
            () = self.interrupt.cancelled() => Execution::Finished(Err(JobError::new(
                ErrorType::Interrupted,
                "the worker was shut down before the job finished; submit it again",
            ))),
        };
        self.job_cancel.cancel();
        Err(ended)
    }
}

/// The prepare stage: `entry`'s handler checks the input and fetches and parses what the job
/// needs (CPU only; no GPU memory is held), within `bounds`. A panic fails this job only.
pub async fn prepare(
    entry: &HandlerEntry,
    ctx: &JobContext,
    bounds: &Bounds<'_>,
) -> Result<Prepared, Execution> {
    let handler = match &entry.handler {
        Ok(handler) => handler.clone(),
        Err(reason) => {
            return Err(Execution::Finished(Err(JobError::new(
                ErrorType::ModelError,
                reason.clone(),
            ))))
        }
    };
    match bounds.within(guarded(entry, handler.prepare(ctx))).await? {
        Ok(prepared) => Ok(prepared),
        Err(error) => Err(Execution::Finished(Err(error))),
    }
}

/// The execute stage: the model work of `entry`'s handler with what `prepare` made, within
/// `bounds`. A panic fails this job only. `ctx.cancel` is set when it ends, however it ends.
pub async fn run(
    entry: &HandlerEntry,
    ctx: JobContext,
    prepared: Prepared,
    bounds: &Bounds<'_>,
) -> Execution {
    let handler = match &entry.handler {
        Ok(handler) => handler.clone(),
        Err(reason) => {
            return Execution::Finished(Err(JobError::new(ErrorType::ModelError, reason.clone())))
        }
    };
    let job_cancel = ctx.cancel.clone();
    let outcome = match bounds
        .within(guarded(entry, handler.run(ctx, prepared)))
        .await
    {
        Ok(result) => Execution::Finished(result),
        Err(ended) => ended,
    };
    job_cancel.cancel();
    outcome
}

/// Both stages without GPU memory between them (`test-input`, benchmarks).
pub async fn execute(entry: &HandlerEntry, ctx: JobContext, bounds: &Bounds<'_>) -> Execution {
    match prepare(entry, &ctx, bounds).await {
        Ok(prepared) => run(entry, ctx, prepared, bounds).await,
        Err(ended) => ended,
    }
}

/// `work`, with a panic turned into this job's `Internal` error.
async fn guarded<T>(
    entry: &HandlerEntry,
    work: impl Future<Output = Result<T, JobError>>,
) -> Result<T, JobError> {
    match AssertUnwindSafe(work).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!("handler {} panicked: {what}", entry.name);
            Err(JobError::internal(format!(
                "the {} handler failed unexpectedly; the worker is still running",
                entry.name
            )))
        }
    }
}

fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_without_a_policy_ends_at_the_platforms_default_if_that_comes_first() {
        let secs = Duration::from_secs;
        let long = Deadline::of(secs(3600), None, Duration::ZERO);
        assert_eq!(
            (long.limit, long.source),
            (secs(600), LimitSource::PlatformDefault)
        );
        assert!(long.message().contains("platform's default"));
        let short = Deadline::of(secs(120), None, Duration::ZERO);
        assert_eq!(
            (short.limit, short.source),
            (secs(120), LimitSource::Config)
        );
        let policy = Deadline::of(secs(120), Some(secs(30)), secs(10));
        assert_eq!(
            (policy.left, policy.source),
            (secs(20), LimitSource::Policy)
        );
    }
}
