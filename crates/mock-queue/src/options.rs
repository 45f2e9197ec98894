//! How a mock queue behaves: its options and their defaults (the platform's where it has them).

use std::time::Duration;

use runpod_protocol::ApiKey;

use super::rate_limit::RateLimits;

/// How long `/stream` is held by default: under the Python client's 10 s request timeout.
pub(super) const STREAM_HOLD: Duration = Duration::from_secs(5);

/// The jobs an endpoint keeps at most by default: many more than a long `local` session or a
/// test makes, few enough that `/health`, which counts them, answers in milliseconds.
pub const MAX_JOBS: usize = 100_000;

/// How a mock queue behaves.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Required on every request when set (raw or `Bearer`).
    pub api_key: Option<ApiKey>,
    /// How long empty takes and stops are held.
    pub long_poll: Duration,
    /// A held job whose id no ping has listed for this long goes back to the queue.
    pub lease_timeout: Duration,
    /// `/run` answers 429 while this many jobs are queued.
    pub max_queued: Option<usize>,
    /// `/run`, `/runsync` and the OpenAI route answer 429 while an endpoint keeps this many
    /// jobs (queued, running, and finished ones within their retention): what a mock holds,
    /// and what `/health` and the console count, stay bounded whatever is submitted.
    pub max_jobs: Option<usize>,
    /// Extra time after `policy.executionTimeout` before a job is marked TIMED_OUT, so the
    /// worker's own `Timeout` result normally arrives first.
    pub timeout_grace: Duration,
    /// Pause between webhook attempts.
    pub webhook_retry_delay: Duration,
    /// How long a finished `/run` job (and anything queued by [`super::MockQueue::enqueue`])
    /// is kept before it is deleted (the platform: 30 minutes).
    pub run_retention: Duration,
    /// How long a finished `/runsync` job is kept (the platform: 1 minute).
    pub runsync_retention: Duration,
    /// Refuse `policy.executionTimeout` under 5 s and `policy.ttl` under 10 s, as the platform
    /// does; tests turn this off to use short deadlines (types and maximums still apply).
    pub strict_policy_minimums: bool,
    /// A connection that has not sent a complete request head within this is closed.
    pub header_read_timeout: Duration,
    /// When set, only these endpoint ids exist; any other is a 404 (`local`). `None`: every
    /// id in a path is its own queue (`mock-queue`).
    pub endpoint_ids: Option<Vec<String>>,
    /// Keep every take, ping, result and stream chunk in [`super::EndpointQueue`]'s records for tests
    /// to read ([`super::MockQueue::wait_done`] needs it). `local` and `mock-queue` run for
    /// long and turn it off, so their memory stays bounded by the jobs retained.
    pub record_history: bool,
    /// job-done bodies above this are refused with 400, as the platform refuses results over
    /// its 20 MB limit (a 400, not a 413).
    pub max_result_size: usize,
    /// job-stream bodies above this are refused with 400 (the platform's 1 MB per chunk).
    pub max_stream_chunk: usize,
    /// The platform's per-route limits on `/run`, `/runsync`, `/cancel` and `/purge-queue`
    /// (429 with `Retry-After` beyond them; see [`RateLimits`] for the window). `None`, the
    /// default, admits everything, so tests and local use are never throttled by accident.
    pub rate_limits: Option<RateLimits>,
    /// Call webhooks on private, loopback and link-local addresses (refused by default, as
    /// a job's input URLs are: a submitted job must not make the queue call the machine's own
    /// services). `local` and `mock-queue` turn it on with `--allow-private-webhooks`.
    pub allow_private_webhooks: bool,
    /// The longest a `/stream` request is held waiting for a chunk or the job's end. The
    /// JavaScript client polls `/stream` in a loop without a pause; holding the request keeps
    /// it from spinning, and the bound keeps a client's request timeout from firing first.
    pub stream_hold: Duration,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            long_poll: Duration::from_secs(20),
            lease_timeout: Duration::from_secs(30),
            max_queued: None,
            max_jobs: Some(MAX_JOBS),
            timeout_grace: Duration::from_secs(3),
            webhook_retry_delay: Duration::from_secs(10),
            run_retention: Duration::from_secs(30 * 60),
            runsync_retention: Duration::from_secs(60),
            strict_policy_minimums: true,
            header_read_timeout: Duration::from_secs(30),
            endpoint_ids: None,
            record_history: true,
            max_result_size: runpod_protocol::limits::MAX_RESULT_BODY,
            max_stream_chunk: runpod_protocol::limits::MAX_STREAM_CHUNK,
            rate_limits: None,
            allow_private_webhooks: false,
            stream_hold: STREAM_HOLD,
        }
    }
}
