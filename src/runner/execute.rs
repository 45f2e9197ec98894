//! Running one admitted job on its handler: the deadline, cancellation, and panic isolation.
//! Shared by the worker and `test-input`.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::handlers::{HandlerEntry, JobContext};
use crate::outcome::{ErrorType, JobError};

/// How a job's run ended.
#[derive(Debug)]
pub enum Execution {
    /// It ended with an output or an error result, to be posted.
    Finished(Result<Value, JobError>),
    /// It was stopped through the stop channel: nothing is posted.
    Cancelled,
}

/// The platform's `policy.executionTimeout` for a job that sets none (its documented default).
pub const PLATFORM_EXECUTION_TIMEOUT: Duration = Duration::from_secs(600);

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
}

impl Deadline {
    /// `execution_timeout` (from now) or what is left of the job's policy (counted by the
    /// queue from the take), whichever ends first. A job without a policy has the platform's
    /// default one (600 s): the queue times it out then anyway.
    pub fn of(execution_timeout: Duration, policy: Option<Duration>, since_take: Duration) -> Self {
        let (policy, source) = match policy {
            Some(policy) => (policy, LimitSource::Policy),
            None => (PLATFORM_EXECUTION_TIMEOUT, LimitSource::PlatformDefault),
        };
        if policy.saturating_sub(since_take) < execution_timeout {
            Self {
                left: policy.saturating_sub(since_take),
                limit: policy,
                source,
            }
        } else {
            Self {
                left: execution_timeout,
                limit: execution_timeout,
                source: LimitSource::Config,
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

/// Runs `ctx` on `entry`'s handler within `deadline`.
///
/// - `stop` (the stop channel) abandons the job: [`Execution::Cancelled`].
/// - `interrupt` (the drain's grace period is over) ends it with `Interrupted`.
/// - Past `deadline` it ends with `Timeout`.
/// - A panic in the handler fails this job only, with `Internal`.
///
/// In each case the handler's `ctx.cancel` is set so that work on other threads stops at its
/// next safe point.
pub async fn execute(
    entry: &HandlerEntry,
    ctx: JobContext,
    deadline: Deadline,
    stop: &CancellationToken,
    interrupt: &CancellationToken,
) -> Execution {
    let handler = match &entry.handler {
        Ok(handler) => handler.clone(),
        Err(reason) => {
            return Execution::Finished(Err(JobError::new(ErrorType::ModelError, reason.clone())))
        }
    };
    let job_cancel = ctx.cancel.clone();
    let run = AssertUnwindSafe(handler.run(ctx)).catch_unwind();
    let outcome = tokio::select! {
        result = run => match result {
            Ok(result) => Execution::Finished(result),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!("handler {} panicked: {what}", entry.name);
                Execution::Finished(Err(JobError::internal(format!(
                    "the {} handler failed unexpectedly; the worker is still running",
                    entry.name
                ))))
            }
        },
        () = tokio::time::sleep(deadline.left) => Execution::Finished(Err(JobError::new(
            ErrorType::Timeout,
            deadline.message(),
        ))),
        () = stop.cancelled() => Execution::Cancelled,
        () = interrupt.cancelled() => Execution::Finished(Err(JobError::new(
            ErrorType::Interrupted,
            "the worker was shut down before the job finished; submit it again",
        ))),
    };
    job_cancel.cancel();
    outcome
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
