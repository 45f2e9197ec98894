//! `local`: the mock queue (endpoint id `local`) and a worker in one process, for trying the
//! worker out and for developing handlers. `make run` starts it. The queue outlives its
//! worker: a worker that must be replaced (repeated OOMs, a lost GPU) is followed by a fresh
//! one, and the jobs and results stay where they were. The queue's port also serves the
//! console at `/` (see [`crate::console`]).

use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::mock::JobRules;
use crate::console::{self, LocalConsole};
use mock_queue::{MockOptions, MockQueue};
use runpod_protocol::ApiKey;
use worker::config::Config;
use worker::queue::QueueEndpoints;
use worker::runner::{start_worker, StartupError, WorkerExit, WorkerSetup};

/// The endpoint id `local` serves.
pub const LOCAL_ENDPOINT: &str = "local";
/// The first worker's id; its replacements are `local-worker-2`, `-3`, ...
const WORKER_ID: &str = "local-worker";

/// The `local` settings.
#[derive(Debug, Clone, Default)]
pub struct LocalArgs {
    /// Port of the mock queue.
    pub port: u16,
    /// Config file.
    pub config: Option<PathBuf>,
    /// Port of the worker's `/health` (overrides `[server] port`).
    pub http_port: Option<u16>,
    /// Retention and policy checks of the mock queue.
    pub rules: JobRules,
}

/// What [`run_local`] runs with; tests substitute each part.
pub struct LocalSetup {
    /// The worker's configuration (each fresh worker gets a copy).
    pub config: Config,
    /// The mock queue's options (its key among them).
    pub mock: MockOptions,
    /// Where the mock queue is served.
    pub queue_listener: TcpListener,
    /// Where every worker in turn serves `/health`, `/ready` and `/metrics`.
    pub http_listener: TcpListener,
    /// Cancelled to drain the worker and stop.
    pub shutdown: CancellationToken,
    /// Called once, when the first worker is ready to take jobs (`local` prints its banner
    /// then, so every address it names already answers).
    pub on_ready: Option<Box<dyn FnOnce() + Send>>,
}

/// Why `local` stopped before its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The mock queue could not be served.
    #[error("cannot start the mock queue: {0}")]
    Mock(std::io::Error),
    /// The worker's HTTP socket could not be handed to a worker.
    #[error("cannot pass the worker's HTTP port on: {0}")]
    HttpPort(std::io::Error),
    /// A worker could not start.
    #[error("cannot start the worker: {0}")]
    Worker(#[from] StartupError),
}

/// The mock's options in `local`: the key, only the endpoint `local`, and `rules`.
pub fn local_mock_options(key: &str, rules: JobRules) -> MockOptions {
    rules.apply(MockOptions {
        api_key: Some(ApiKey::new(key)),
        endpoint_ids: Some(vec![LOCAL_ENDPOINT.to_owned()]),
        ..MockOptions::default()
    })
}

/// Runs until SIGTERM/SIGINT; exit code 0 after the drain.
pub async fn local(args: LocalArgs) -> i32 {
    let (mut config, _) = match Config::load(args.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let Some(port) = args.http_port {
        config.server.port = port;
    }
    let key = std::env::var("RUNPOD_AI_API_KEY")
        .ok()
        // Spaces around a key cannot reach the queue in a header: the key is what is inside.
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| format!("local-{}", uuid::Uuid::new_v4().simple()));
    let port = args.port;
    let queue_listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e} (pick another with --port)");
            return 1;
        }
    };
    let worker_address = format!("{}:{}", config.server.host, config.server.port);
    let http_listener = match TcpListener::bind(&worker_address).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {worker_address}: {e} (pick another with --http-port)");
            return 1;
        }
    };
    let base = queue_listener
        .local_addr()
        .map(|a| format!("http://{a}"))
        .unwrap_or_default();
    let health = http_listener
        .local_addr()
        .map(|a| format!("http://{a}/health"))
        .unwrap_or_default();
    let banner_key = key.clone();
    let setup = LocalSetup {
        config,
        mock: local_mock_options(&key, args.rules),
        queue_listener,
        http_listener,
        shutdown: worker::shutdown::signal_token(),
        on_ready: Some(Box::new(move || print_banner(&base, &health, &banner_key))),
    };
    match run_local(setup).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn print_banner(base: &str, health: &str, key: &str) {
    // The console first: it is what a developer trying a handler opens.
    println!("console: {base}/  (open it in a browser; it asks for the API key below)");
    println!("listening on {base}");
    println!("runpod-worker {} local endpoint", env!("CARGO_PKG_VERSION"));
    println!("  endpoint URL: {base}/v2/{LOCAL_ENDPOINT}");
    println!("  API key:      {key}");
    println!("  worker:       {health}");
    println!("Submit a job:");
    println!(
        "  curl -s -X POST {base}/v2/{LOCAL_ENDPOINT}/runsync -H 'Authorization: Bearer {key}' \
         -H 'Content-Type: application/json' -d '{{\"input\": {{\"task\": \"echo\", \"message\": \"hello\"}}}}'"
    );
}

