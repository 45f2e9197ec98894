//! `mock-queue`: the mock job API alone, for several `serve` workers to share.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use mock_queue::{serve, Fault, MockOptions, MockState, RateLimits, Route};
use runpod_protocol::ApiKey;

/// The `mock-queue` settings.
#[derive(Debug, Clone)]
pub struct MockQueueArgs {
    /// Address to bind.
    pub host: String,
    /// Port (0 picks one).
    pub port: u16,
    /// Required key.
    pub api_key: Option<String>,
    /// Long-poll seconds.
    pub long_poll_s: u64,
    /// Lease seconds.
    pub lease_timeout_s: u64,
    /// Queue bound.
    pub max_queued: Option<usize>,
    /// `ROUTE=RATE[:STATUS]` specs.
    pub faults: Vec<String>,
    /// Retention and policy checks.
    pub rules: JobRules,
}

impl MockQueueArgs {
    /// The mock's options for these settings and `key`.
    pub fn options(&self, key: Option<ApiKey>) -> MockOptions {
        self.rules.apply(MockOptions {
            api_key: key,
            long_poll: Duration::from_secs(self.long_poll_s),
            lease_timeout: Duration::from_secs(self.lease_timeout_s),
            max_queued: self.max_queued,
            ..MockOptions::default()
        })
    }
}

/// How long finished jobs are kept, how strictly `policy` is checked and whether the platform's
/// rate limits apply: the flags that `mock-queue` and `local` share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRules {
    /// Seconds a finished `/run` job is kept.
    pub run_retention_s: u64,
    /// Seconds a finished `/runsync` job is kept.
    pub runsync_retention_s: u64,
    /// Jobs an endpoint keeps at most (queued, running, finished within retention).
    pub max_jobs: usize,
    /// Accept `policy` durations under the platform's minimums.
    pub relax_policy_minimums: bool,
    /// Apply the platform's per-route rate limits (429 with `Retry-After` beyond them).
    pub rate_limit: bool,
    /// Call webhooks on private, loopback and link-local addresses.
    pub allow_private_webhooks: bool,
}

impl Default for JobRules {
    /// The platform's: 30 minutes, 1 minute, strict; no rate limits (they would only get in
    /// the way of local use unless asked for).
    fn default() -> Self {
        Self {
            run_retention_s: 30 * 60,
            runsync_retention_s: 60,
            max_jobs: mock_queue::MAX_JOBS,
            relax_policy_minimums: false,
            rate_limit: false,
            allow_private_webhooks: false,
        }
    }
}

impl JobRules {
    /// `options` with these rules. The per-request history is off: these servers run for
    /// long, and only tests read it.
    pub fn apply(self, options: MockOptions) -> MockOptions {
        MockOptions {
            run_retention: Duration::from_secs(self.run_retention_s),
            runsync_retention: Duration::from_secs(self.runsync_retention_s),
            max_jobs: Some(self.max_jobs),
            strict_policy_minimums: !self.relax_policy_minimums,
            rate_limits: self.rate_limit.then_some(RateLimits::PLATFORM),
            allow_private_webhooks: self.allow_private_webhooks,
            record_history: false,
            ..options
        }
    }
}

/// Reads one `--fault ROUTE=RATE[:STATUS]`.
pub fn parse_fault(spec: &str) -> Result<(Route, Fault), String> {
    let usage = || format!("--fault {spec:?}: expected ROUTE=RATE[:STATUS], e.g. job-done=0.2:503");
    let (route, rest) = spec.split_once('=').ok_or_else(usage)?;
    let route = Route::from_name(route.trim()).ok_or_else(|| {
        format!("--fault {spec:?}: unknown route; use job-take, job-stop, job-done, job-stream, ping or client")
    })?;
    let (rate, status) = match rest.split_once(':') {
        Some((rate, status)) => (rate, status.trim().parse::<u16>().map_err(|_| usage())?),
        None => (rest, 500),
    };
    let rate: f64 = rate.trim().parse().map_err(|_| usage())?;
    // 200 answers with a garbage body (HTML, the wrong content type), as --help says.
    if !(0.0..=1.0).contains(&rate) || !(status == 200 || (400..=599).contains(&status)) {
        return Err(format!(
            "--fault {spec:?}: RATE must be 0..1 and STATUS 400..599, or 200 for a garbage body"
        ));
    }
    Ok((route, Fault { status, rate }))
}

