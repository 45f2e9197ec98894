//! The worker: the take loop, the job tasks, the heartbeat and the stop channel, and the drain
//! that ends them.
//!
//! One rule runs through it: capacity is reserved before work is taken. The take loop asks
//! [`Limits::takeable`] how many jobs could start, takes at most that many, and gives each a
//! global slot that is held until the job is answered. Every taken job is answered, even at
//! SIGTERM, except a job the queue itself stopped (the SDK's behaviour).

mod board;
mod device_health;
mod execute;
mod heartbeat;
mod job;
mod stop;
mod take;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::resident;
use crate::admission::{AdaptiveRule, Limits, MemoryAdmission};
use crate::config::Config;
use crate::config::{validate_budget, Size};
use crate::gpu::sampler::GpuSampler;
use crate::gpu::{self, GpuAccess, GpuProbe};
use crate::handlers::HandlerSet;
use crate::health::{self, Observed, Phase, PhaseCell};
use crate::metrics::Metrics;
use crate::queue::{QueueClient, QueueEndpoints, Spool};

pub use crate::health::JobCounters;
pub use board::{HeldJob, JobBoard};
pub use device_health::DeviceHealth;
pub use execute::{execute, Deadline, Execution};

/// What a worker is started with. Tests substitute each part.
pub struct WorkerSetup {
    /// The validated configuration.
    pub config: Config,
    /// The queue's URLs and key.
    pub endpoints: QueueEndpoints,
    /// The handlers; `None` builds them from the configuration.
    pub handlers: Option<HandlerSet>,
    /// The GPU probe; `None` detects one.
    pub gpu: Option<Arc<dyn GpuProbe>>,
    /// Where `/health`, `/ready` and `/metrics` are served.
    pub http_listener: TcpListener,
    /// Cancelled to drain and stop (SIGTERM in `serve`).
    pub shutdown: CancellationToken,
    /// Refuse to start where NVML sees a GPU that libtorch cannot use (`serve`: the platform
    /// then replaces the host); otherwise CUDA handlers run on the CPU, reported `degraded`.
    pub require_cuda: bool,
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
#[error("{check}: {reason}")]
pub struct StartupError {
    /// Which check failed (sent as `check=` in the unhealthy ping).
    pub check: &'static str,
    /// What failed.
    pub reason: String,
}

/// The state every loop and job task shares: the runner's own parts, and the [`Observed`]
/// state it shares with the HTTP endpoints (reached through `Deref`).
pub struct Worker {
    pub(crate) config: Arc<Config>,
    pub(crate) board: Arc<JobBoard>,
    pub(crate) client: QueueClient,
    /// Cancelled when the drain's grace period is over: running jobs answer `Interrupted`.
    pub(crate) interrupt: CancellationToken,
    /// Per handler, with `[gpu] adaptive`.
    pub(crate) adaptive: std::collections::BTreeMap<String, AdaptiveRule>,
    pub(crate) tracker: TaskTracker,
    pub(crate) spool: Spool,
    pub(crate) device_health: DeviceHealth,
    /// Cancelled to stop taking: by the shutdown signal, or when the worker must be replaced.
    pub(crate) stop_taking: CancellationToken,
    /// What `/health` and `/metrics` read.
    pub(crate) observed: Arc<Observed>,
}

impl std::ops::Deref for Worker {
    type Target = Observed;