/// Serves the mock queue and runs a worker against it until `shutdown`. A worker that must be
/// replaced is followed by a fresh one (a new worker id, the same `/health` address); the
/// queue, its jobs and their results live on.
pub async fn run_local(setup: LocalSetup) -> Result<(), LocalError> {
    let LocalSetup {
        config,
        mock,
        queue_listener,
        http_listener,
        shutdown,
        mut on_ready,
    } = setup;
    let key = mock
        .api_key
        .as_ref()
        .map(|k| k.expose().to_owned())
        .unwrap_or_default();
    // The console on the queue's port reads the worker's `/health` from the worker's port.
    let worker_base = worker_base(&http_listener).map_err(LocalError::HttpPort)?;
    let mock = MockQueue::start_with(queue_listener, mock, |state| {
        console::local_routes(LocalConsole::new(
            state.clone(),
            LOCAL_ENDPOINT,
            &worker_base,
        ))
    })
    .await
    .map_err(LocalError::Mock)?;
    let http = SharedListener::new(http_listener).map_err(LocalError::HttpPort)?;
    for generation in 1u32.. {
        let worker_id = match generation {
            1 => WORKER_ID.to_owned(),
            n => format!("{WORKER_ID}-{n}"),
        };
        let setup = WorkerSetup {
            config: config.clone(),
            endpoints: QueueEndpoints::for_queue(
                &mock.base_url(),
                LOCAL_ENDPOINT,
                &worker_id,
                &key,
            ),
            handlers: None,
            gpu: None,
            http_listener: http.handle().map_err(LocalError::HttpPort)?,
            shutdown: shutdown.clone(),
            require_cuda: false,
            // A developer's machine is what it is: no fitness checks.
            fitness: worker::runner::Fitness::skipped(),
            pages: Some(Box::new(crate::console::worker_console)),
            // The queue, its jobs and their results live in this process too.
            shares_process: true,
        };
        let Some(started) = start_worker(setup).await? else {
            break;
        };
        if let Some(ready) = on_ready.take() {
            ready();
        }
        match started.run().await {
            WorkerExit::Drained => break,
            WorkerExit::Replaced | WorkerExit::Refreshed if shutdown.is_cancelled() => break,
            WorkerExit::Refreshed => tracing::info!(
                "worker {worker_id} asked for a fresh worker: starting one, as the platform would"
            ),
            WorkerExit::Replaced => tracing::warn!(
                "worker {worker_id} asked to be replaced: starting a fresh worker; the queue \
                 keeps its jobs and results"
            ),
        }
    }
    drop(mock);
    Ok(())
}

/// `http://IP:PORT` of the workers' HTTP socket, on loopback when it listens on every address.
fn worker_base(listener: &TcpListener) -> std::io::Result<String> {
    let mut addr = listener.local_addr()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(format!("http://{addr}"))
}

/// The workers' HTTP socket, held open across workers: each worker serves on a handle to the
/// same socket, so `/health` keeps its address and no other process can take the port while
/// one worker hands over to the next (connections wait in the backlog meanwhile).
struct SharedListener(std::net::TcpListener);

impl SharedListener {
    fn new(listener: TcpListener) -> std::io::Result<Self> {
        listener.into_std().map(Self)
    }

    fn handle(&self) -> std::io::Result<TcpListener> {
        let handle = self.0.try_clone()?;
        handle.set_nonblocking(true)?;
        TcpListener::from_std(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mock_queue::RateLimits;

    #[test]
    fn local_serves_only_its_endpoint_caps_its_jobs_and_rate_limits_only_when_asked() {
        let options = local_mock_options("k", JobRules::default());
        assert_eq!(options.endpoint_ids, Some(vec![LOCAL_ENDPOINT.to_owned()]));
        assert_eq!(options.rate_limits, None);
        assert_eq!(
            options.max_jobs,
            Some(mock_queue::MAX_JOBS),
            "kept jobs are capped"
        );
        let limited = JobRules {
            rate_limit: true,
            ..JobRules::default()
        };
        let options = local_mock_options("k", limited);
        assert_eq!(options.rate_limits, Some(RateLimits::PLATFORM));
    }
}
