//! The worker's own HTTP endpoints: `/health` (the seed's JSON plus per-handler counts),
//! `/ready` (models loaded, not draining), `/ping` and `/metrics` (Prometheus), and whatever
//! pages the binary serves beside them (the read-only console at `/`). No key: they bind to
//! loopback unless `[server] host` says otherwise.
//!
//! They read [`Observed`], the part of the worker's state the runner shares with them; this
//! module knows nothing of the runner.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::observed::{Observed, Phase, WorkerSlot};

/// The routes: `/health`, `/ready`, `/ping` and `/metrics`.
pub fn router(slot: WorkerSlot) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/ping", get(ping))
        .route("/metrics", get(metrics))
        .with_state(slot)
}

/// A client that has not sent its request head within this is disconnected.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves the routes, and `pages` beside them (the console, from the binary), on `listener`
/// until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    slot: WorkerSlot,
    pages: Router,
    stop: CancellationToken,
) {
    let app = router(slot).merge(pages);
    if let Err(e) = http_server::serve_http1(listener, app, HEADER_READ_TIMEOUT, stop).await {
        tracing::error!("health server stopped: {e}");
    }
}

/// What the endpoints say while the models load.
fn starting() -> (StatusCode, &'static str) {
    (StatusCode::SERVICE_UNAVAILABLE, "starting")
}