    fn deref(&self) -> &Observed {
        &self.observed
    }
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Shut down by its signal after answering every taken job.
    Drained,
    /// Its GPU failed (repeated OOMs, a lost device): it drained and asked to be replaced.
    Replaced,
}

impl Worker {
    /// Marks the worker unhealthy and stops taking jobs; the triggering result carries
    /// `stopPod`, and the jobs in hand are still answered.
    pub(crate) fn ask_to_be_replaced(
        &self,
        cause: &Result<serde_json::Value, crate::outcome::JobError>,
    ) {
        let why = match cause {
            Err(e) if e.device_lost => "the GPU no longer works",
            _ => "GPU out-of-memory failures keep repeating",
        };
        tracing::error!(
            "{why}: reporting unhealthy, draining, and asking to be replaced (stopPod)"
        );
        self.phase.set(Phase::Unhealthy);
        self.stop_taking.cancel();
    }
}

/// Runs a worker until `setup.shutdown` is cancelled (or the worker must be replaced) and
/// every taken job is answered.
pub async fn run_worker(setup: WorkerSetup) -> Result<WorkerExit, StartupError> {
    let WorkerSetup {
        config,
        endpoints,
        handlers,
        gpu,
        http_listener,
        shutdown,
        require_cuda,
    } = setup;
    let client = QueueClient::new(endpoints, config.queue.clone()).map_err(|e| StartupError {
        check: "queue",
        reason: e.to_string(),
    })?;
    // Ends the heartbeat, the stop channel and the HTTP server once every job is answered.
    let finished = CancellationToken::new();
    // Served from the start: during a cold start (models loading) `/ready` says 503 "starting".
    let slot = health::WorkerSlot::default();
    let http = tokio::spawn(health::serve(http_listener, slot.clone(), finished.clone()));
    let building = build_worker(config, handlers, gpu, client, &shutdown, require_cuda);
    let built = tokio::select! {
        built = building => built,
        // A worker stopped while its models load has no job to answer: exit now rather than
        // after the load (up to `[handler] timeout`).
        () = shutdown.cancelled() => {
            tracing::info!("stopped while starting: no job was taken");
            finished.cancel();
            let _ = http.await;
            return Ok(WorkerExit::Drained);
        }
    };
    let worker = match built {
        Ok(worker) => worker,
        Err(e) => {
            finished.cancel();
            let _ = http.await;
            return Err(e);
        }
    };
    let _ = slot.set(worker.observed.clone());
    log_start(&worker);

    let interval = Duration::from_millis(worker.config.gpu.sample_interval_ms);
    worker.sampler.spawn(interval, finished.clone());
    tokio::spawn(remeasure_resident(worker.clone(), finished.clone()));
    tokio::spawn(refresh_shared_ledgers(
        worker.clone(),
        interval,
        finished.clone(),
    ));
    let heartbeat = match heartbeat::spawn(&worker, finished.clone()) {
        Ok(heartbeat) => heartbeat,
        Err(reason) => {
            finished.cancel();
            let _ = http.await;
            return Err(StartupError {
                check: "heartbeat",
                reason,
            });
        }
    };
    let stop_loop = tokio::spawn(stop::run(worker.clone(), finished.clone()));
    tokio::spawn(resend_spooled(worker.clone()));
    worker.phase.set(Phase::Ready);
    take::run(worker.clone(), worker.stop_taking.clone()).await;

    drain(&worker).await;
    let replaced = worker.device_health.is_tripped();
    if replaced {
        // Also said through the heartbeat URL, the SDK's channel for an unhealthy worker, in
        // case no result was left to carry `stopPod`.
        let reason = "GPU failures: drained, asking to be replaced";
        if let Err(e) = worker.client.report_unhealthy("gpu", reason).await {
            tracing::warn!("could not report the failure to the queue: {e}");
        }
    }
    finished.cancel();
    let _ = stop_loop.await;
    let _ = http.await;
    let _ = tokio::task::spawn_blocking(move || heartbeat.join()).await;
    tracing::info!("all taken jobs answered; worker stopped");
    Ok(if replaced {
        WorkerExit::Replaced
    } else {
        WorkerExit::Drained
    })
}

/// Re-sends results spooled by an earlier run. Delivered, expired (404) and refused results
/// leave the spool; the others stay for the next start.
async fn resend_spooled(worker: Arc<Worker>) {
    // Directory and file reads (maybe on a network volume): not on an async thread.
    let spool = worker.spool.clone();
    let pending = tokio::task::spawn_blocking(move || spool.pending())
        .await
        .unwrap_or_default();
    if pending.is_empty() {
        return;
    }
    tracing::info!(
        "re-sending {} spooled result(s) from {}",
        pending.len(),
        worker.spool.dir().display()
    );
    let ours = url::Url::parse(&worker.client.endpoints().job_done)
        .map(|u| u.origin())
        .ok();
    for (path, result) in pending {
        // The spool may sit on a shared volume: never send our key to a URL someone else wrote.
        let origin = url::Url::parse(&result.url).map(|u| u.origin()).ok();
        if origin.is_none() || origin != ours {
            tracing::error!(
                job_id = %result.job_id,
                "spooled result targets another queue than RUNPOD_WEBHOOK_POST_OUTPUT; not sent, kept at {}",
                path.display()
            );
            continue;
        }
        match worker
            .client
            .deliver_to(&result.url, &result.job_id, &result.body)
            .await
        {
            Ok(()) => {
                tracing::info!(job_id = %result.job_id, "spooled result delivered");
                let spool = worker.spool.clone();
                let _ = tokio::task::spawn_blocking(move || spool.remove(&path)).await;
            }
            Err(
                e @ (crate::queue::client::DeliveryError::Gone(_)
                | crate::queue::client::DeliveryError::Rejected(_)),
            ) => {
                tracing::warn!(job_id = %result.job_id, "spooled result dropped: {e}");
                let spool = worker.spool.clone();
                let _ = tokio::task::spawn_blocking(move || spool.remove(&path)).await;
            }
            Err(e) => {
                tracing::warn!(job_id = %result.job_id, "spooled result still not delivered ({e}); kept")
            }
        }
    }
}

/// How often idle devices are checked for a resident re-measure (one only happens after jobs
/// ran there, and releases the allocator's cache first).
const RESIDENT_REMEASURE_EVERY: Duration = Duration::from_secs(10);

/// Re-measures the resident memory of devices that went idle after running jobs, off the job
/// path, until `stop`.
async fn remeasure_resident(worker: Arc<Worker>, stop: CancellationToken) {
    if worker.gpu_access != GpuAccess::Cuda {
        return;
    }
    let mut ticker = tokio::time::interval(RESIDENT_REMEASURE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let w = worker.clone();
        let _ = tokio::task::spawn_blocking(move || w.memory.remeasure_idle()).await;
    }
}

/// Re-reads the host-wide ledgers at the sampling pace, off the async threads, so take sizing
/// and `/health` see the peers' bookings without waiting for the file's lock.
async fn refresh_shared_ledgers(worker: Arc<Worker>, every: Duration, stop: CancellationToken) {
    if !worker.memory.ledgers().iter().any(|l| l.host().is_some()) {
        return;
    }
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let w = worker.clone();
        let _ = tokio::task::spawn_blocking(move || w.memory.refresh_shared()).await;
    }
}

