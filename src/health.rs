//! The worker's own HTTP endpoints: `/health` (the seed's JSON plus per-handler counts),
//! `/ready` (models loaded, not draining) and `/metrics` (Prometheus). No key: they bind to
//! loopback unless `[server] host` says otherwise.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::runner::Worker;

/// Where the worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Loading models.
    Starting = 0,
    /// Taking jobs.
    Ready = 1,
    /// SIGTERM received: answering the jobs in hand, taking no more.
    Draining = 2,
    /// Cannot serve (e.g. a CUDA context that no longer works).
    Unhealthy = 3,
}

/// An atomically updated [`Phase`].
#[derive(Debug, Default)]
pub struct PhaseCell(AtomicU8);

impl PhaseCell {
    /// Moves to `phase`.
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Release);
    }

    /// The current phase.
    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            2 => Phase::Draining,
            _ => Phase::Unhealthy,
        }
    }
}

/// The routes, for embedding and tests.
pub fn router(worker: Arc<Worker>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(worker)
}

/// Serves the routes on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, worker: Arc<Worker>, stop: CancellationToken) {
    let app = router(worker);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!("health server stopped: {e}");
    }
}

fn gib(bytes: u64) -> f64 {
    (bytes as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0
}

/// The `/health` body and its HTTP status.
pub fn health_report(worker: &Worker) -> (StatusCode, Value) {
    let degraded = worker
        .handlers
        .entries()
        .any(|e| e.gpu_fallback || e.handler.is_err());
    let (status, code) = match worker.phase.get() {
        Phase::Draining => ("draining", StatusCode::SERVICE_UNAVAILABLE),
        Phase::Unhealthy => ("unhealthy", StatusCode::SERVICE_UNAVAILABLE),
        _ if degraded => ("degraded", StatusCode::OK),
        _ => ("healthy", StatusCode::OK),
    };
    let gpu = worker.gpu.snapshot();
    let snapshot = worker.limits.snapshot();
    let mut handlers = Map::new();
    let mut warnings = Vec::new();
    for entry in worker.handlers.entries() {
        let Some(counts) = snapshot.get(&entry.name).copied() else {
            continue;
        };
        handlers.insert(
            entry.name.clone(),
            json!({
                "kind": entry.kind,
                "active": counts.active,
                "limit": counts.limit,
                "max_limit": counts.max_limit,
                "queued": counts.queued,
                "device": if entry.on_gpu { "cuda" } else { "cpu" },
                "gpu_memory_gb": gib(entry.reservation.bytes()),
                "available": entry.handler.is_ok(),
            }),
        );
        if entry.gpu_fallback {
            warnings.push(format!(
                "{} asks for CUDA but no GPU was found: it runs on the CPU",
                entry.name
            ));
        }
        if let Err(reason) = &entry.handler {
            warnings.push(format!("{}: {reason}", entry.name));
        }
    }
    let counters = &worker.board.counters;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (in_worker, limit) = worker.limits.global_usage();
    let body = json!({
        "status": status,
        "ready": worker.phase.get() == Phase::Ready,
        "gpu_name": gpu.as_ref().map(|g| g.name.clone()),
        "total_vram_gb": gpu.as_ref().map(|g| gib(g.total)),
        "free_vram_gb": gpu.as_ref().map(|g| gib(g.free)),
        // Allocator statistics need the libtorch shim (GPU memory issue); unknown until then.
        "allocated_vram_gb": Value::Null,
        "reserved_vram_gb": Value::Null,
        "worker_id": worker.client.endpoints().worker_id,
        "version": env!("CARGO_PKG_VERSION"),
        "jobs": {
            "in_worker": in_worker,
            "limit": limit,
            "taken": load(&counters.taken),
            "completed": load(&counters.completed),
            "failed": load(&counters.failed),
            "cancelled": load(&counters.cancelled),
            "undelivered": load(&counters.undelivered),
            "unanswerable": load(&counters.unanswerable),
        },
        "handlers": handlers,
        "warnings": warnings,
    });
    (code, body)
}

async fn health(State(worker): State<Arc<Worker>>) -> impl IntoResponse {
    let (code, body) = health_report(&worker);
    (code, Json(body))
}

async fn ready(State(worker): State<Arc<Worker>>) -> impl IntoResponse {
    match worker.phase.get() {
        Phase::Ready => (StatusCode::OK, "ready"),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Phase::Unhealthy => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
    }
}

async fn metrics(State(worker): State<Arc<Worker>>) -> impl IntoResponse {
    let snapshot = worker.limits.snapshot();
    let gpu = worker.gpu.snapshot();
    let text = worker.metrics.render(snapshot.iter(), gpu.as_ref());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
}