/// Serves the mock until SIGTERM/SIGINT.
pub async fn mock_queue(args: MockQueueArgs) -> i32 {
    let mut faults = Vec::new();
    for spec in &args.faults {
        match parse_fault(spec) {
            Ok(fault) => faults.push(fault),
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        }
    }
    let listener = match TcpListener::bind((args.host.as_str(), args.port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {}:{}: {e}", args.host, args.port);
            return 1;
        }
    };
    let key = args
        .api_key
        .clone()
        .filter(|k| !k.is_empty())
        .map(ApiKey::new);
    if key.is_none() {
        tracing::warn!(
            "no --api-key and no RUNPOD_AI_API_KEY: the mock accepts requests without a key"
        );
    }
    let options = args.options(key);
    let state = Arc::new(MockState::new(options));
    state.with(|inner| inner.faults.extend(faults));
    if let Ok(addr) = listener.local_addr() {
        println!("listening on http://{addr}");
    }
    let stop = worker::shutdown::signal_token();
    match serve(listener, state, stop).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("mock queue stopped: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_with_a_default_status_and_clear_errors() {
        assert_eq!(
            parse_fault("job-done=0.2:503").unwrap(),
            (
                Route::Done,
                Fault {
                    status: 503,
                    rate: 0.2
                }
            )
        );
        assert_eq!(
            parse_fault("ping=1").unwrap(),
            (
                Route::Ping,
                Fault {
                    status: 500,
                    rate: 1.0
                }
            )
        );
        assert!(parse_fault("jobs=0.1")
            .unwrap_err()
            .contains("unknown route"));
        assert!(parse_fault("job-take=2")
            .unwrap_err()
            .contains("RATE must be"));
        assert!(parse_fault("job-take")
            .unwrap_err()
            .contains("expected ROUTE=RATE"));
        assert!(parse_fault("job-take=1:302")
            .unwrap_err()
            .contains("or 200 for a garbage body"));
    }

    #[test]
    fn a_fault_with_status_200_is_accepted_as_the_help_text_says() {
        assert_eq!(
            parse_fault("job-take=1:200").unwrap(),
            (
                Route::Take,
                Fault {
                    status: 200,
                    rate: 1.0
                }
            )
        );
    }

    #[test]
    fn mock_queue_flags_set_retention_policy_strictness_and_drop_the_test_history() {
        let args = MockQueueArgs {
            host: "127.0.0.1".into(),
            port: 0,
            api_key: None,
            long_poll_s: 5,
            lease_timeout_s: 7,
            max_queued: Some(3),
            faults: Vec::new(),
            rules: JobRules {
                run_retention_s: 120,
                runsync_retention_s: 2,
                max_jobs: 9,
                relax_policy_minimums: true,
                rate_limit: false,
                allow_private_webhooks: true,
            },
        };
        let options = args.options(None);
        assert_eq!(options.run_retention, Duration::from_secs(120));
        assert_eq!(options.runsync_retention, Duration::from_secs(2));
        assert_eq!(options.max_jobs, Some(9));
        assert!(!options.strict_policy_minimums);
        assert!(options.allow_private_webhooks);
        assert!(
            !options.record_history,
            "a long-running server keeps no history"
        );
        assert_eq!(options.lease_timeout, Duration::from_secs(7));
        let defaults = JobRules::default().apply(MockOptions::default());
        assert_eq!(
            (defaults.run_retention, defaults.runsync_retention),
            (Duration::from_secs(1800), Duration::from_secs(60)),
            "the platform's retention"
        );
        assert!(defaults.strict_policy_minimums);
        assert_eq!(
            defaults.max_jobs,
            Some(mock_queue::MAX_JOBS),
            "a cap by default"
        );
        assert_eq!(
            defaults.rate_limits, None,
            "no rate limits unless asked for"
        );
    }

    #[test]
    fn the_rate_limit_flag_turns_on_the_platform_limits() {
        let rules = JobRules {
            rate_limit: true,
            ..JobRules::default()
        };
        let options = rules.apply(MockOptions::default());
        assert_eq!(options.rate_limits, Some(RateLimits::PLATFORM));
        assert_eq!(MockOptions::default().rate_limits, None);
    }
}