/// Everything a worker needs before it can take jobs: the GPU probe and what libtorch can do
/// with it, the handlers (models loaded within `[handler].timeout`), memory admission with the
/// models' resident memory booked, and the limits.
async fn build_worker(
    config: Config,
    handlers: Option<HandlerSet>,
    gpu: Option<Arc<dyn GpuProbe>>,
    client: QueueClient,
    shutdown: &CancellationToken,
    require_cuda: bool,
) -> Result<Arc<Worker>, StartupError> {
    let mapping_error = |e: gpu::identity::MappingError| StartupError {
        check: "gpu_mapping",
        reason: e.to_string(),
    };
    let probe = match gpu {
        Some(probe) => probe,
        None => gpu::detect(&config.gpu).map_err(mapping_error)?,
    };
    let sampler = GpuSampler::new(probe);
    let devices = sampler.latest().devices.clone();
    let access = GpuAccess::check(sampler.probe().as_ref(), &devices).map_err(mapping_error)?;
    if let GpuAccess::Broken(why) = &access {
        if require_cuda {
            return Err(StartupError {
                check: "cuda",
                reason: why.clone(),
            });
        }
        tracing::warn!("{why}: CUDA handlers run on the CPU (degraded)");
    }
    let simulated = access == GpuAccess::Simulated;
    let declared_resident = if simulated {
        resident::declared(&config)
    } else {
        0
    };
    for device in &devices {
        validate_budget(&config, Size::from_bytes(device.total), declared_resident).map_err(
            |e| StartupError {
                check: "config",
                reason: e.to_string(),
            },
        )?;
    }
    let contexts = if access == GpuAccess::Cuda {
        let probe = sampler.probe().clone();
        tokio::task::spawn_blocking(move || resident::measure_contexts(probe.as_ref()))
            .await
            .unwrap_or_default()
    } else {
        Default::default()
    };
    let handlers = match handlers {
        Some(handlers) => handlers,
        None => load_handlers(&config, access.gpu_present(), simulated).await?,
    };
    let memory =
        MemoryAdmission::new(&config.gpu, &handlers, sampler.clone(), contexts).map_err(|e| {
            StartupError {
                check: "gpu_ledger",
                reason: format!("cannot open the host-wide GPU ledger: {e}"),
            }
        })?;
    let memory = Arc::new(memory);
    book_resident(&memory, &access, declared_resident).await;
    if let Some((handler, need, ledger)) = memory.handler_without_room(&handlers) {
        return Err(StartupError {
            check: "gpu_memory",
            reason: format!(
                "the models hold {} of GPU {} ({})'s budget of {}: no room for one {handler} job \
                 of {}; lower its gpu_memory or use a GPU with more memory",
                Size::from_bytes(ledger.resident()).approx(),
                ledger.device(),
                ledger.uuid(),
                Size::from_bytes(ledger.budget()).approx(),
                Size::from_bytes(need).approx(),
            ),
        });
    }
    let adaptive = if config.gpu.adaptive {
        handlers
            .entries()
            .map(|e| {
                (
                    e.name.clone(),
                    AdaptiveRule::new(config.gpu.grow_after_successes),
                )
            })
            .collect()
    } else {
        Default::default()
    };
    let limits = Limits::new(
        config.handler.max_concurrency as usize,
        handlers.entries().map(|e| (e.name.clone(), e.limit)),
    );
    let config_spool_dir = config.queue.spool_dir.clone();
    let max_consecutive_ooms = config.handler.max_consecutive_ooms;
    let observed = Arc::new(Observed {
        phase: PhaseCell::default(),
        handlers,
        limits: Arc::new(limits),
        memory,
        sampler,
        gpu_access: access,
        counters: JobCounters::default(),
        metrics: Metrics::new(),
        worker_id: client.endpoints().worker_id.clone(),
        adaptive: config.gpu.adaptive,
    });
    let worker = Arc::new(Worker {
        config: Arc::new(config),
        board: Arc::default(),
        client,
        interrupt: CancellationToken::new(),
        adaptive,
        tracker: TaskTracker::new(),
        spool: Spool::new(config_spool_dir),
        device_health: DeviceHealth::new(max_consecutive_ooms),
        stop_taking: shutdown.child_token(),
        observed,
    });
    Ok(worker)
}

