//! The platform's limits, written once: the worker enforces them on its side and the mock
//! queue on the queue's, so the two cannot drift apart.

use std::time::Duration;

/// A job's execution limit when its `policy.executionTimeout` sets none: the queue times the
/// job out after this.
pub const EXECUTION_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a job may wait in the queue when its `policy.ttl` sets nothing.
pub const JOB_TTL: Duration = Duration::from_secs(24 * 3600);

/// The largest `/run` body the queue accepts.
pub const MAX_RUN_BODY: usize = 10 * 1_000_000;

/// The largest `/runsync` body the queue accepts.
pub const MAX_RUNSYNC_BODY: usize = 20 * 1_000_000;

/// The largest result (`/job-done` body) the queue accepts.
pub const MAX_RESULT_BODY: usize = 20 * 1_000_000;

/// The largest `/job-stream` body the queue accepts.
pub const MAX_STREAM_CHUNK: usize = 1_000_000;

/// The largest request body a load-balancing endpoint's worker accepts.
pub const MAX_LOAD_BALANCER_BODY: usize = 30 * 1_000_000;

/// How long the platform's load balancer waits for a worker's answer: a request's deadline
/// when its `policy.executionTimeout` sets a shorter one.
pub const LOAD_BALANCER_REQUEST_TIMEOUT: Duration = Duration::from_millis(330_000);
