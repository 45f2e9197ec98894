//! `serve` in load-balancing mode: the platform's balancer sends requests to this worker's own
//! port, with no queue. Chosen by `serve --load-balancing`, or by `PORT` set with no job queue
//! named.

use std::path::Path;

use tokio::net::TcpListener;

use runpod_protocol::ApiKey;
use worker::config::{Config, ConfigSource};
use worker::load_balancing::{self, Gate, Ports, SubmitterSlot};
use worker::queue::QueueEndpoints;
use worker::runner::{start_for_requests, Fitness, PortPages, WorkerExit, WorkerSetup};

/// Serves requests until SIGTERM and the drain. Exit code 0 after a clean drain, 1 when it
/// cannot start (there is no queue to tell: the ping's 204 never turns 200, and the log says why).
pub(super) async fn serve_requests(config_path: Option<&Path>) -> i32 {
    let env = |name: &str| std::env::var(name).ok();
    match start(config_path, env).await {
        Ok(code) => code,
        Err(reason) => {
            tracing::error!("cannot start: {reason}");
            1
        }
    }
}

async fn start(
    config_path: Option<&Path>,
    env: impl Fn(&str) -> Option<String> + Copy,
) -> Result<i32, String> {
    let ports = Ports::from_vars(env)?;
    let (config, source) = Config::load(config_path).map_err(|e| e.to_string())?;
    match source {
        ConfigSource::File(path) => tracing::info!("config: {}", path.display()),
        ConfigSource::Defaults => {
            tracing::info!("no runpod.toml found: using the built-in defaults")
        }
    }
    let fitness = Fitness::from_env().map_err(|e| format!("{}: {}", e.check, e.reason))?;
    let listener = listen(&ports.host, ports.port, "PORT").await?;
    let health_listener = if ports.shared() {
        None
    } else {
        Some(listen(&ports.host, ports.health_port, "PORT_HEALTH").await?)
    };
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let health_address = match &health_listener {
        Some(listener) => listener.local_addr().map_err(|e| e.to_string())?,
        None => address,
    };
    println!("listening on http://{address}");
    tracing::info!(
        "load-balancing mode: POST /runsync, /stream and /v1/embeddings on {address}; the \
         balancer's ping at {} on {health_address}",
        ports.health_path
    );
    let submitter = SubmitterSlot::default();
    let gate = Gate(ApiKey::new(env("RUNPOD_AI_API_KEY").unwrap_or_default()));
    if !gate.0.is_empty() {
        tracing::info!("requests must carry RUNPOD_AI_API_KEY (`Authorization: Bearer KEY`)");
    }
    let pages: PortPages = {
        let submitter = submitter.clone();
        let path = ports.health_path.clone();
        Box::new(move |slot, stop| {
            if let Some(listener) = health_listener {
                let health = load_balancing::health_router(slot.clone(), &path);
                tokio::spawn(worker::health::serve(listener, slot.clone(), health, stop));
            }
            load_balancing::router(submitter, slot, gate, &path)
        })
    };
    let setup = WorkerSetup {
        config,
        endpoints: no_queue(env)?,
        handlers: None,
        gpu: None,
        http_listener: listener,
        shutdown: worker::shutdown::signal_token(),
        require_cuda: true,
        fitness,
        pages: Some(pages),
        shares_process: false,
    };
    let Some(started) = start_for_requests(setup).await.map_err(|e| e.to_string())? else {
        return Ok(0);
    };
    let _ = submitter.set(started.submitter());
    Ok(match started.serve_requests().await {
        WorkerExit::Drained | WorkerExit::Refreshed => 0,
        // Exit non-zero so the container is restarted if the platform did not replace it.
        WorkerExit::Replaced => 1,
    })
}

/// Binds `host:port`, saying what to do when the port is privileged (the image runs as a user).
async fn listen(host: &str, port: u16, variable: &str) -> Result<TcpListener, String> {
    let address = format!("{host}:{port}");
    TcpListener::bind(&address).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            format!(
                " (ports below 1024 need root, and the image runs as a user: set {variable} to a \
                 port such as 8000, and expose that port on the endpoint)"
            )
        } else {
            String::new()
        };
        format!("cannot listen on {address} ({variable}): {e}{hint}")
    })
}

/// The worker's id and key as the SDK's variables give them, with no queue: a load-balancing
/// worker never contacts one (the job URL is a placeholder that nothing reads).
fn no_queue(env: impl Fn(&str) -> Option<String>) -> Result<QueueEndpoints, String> {
    QueueEndpoints::from_vars(|name| match name {
        "RUNPOD_WEBHOOK_GET_JOB" => Some("http://127.0.0.1:9/no-queue".to_owned()),
        other => env(other).filter(|v| !v.is_empty()),
    })
    .map_err(|e| e.to_string())
}