/// Books each device's resident memory: declared on a simulated GPU, measured on a real one
/// (after the models loaded; no job runs yet).
async fn book_resident(memory: &Arc<MemoryAdmission>, access: &GpuAccess, declared: u64) {
    match access {
        GpuAccess::Simulated => {
            // A host-wide ledger is a file: booked off the async threads.
            let booking = memory.clone();
            let _ =
                tokio::task::spawn_blocking(move || booking.book_declared_resident(declared)).await;
        }
        GpuAccess::Cuda => {
            let measuring = memory.clone();
            let measured = tokio::task::spawn_blocking(move || measuring.measure_resident())
                .await
                .unwrap_or_default();
            for (ledger, reading) in measured {
                tracing::info!(
                    "GPU {} ({}): {} resident (models, CUDA context, allocator pool; {}), \
                     budget {}",
                    ledger.device(),
                    ledger.uuid(),
                    Size::from_bytes(reading.bytes).approx(),
                    reading.source.as_str(),
                    Size::from_bytes(ledger.budget()).approx()
                );
            }
        }
        GpuAccess::None | GpuAccess::Broken(_) => {}
    }
}

/// After the drain's interrupt (every job is answered then), how long to wait for model
/// threads that do not return before exiting without them.
const STUCK_THREADS_GRACE: Duration = Duration::from_secs(5);

