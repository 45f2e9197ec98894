//! Per-route rate limits on the client API, as the platform documents them per endpoint
//! (docs/runpod-protocol.md §2.1): `/run` 1,000, `/runsync` 2,000, `/cancel` 100 and `/purge-queue`
//! 2 requests per 10 s. A request over its limit gets 429, a JSON error body and a
//! `Retry-After` header in whole seconds, so a client's 429 handling can be tried against the
//! mock before it meets the platform. Off by default (`MockOptions::rate_limits` is `None`):
//! tests and local use are never throttled by accident.
//!
//! Window semantics: a sliding window over a log of admission times, counted separately for
//! each endpoint id and route. A request is admitted when fewer than `limit` requests of the
//! same route and endpoint were admitted within the `window` before it; otherwise it is refused
//! and `Retry-After` is the time, rounded up to whole seconds, until the oldest of those leaves
//! the window (a retry then is admitted unless others took the place first). Refused requests
//! are not counted, so a client that waits as told gets in. A sliding log rather than fixed
//! windows, because fixed windows let twice the limit through around a boundary, which would
//! hide a client that bursts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A client route with a documented rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitedRoute {
    /// `POST /run`.
    Run,
    /// `POST /runsync`.
    RunSync,
    /// `POST /cancel/{id}`.
    Cancel,
    /// `POST /purge-queue`.
    PurgeQueue,
}

impl LimitedRoute {
    /// The route as the error message names it.
    pub fn path(self) -> &'static str {
        match self {
            Self::Run => "/run",
            Self::RunSync => "/runsync",
            Self::Cancel => "/cancel",
            Self::PurgeQueue => "/purge-queue",
        }
    }
}

/// How many requests each limited route admits per endpoint within `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// The sliding window the limits count over (the platform's: 10 s).
    pub window: Duration,
    /// `/run` requests per window.
    pub run: usize,
    /// `/runsync` requests per window.
    pub runsync: usize,
    /// `/cancel` requests per window.
    pub cancel: usize,
    /// `/purge-queue` requests per window.
    pub purge_queue: usize,
}

impl RateLimits {
    /// The platform's documented limits (what `--rate-limit` turns on).
    pub const PLATFORM: Self = Self {
        window: Duration::from_secs(10),
        run: 1000,
        runsync: 2000,
        cancel: 100,
        purge_queue: 2,
    };

    /// The limit of `route`.
    pub fn limit(&self, route: LimitedRoute) -> usize {
        match route {
            LimitedRoute::Run => self.run,
            LimitedRoute::RunSync => self.runsync,
            LimitedRoute::Cancel => self.cancel,
            LimitedRoute::PurgeQueue => self.purge_queue,
        }
    }
}

impl Default for RateLimits {
    /// The platform's.
    fn default() -> Self {
        Self::PLATFORM
    }
}

/// Admission times per endpoint and route.
#[derive(Debug)]
struct Logs {
    by_route: HashMap<(String, LimitedRoute), VecDeque<Instant>>,
    /// When logs that fell wholly out of the window were last dropped: any endpoint id in a
    /// path gets a log, so logs must not outlive their window in a long-running mock.
    last_sweep: Instant,
}

impl Logs {
    /// Drops the logs with nothing left in the window, at most once a window.
    fn sweep(&mut self, now: Instant, window: Duration) {
        if now.saturating_duration_since(self.last_sweep) < window {
            return;
        }
        self.last_sweep = now;
        self.by_route.retain(|_, times| {
            forget_before(times, now, window);
            !times.is_empty()
        });
    }
}

/// The admission logs behind [`RateLimits`].
#[derive(Debug)]
pub(super) struct RateLimiter {
    limits: RateLimits,
    logs: Mutex<Logs>,
}

impl RateLimiter {
    /// Empty logs for `limits`.
    pub(super) fn new(limits: RateLimits) -> Self {
        let logs = Logs {
            by_route: HashMap::new(),
            last_sweep: Instant::now(),
        };
        Self {
            limits,
            logs: Mutex::new(logs),
        }
    }

