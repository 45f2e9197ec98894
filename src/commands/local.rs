//! `local`: the mock queue (endpoint id `local`) and a worker in one process, for trying the
//! worker out and for developing handlers. `make run` starts it.

use std::path::Path;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::mock_queue::{MockOptions, MockQueue};
use crate::queue::QueueEndpoints;
use crate::runner::{run_worker, WorkerExit, WorkerSetup};
use crate::secret::ApiKey;

/// The endpoint id `local` serves.
pub const LOCAL_ENDPOINT: &str = "local";

/// Runs until SIGTERM/SIGINT; exit code 0 after the drain.
pub async fn local(port: u16, config_path: Option<&Path>, http_port: Option<u16>) -> i32 {
    let (mut config, _) = match Config::load(config_path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let Some(port) = http_port {
        config.server.port = port;
    }
    let key = std::env::var("RUNPOD_AI_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| format!("local-{}", uuid::Uuid::new_v4().simple()));
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
    let options = MockOptions {
        api_key: Some(ApiKey::new(key.clone())),
        ..MockOptions::default()
    };
    let mock = match MockQueue::start(queue_listener, options).await {
        Ok(mock) => mock,
        Err(e) => {
            eprintln!("cannot start the mock queue: {e}");
            return 1;
        }
    };
    let base = mock.base_url();
    let health = http_listener
        .local_addr()
        .map(|a| format!("http://{a}/health"))
        .unwrap_or_default();
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
    let endpoints = QueueEndpoints::for_queue(&base, LOCAL_ENDPOINT, "local-worker", &key);
    let setup = WorkerSetup {
        config,
        endpoints,
        handlers: None,
        gpu: None,
        http_listener,
        shutdown: crate::shutdown::signal_token(),
        require_cuda: false,
    };
    let code = match run_worker(setup).await {
        Ok(WorkerExit::Drained) => 0,
        Ok(WorkerExit::Replaced) => 1,
        Err(e) => {
            eprintln!("cannot start the worker: {e}");
            1
        }
    };
    drop(mock);
    code
}