/// Builds the handlers and loads their models on a blocking thread, within `[handler].timeout`.
async fn load_handlers(
    config: &Config,
    gpu_present: bool,
    simulated: bool,
) -> Result<HandlerSet, StartupError> {
    let timeout = Duration::from_secs(config.handler.timeout);
    let owned = config.clone();
    let loading =
        tokio::task::spawn_blocking(move || HandlerSet::build(&owned, gpu_present, simulated));
    let failed = |reason: String| StartupError {
        check: "model_load",
        reason,
    };
    match tokio::time::timeout(timeout, loading).await {
        Err(_) => Err(failed(format!(
            "loading the models took longer than [handler] timeout = {} s",
            timeout.as_secs()
        ))),
        Ok(Err(_)) => Err(failed("loading the models failed unexpectedly".to_owned())),
        Ok(Ok(Err(e))) => Err(failed(e.to_string())),
        Ok(Ok(Ok(handlers))) => Ok(handlers),
    }
}

/// The take loop has stopped: wait for the jobs in hand, then interrupt what is left.
async fn drain(worker: &Arc<Worker>) {
    worker.phase.set(Phase::Draining);
    worker.tracker.close();
    let held = worker.board.len();
    if held > 0 {
        tracing::info!("draining: {held} job(s) in hand");
    }
    if worker.device_health.is_tripped() {
        worker.phase.set(Phase::Unhealthy);
    }
    let grace = Duration::from_secs(worker.config.handler.drain_grace_s);
    let now = crate::shutdown::second_signal();
    let drained = tokio::select! {
        drained = tokio::time::timeout(grace, worker.tracker.wait()) => drained.is_ok(),
        () = now.cancelled() => false,
    };
    if !drained {
        tracing::warn!(
            "drain over ({}): answering the {} remaining job(s) `Interrupted`",
            if now.is_cancelled() {
                "second signal".to_owned()
            } else {
                format!("grace of {} s", grace.as_secs())
            },
            worker.board.len()
        );
        worker.interrupt.cancel();
        // Every job is answered now; what may remain are model calls that ignore cancellation.
        if tokio::time::timeout(STUCK_THREADS_GRACE, worker.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                "model threads still running {} s after the drain: exiting without them",
                STUCK_THREADS_GRACE.as_secs()
            );
        }
    }
}

fn log_start(worker: &Worker) {
    let (_, global) = worker.limits.global_usage();
    let handlers: Vec<String> = worker
        .handlers
        .entries()
        .map(|e| {
            let place = if e.on_gpu { "gpu" } else { "cpu" };
            format!("{} ({} at once, {place})", e.name, e.limit)
        })
        .collect();
    tracing::info!(
        "worker {} ready: up to {global} jobs at once; handlers: {}",
        worker.client.endpoints().worker_id,
        handlers.join(", ")
    );
    let why = worker.gpu_access.cpu_fallback_reason().unwrap_or_default();
    for entry in worker.handlers.entries() {
        if entry.gpu_fallback {
            tracing::warn!("{} asks for CUDA but {why}: it runs on the CPU", entry.name);
        }
        if let Err(reason) = &entry.handler {
            tracing::warn!("{}: {reason}; its jobs get a ModelError result", entry.name);
        }
    }
}
