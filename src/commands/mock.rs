//! `mock-queue`: the mock job API alone, for several `serve` workers to share.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::mock_queue::{serve, Fault, MockOptions, MockState, Route};
use crate::secret::ApiKey;

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
    let key = args.api_key.filter(|k| !k.is_empty()).map(ApiKey::new);
    if key.is_none() {
        tracing::warn!(
            "no --api-key and no RUNPOD_AI_API_KEY: the mock accepts requests without a key"
        );
    }
    let options = MockOptions {
        api_key: key,
        long_poll: Duration::from_secs(args.long_poll_s),
        lease_timeout: Duration::from_secs(args.lease_timeout_s),
        max_queued: args.max_queued,
        ..MockOptions::default()
    };
    let state = Arc::new(MockState::new(options));
    state.with(|inner| inner.faults.extend(faults));
    if let Ok(addr) = listener.local_addr() {
        println!("listening on http://{addr}");
    }
    let stop = crate::shutdown::signal_token();
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
}