    /// The limits it applies.
    pub(super) fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// Admits (and counts) a request on `route` of `endpoint` arriving at `now`, or says how
    /// long until one would be admitted.
    pub(super) fn admit(
        &self,
        endpoint: &str,
        route: LimitedRoute,
        now: Instant,
    ) -> Result<(), Duration> {
        let window = self.limits.window;
        let limit = self.limits.limit(route);
        let mut logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        logs.sweep(now, window);
        let times = logs
            .by_route
            .entry((endpoint.to_owned(), route))
            .or_default();
        forget_before(times, now, window);
        if times.len() < limit {
            times.push_back(now);
            return Ok(());
        }
        // With a limit of 0 nothing is ever admitted: say the whole window.
        let oldest = times.front().copied().unwrap_or(now);
        Err((oldest + window).saturating_duration_since(now))
    }

    /// How many endpoint-route logs are kept (for tests of the sweep).
    #[cfg(test)]
    fn logs(&self) -> usize {
        let logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        logs.by_route.len()
    }
}

/// Drops the admissions that left the window ending at `now`.
fn forget_before(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|&at| now.saturating_duration_since(at) >= window)
    {
        times.pop_front();
    }
}

/// `wait` in whole seconds, rounded up and at least 1 (`Retry-After: 0` would invite a retry
/// that is refused again).
pub(super) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> RateLimits {
        RateLimits {
            window: Duration::from_secs(10),
            run: 3,
            runsync: 3,
            cancel: 2,
            purge_queue: 0,
        }
    }

    #[test]
    fn the_limit_is_per_route_and_endpoint_and_refusals_say_when_to_retry() {
        let limiter = RateLimiter::new(small());
        let start = Instant::now();
        for n in 0..2 {
            let at = start + Duration::from_millis(n * 100);
            assert_eq!(limiter.admit("ep", LimitedRoute::Cancel, at), Ok(()));
        }
        let third = start + Duration::from_millis(1500);
        assert_eq!(
            limiter.admit("ep", LimitedRoute::Cancel, third),
            Err(Duration::from_millis(8500)),
            "the oldest leaves the window 10 s after it arrived"
        );
        assert_eq!(limiter.admit("ep", LimitedRoute::Run, third), Ok(()));
        assert_eq!(limiter.admit("other", LimitedRoute::Cancel, third), Ok(()));
    }

    #[test]
    fn the_window_slides_and_refused_requests_are_not_counted() {
        let limiter = RateLimiter::new(small());
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert!(limiter.admit("ep", LimitedRoute::Cancel, at(0)).is_ok());
        assert!(limiter.admit("ep", LimitedRoute::Cancel, at(6000)).is_ok());
        for ms in [7000, 8000, 9999] {
            assert!(limiter.admit("ep", LimitedRoute::Cancel, at(ms)).is_err());
        }
        // The first left the window; the refusals took no place.
        assert_eq!(
            limiter.admit("ep", LimitedRoute::Cancel, at(10_000)),
            Ok(())
        );
        assert_eq!(
            limiter.admit("ep", LimitedRoute::Cancel, at(10_001)),
            Err(Duration::from_millis(5999)),
            "the one at 6 s is now the oldest"
        );
    }

    #[test]
    fn a_limit_of_zero_refuses_for_a_whole_window() {
        let limiter = RateLimiter::new(small());
        assert_eq!(
            limiter.admit("ep", LimitedRoute::PurgeQueue, Instant::now()),
            Err(Duration::from_secs(10))
        );
    }

    #[test]
    fn logs_of_quiet_endpoints_are_dropped_after_a_window() {
        let limiter = RateLimiter::new(small());
        let start = Instant::now();
        for n in 0..50 {
            let endpoint = format!("ep-{n}");
            assert!(limiter.admit(&endpoint, LimitedRoute::Run, start).is_ok());
        }
        assert_eq!(limiter.logs(), 50);
        let later = start + Duration::from_secs(11);
        assert!(limiter.admit("ep-0", LimitedRoute::Run, later).is_ok());
        assert_eq!(
            limiter.logs(),
            1,
            "only the endpoint used in the window is kept"
        );
    }

    #[test]
    fn retry_after_is_rounded_up_to_a_whole_second_and_never_zero() {
        assert_eq!(retry_after_secs(Duration::from_millis(8500)), 9);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
    }

    #[test]
    fn the_platform_numbers_are_the_documented_ones() {
        let platform = RateLimits::default();
        assert_eq!(platform.window, Duration::from_secs(10));
        assert_eq!(
            [
                LimitedRoute::Run,
                LimitedRoute::RunSync,
                LimitedRoute::Cancel,
                LimitedRoute::PurgeQueue
            ]
            .map(|route| platform.limit(route)),
            [1000, 2000, 100, 2]
        );
    }
}