fn gib(bytes: u64) -> f64 {
    (bytes as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0
}

/// One device as `/health` shows it.
struct DeviceView {
    index: usize,
    uuid: String,
    nvml_index: Option<u32>,
    name: String,
    /// Where the device is a MIG instance: its card's UUID.
    mig_parent: Option<String>,
    resident: u64,
    resident_source: Option<&'static str>,
    total: u64,
    free: u64,
    budget: u64,
    reserved: u64,
    reserved_here: u64,
    others_used: u64,
    reservations: usize,
    /// libtorch's allocated and reserved bytes (simulated: our reservations).
    allocated: u64,
    allocator_reserved: u64,
}

fn devices(worker: &Observed) -> Vec<DeviceView> {
    let sample = worker.sampler.latest();
    let simulated = worker.sampler.probe().is_simulated();
    sample
        .devices
        .iter()
        .map(|reading| {
            let ledger = worker
                .memory
                .ledgers()
                .iter()
                .find(|l| l.uuid() == reading.uuid);
            let (reserved, resident) = ledger.map_or((0, 0), |l| l.booked());
            let reserved_here = ledger.map_or(0, |l| l.reserved_here());
            let others_used = worker.memory.others_used(reading.index);
            let allocator = sample.allocator_of(&reading.uuid);
            let (allocated, allocator_reserved) = match allocator {
                Some(a) => (a.allocated, a.reserved),
                None if simulated => (reserved_here, reserved_here),
                None => (0, 0),
            };
            // A simulated device's free memory is what neither others, nor our jobs, nor our
            // declared models hold.
            let free = if simulated {
                reading
                    .total
                    .saturating_sub(others_used)
                    .saturating_sub(reserved)
                    .saturating_sub(resident)
            } else {
                reading.free
            };
            DeviceView {
                index: reading.index,
                uuid: reading.uuid.clone(),
                nvml_index: reading.nvml_index,
                name: reading.name.clone(),
                mig_parent: reading.mig_parent.clone(),
                resident,
                resident_source: worker
                    .memory
                    .resident_source(&reading.uuid)
                    .map(|s| s.as_str()),
                total: reading.total,
                free,
                budget: ledger.map_or(0, |l| l.budget()),
                reserved,
                reserved_here,
                others_used,
                reservations: ledger.map_or(0, |l| l.entries().len()),
                allocated,
                allocator_reserved,
            }
        })
        .collect()
}

/// The `/health` body and its HTTP status.
pub fn health_report(worker: &Observed) -> (StatusCode, Value) {
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
    let devices = devices(worker);
    let snapshot = worker.limits.snapshot();
    let mut handlers = Map::new();
    let mut warnings = Vec::new();
    for entry in worker.handlers.entries() {
        let Some(counts) = snapshot.get(&entry.name).copied() else {
            continue;
        };
        let footprint = worker.memory.footprint(&entry.name).map(|f| {
            json!({
                "declared_gb": gib(worker.memory.resolve(f.declared())),
                "learned_gb": gib(f.estimate()),
                "samples": f.samples(),
                "admitted_gb": gib(worker.memory.need(&entry.name).unwrap_or(0)),
            })
        });
        handlers.insert(
            entry.name.clone(),
            json!({
                "kind": entry.kind,
                "device": if entry.on_gpu { "cuda" } else { "cpu" },
                "active": counts.active,
                "limit": counts.limit,
                "max_limit": counts.max_limit,
                "queued": counts.queued,
                "available": entry.handler.is_ok(),
                "batched": entry.batched,
                "footprint": footprint,
                "typical_duration_ms": worker.memory.typical_duration(&entry.name).map(|d| d.as_millis() as u64),
            }),
        );
        if entry.gpu_fallback {
            let why = worker.gpu_access.cpu_fallback_reason().unwrap_or_default();
            warnings.push(format!(
                "{} asks for CUDA but {why}: it runs on the CPU",
                entry.name
            ));
        }
        if let Err(reason) = &entry.handler {
            warnings.push(format!("{}: {reason}", entry.name));
        }
    }
    let gpus: Vec<Value> = devices
        .iter()
        .map(|d| {
            json!({
                "index": d.index,
                "uuid": d.uuid,
                "nvml_index": d.nvml_index,
                "name": d.name,
                "mig": d.mig_parent.is_some(),
                "mig_parent_uuid": d.mig_parent,
                "total_gb": gib(d.total),
                "free_gb": gib(d.free),
                "budget_gb": gib(d.budget),
                "resident_gb": gib(d.resident),
                "resident_source": d.resident_source,
                "reserved_gb": gib(d.reserved),
                "reserved_here_gb": gib(d.reserved_here),
                "others_used_gb": gib(d.others_used),
                "reservations": d.reservations,
            })
        })
        .collect();
    let batching: Vec<Value> = worker
        .handlers
        .batchers()
        .iter()
        .map(|used| {
            let mut report = json!(used.batcher.report());
            let names: Vec<&str> = used
                .handlers
                .iter()
                .map(|id| worker.handlers.entry(*id).name.as_str())
                .collect();
            report["handlers"] = json!(names);
            report
        })
        .collect();
    let first = devices.first();
    let counters = &worker.counters;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (in_worker, limit) = worker.limits.global_usage();
    let body = json!({
        "status": status,
        "ready": worker.phase.get() == Phase::Ready,
        "gpu_name": first.map(|g| g.name.clone()),
        "total_vram_gb": first.map(|g| gib(g.total)),
        "free_vram_gb": first.map(|g| gib(g.free)),
        "allocated_vram_gb": first.map(|g| gib(g.allocated)),
        "reserved_vram_gb": first.map(|g| gib(g.allocator_reserved)),
        "worker_id": worker.worker_id,
        "version": env!("CARGO_PKG_VERSION"),
        "adaptive": worker.adaptive,
        "jobs": {
            "in_worker": in_worker,
            "limit": limit,
            "taken": load(&counters.taken),
            "completed": load(&counters.completed),
            "failed": load(&counters.failed),
            "cancelled": load(&counters.cancelled),
            "undelivered": load(&counters.undelivered),
            "unanswerable": load(&counters.unanswerable),
            "duplicates": load(&counters.duplicates),
        },
        "handlers": handlers,
        "batching": batching,
        "gpus": gpus,
        "warnings": warnings,
    });
    (code, body)
}

async fn health(State(slot): State<WorkerSlot>) -> Response {
    let Some(worker) = slot.get() else {
        // Alive, not ready: the models are loading.
        let body = json!({ "status": "healthy", "ready": false, "phase": "starting" });
        return (StatusCode::OK, Json(body)).into_response();
    };
    let (code, body) = health_report(worker);
    (code, Json(body)).into_response()
}

async fn ready(State(slot): State<WorkerSlot>) -> impl IntoResponse {
    let Some(worker) = slot.get() else {
        return starting();
    };
    match worker.phase.get() {
        Phase::Ready => (StatusCode::OK, "ready"),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Phase::Unhealthy => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
    }
}

/// The ping alone, at `path` (a load-balancing endpoint's `HEALTH_CHECK_PATH`).
pub fn ping_route(slot: WorkerSlot, path: &str) -> Router {
    Router::new().route(path, get(ping)).with_state(slot)
}

/// The platform's load-balancing probe: 200 ready, 204 initializing, anything else unhealthy,
/// so one probe serves queue and load-balancing endpoints alike. Draining is not healthy: a
/// balancer must send nothing more. A 503 says why.
async fn ping(State(slot): State<WorkerSlot>) -> Response {
    let phase = slot
        .get()
        .map_or(Phase::Starting, |worker| worker.phase.get());
    let unavailable = |status: &str, reason: &str| {
        let body = json!({ "status": status, "reason": reason });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    };
    match phase {
        Phase::Ready => (StatusCode::OK, Json(json!({ "status": "healthy" }))).into_response(),
        Phase::Starting => StatusCode::NO_CONTENT.into_response(),
        Phase::Draining => unavailable(
            "draining",
            "shutting down: finishing the requests in flight, taking no new ones",
        ),
        Phase::Unhealthy => unavailable(
            "unhealthy",
            "the GPU failed (out-of-memory errors kept repeating, or the device was lost): \
             draining to be replaced",
        ),
    }
}

async fn metrics(State(slot): State<WorkerSlot>) -> Response {
    let Some(worker) = slot.get() else {
        return starting().into_response();
    };
    let m = &worker.metrics;
    for (name, h) in worker.limits.snapshot() {
        let footprint = worker.memory.need(&name).unwrap_or(0);
        for (field, value) in [
            ("active", h.active as u64),
            ("limit", h.limit as u64),
            ("max_limit", h.max_limit as u64),
            ("queued", h.queued as u64),
            ("footprint_bytes", footprint),
        ] {
            m.handler
                .with_label_values(&[name.as_str(), field])
                .set(value as i64);
        }
    }
    for d in devices(worker) {
        let device = d.index.to_string();
        for (kind, value) in [
            ("total", d.total),
            ("free", d.free),
            ("budget", d.budget),
            ("resident", d.resident),
            ("reserved", d.reserved),
            ("others_used", d.others_used),
            ("allocated", d.allocated),
            ("allocator_reserved", d.allocator_reserved),
        ] {
            m.gpu
                .with_label_values(&[device.as_str(), kind])
                .set(value as i64);
        }
    }
    let content_type = [(
        axum::http::header::CONTENT_TYPE,
        "text/plain; version=0.0.4",
    )];
    (content_type, m.render()).into_response()
}
