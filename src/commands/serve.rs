//! `serve`: the production worker, configured by the `RUNPOD_*` environment.

use std::path::Path;

use tokio::net::TcpListener;

use worker::config::Config;
use worker::queue::{QueueClient, QueueEndpoints};
use worker::runner::{run_worker, Fitness, WorkerExit, WorkerSetup};

/// Runs the worker until SIGTERM/SIGINT and the drain. Exit code 0 after a clean drain; 1 on a
/// start-up failure, after the SDK's unhealthy ping.
pub async fn serve(config_path: Option<&Path>, http_port: Option<u16>) -> i32 {
    let endpoints = match QueueEndpoints::from_env() {
        Ok(endpoints) => endpoints,
        Err(e) => {
            tracing::error!("{e}");
            return 1;
        }
    };
    let (mut config, source) = match Config::load(config_path) {
        Ok(loaded) => loaded,
        Err(e) => return fail(&endpoints, "config", &e.to_string()).await,
    };
    match source {
        worker::config::ConfigSource::File(path) => tracing::info!("config: {}", path.display()),
        worker::config::ConfigSource::Defaults => {
            tracing::info!("no runpod.toml found: using the built-in defaults")
        }
    }
    if let Some(port) = http_port {
        config.server.port = port;
    }
    let fitness = match Fitness::from_env() {
        Ok(fitness) => fitness,
        Err(e) => return fail(&endpoints, e.check, &e.reason).await,
    };
    let address = format!("{}:{}", config.server.host, config.server.port);
    let listener = match TcpListener::bind(&address).await {
        Ok(listener) => listener,
        Err(e) => {
            return fail(
                &endpoints,
                "http",
                &format!("cannot listen on {address}: {e}"),
            )
            .await
        }
    };
    if let Ok(addr) = listener.local_addr() {
        println!("listening on http://{addr}");
    }
    let setup = WorkerSetup {
        config,
        endpoints: endpoints.clone(),
        handlers: None,
        gpu: None,
        http_listener: listener,
        shutdown: worker::shutdown::signal_token(),
        require_cuda: true,
        fitness,
        pages: Some(Box::new(crate::console::worker_console)),
        shares_process: false,
    };
    match run_worker(setup).await {
        Ok(WorkerExit::Drained) => 0,
        // Asked for on purpose (`refresh_worker`, memory growth): the platform starts another.
        Ok(WorkerExit::Refreshed) => 0,
        // Exit non-zero so the container is restarted if the platform did not replace it.
        Ok(WorkerExit::Replaced) => 1,
        Err(e) => fail(&endpoints, e.check, &e.reason).await,
    }
}

/// Logs a start-up failure, sends the SDK's unhealthy ping, and gives exit code 1.
async fn fail(endpoints: &QueueEndpoints, check: &str, reason: &str) -> i32 {
    tracing::error!("cannot start: {reason}");
    let config = worker::config::QueueConfig::default();
    if let Ok(client) = QueueClient::new(endpoints.clone(), config) {
        if let Err(e) = client.report_unhealthy(check, reason).await {
            tracing::warn!("could not report the failure to the queue: {e}");
        }
    }
    1
}
