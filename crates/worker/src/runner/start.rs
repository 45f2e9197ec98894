//! Start-up: everything a worker needs before it takes a job, and the log line that says it is
//! ready.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fitness::{self, Fitness};
use super::in_delivery::DeliveryBudget;
use super::recycle::Recycler;
use super::{StartupError, Worker};
use crate::admission::resident;
use crate::admission::{AdaptiveRule, Admitter, Lessons, Limits, MemoryAdmission};
use crate::config::{validate_budget, Config, Size};
use crate::gpu::sampler::GpuSampler;
use crate::gpu::{self, GpuAccess, GpuProbe};
use crate::handlers::{HandlerSet, JobSettings};
use crate::metrics::Metrics;
use crate::observed::{JobCounters, Observed, PhaseCell};
use crate::queue::{QueueClient, Spool};

/// Everything a worker needs before it can take jobs: the GPU probe and what libtorch can do
/// with it, the handlers (models loaded within `[handler].timeout`), memory admission with the
/// models' resident memory booked, and the limits.
/// What [`build_worker`] is told of the host it runs on.
pub(super) struct Host<'a> {
    /// Refuse to start where NVML sees a GPU that libtorch cannot use.
    pub(super) require_cuda: bool,
    /// The start-up checks.
    pub(super) fitness: &'a Fitness,
    /// The process holds more than this worker: its RSS is not the worker's.
    pub(super) shares_process: bool,
}

pub(super) async fn build_worker(
    config: Config,
    handlers: Option<HandlerSet>,
    gpu: Option<Arc<dyn GpuProbe>>,
    client: QueueClient,
    shutdown: &CancellationToken,
    host: Host<'_>,
) -> Result<Arc<Worker>, StartupError> {
    let Host {
        require_cuda,
        fitness,
        shares_process,
    } = host;
    let cold_start =
        Instant::now() + fitness.cold_start_budget(Duration::from_secs(config.handler.timeout));
    let mapping_error = |e: gpu::identity::MappingError| StartupError {
        check: "gpu_mapping",
        reason: e.to_string(),
    };
    let found = match gpu {
        Some(probe) => gpu::FoundGpu::check(probe),
        None => gpu::find(&config.gpu),
    };
    let gpu::FoundGpu {
        probe,
        devices,
        access,
    } = found.map_err(mapping_error)?;
    let sampler = GpuSampler::new(probe);
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
        config.declared_model_memory()
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
    Spool::new(config.queue.spool_dir.clone())
        .check_writable()
        .map_err(|reason| StartupError {
            check: "spool",
            reason,
        })?;
    let mut passed = {
        let (fitness, probe) = (fitness.clone(), sampler.probe().clone());
        let spool_dir = config.queue.spool_dir.clone();
        // statvfs on a network volume may stall: off the async threads, and within the budget.
        let checking = tokio::task::spawn_blocking(move || {
            fitness::check_host(&fitness, probe.as_ref(), &spool_dir)
        });
        within_cold_start("system_checks", cold_start, checking).await?
    };
    let contexts = if access == GpuAccess::Cuda {
        let probe = sampler.probe().clone();
        let contexts =
            tokio::task::spawn_blocking(move || resident::measure_contexts(probe.as_ref()))
                .await
                .unwrap_or_default();
        // After the contexts were measured (a context made here would hide their size).
        let fitness = fitness.clone();
        // A wedged card hangs rather than failing: bounded like the rest of the cold start.
        let checking = tokio::task::spawn_blocking(move || fitness::check_gpus(&fitness));
        passed.extend(within_cold_start("gpu_allocation", cold_start, checking).await?);
        contexts
    } else {
        Default::default()
    };
    if let Some(line) = fitness::summary(&passed) {
        tracing::info!("{line}");
    }
    let handlers = match handlers {
        Some(handlers) => handlers,
        None => load_handlers(&config, access.gpu_present(), simulated, cold_start).await?,
    };
    warm_up(&handlers, cold_start).await?;
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
    let limits = Limits::for_handlers(config.handler.max_concurrency as usize, &handlers);
    let config_spool_dir = config.queue.spool_dir.clone();
    let max_consecutive_ooms = config.handler.max_consecutive_ooms;
    let recycle_memory_factor = config.handler.recycle_memory_factor;
    let results_in_delivery = config.queue.max_results_in_delivery;
    let result_bytes_in_delivery = config.queue.max_result_bytes_in_delivery.bytes();
    let limits = Arc::new(limits);
    let (memory_for_lessons, limits_for_lessons) = (memory.clone(), limits.clone());
    let admitter = Admitter::new(limits.clone(), memory.clone());
    let job_settings = JobSettings::from_config(&config, sampler.probe().is_simulated());
    let observed = Arc::new(Observed {
        phase: PhaseCell::default(),
        handlers,
        limits,
        memory,
        sampler,
        gpu_access: access,
        counters: JobCounters::default(),
        metrics: Metrics::new(),
        worker_id: client.endpoints().worker_id.clone(),
        adaptive: config.gpu.adaptive,
        recent: Default::default(),
    });
    crate::admission::attach_batchers(
        &observed.handlers,
        &observed.memory,
        &observed.metrics.batches,
    );
    let worker = Arc::new(Worker {
        config: Arc::new(config),
        board: Arc::default(),
        client,
        interrupt: CancellationToken::new(),
        admitter,
        job_settings,
        lessons: Lessons::new(
            memory_for_lessons,
            limits_for_lessons,
            adaptive,
            max_consecutive_ooms,
        ),
        tracker: TaskTracker::new(),
        spool: Spool::new(config_spool_dir),
        stop_taking: shutdown.child_token(),
        take_loop_ended: CancellationToken::new(),
        recycler: Recycler::new(recycle_memory_factor, &observed.memory, !shares_process),
        delivery: DeliveryBudget::new(
            results_in_delivery,
            result_bytes_in_delivery,
            observed.limits.clone(),
        ),
        direct: Default::default(),
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

/// Runs each handler's warm-up inference (every device's copy) on a blocking thread, by
/// `cold_start`, and logs how long each took: the first job then runs at full speed.
async fn warm_up(handlers: &HandlerSet, cold_start: Instant) -> Result<(), StartupError> {
    let models: Vec<(String, Arc<dyn crate::handlers::Handler>)> = handlers
        .entries()
        .filter_map(|e| Some((e.name.clone(), e.handler.as_ref().ok()?.clone())))
        .collect();
    let warming = tokio::task::spawn_blocking(move || {
        let mut took = Vec::new();
        for (name, handler) in models {
            let started = Instant::now();
            handler
                .warm_up()
                .map_err(|reason| format!("{name}: {reason}"))?;
            took.push(format!("{name} {} ms", started.elapsed().as_millis()));
        }
        Ok::<_, String>(took)
    });
    let failed = |reason: String| StartupError {
        check: "warm_up",
        reason,
    };
    let budget = cold_start.saturating_duration_since(Instant::now());
    match tokio::time::timeout(budget, warming).await {
        Err(_) => Err(failed(
            "the warm-up inference ran past the cold-start budget ([handler] timeout, or \
             RUNPOD_INIT_TIMEOUT when smaller)"
                .to_owned(),
        )),
        Ok(Err(e)) => Err(join_failed("warm_up", &e)),
        Ok(Ok(Err(reason))) => Err(failed(format!(
            "a model failed its first inference: {reason}"
        ))),
        Ok(Ok(Ok(took))) => {
            tracing::info!("warm-up: {}", took.join(", "));
            Ok(())
        }
    }
}

/// A check's thread that panicked: a failed check, not a crash.
fn join_failed(check: &'static str, error: &tokio::task::JoinError) -> StartupError {
    StartupError {
        check,
        reason: format!("the check failed unexpectedly ({error})"),
    }
}

/// Awaits a start-up check's thread until `cold_start`: one that hangs fails the start (the
/// platform gets the unhealthy ping) instead of leaving the worker initializing for ever.
async fn within_cold_start<T>(
    check: &'static str,
    cold_start: Instant,
    checking: tokio::task::JoinHandle<Result<T, StartupError>>,
) -> Result<T, StartupError> {
    let budget = cold_start.saturating_duration_since(Instant::now());
    match tokio::time::timeout(budget, checking).await {
        Err(_) => Err(StartupError {
            check,
            reason: "the check ran past the cold-start budget ([handler] timeout, or \
                     RUNPOD_INIT_TIMEOUT when smaller)"
                .to_owned(),
        }),
        Ok(joined) => joined.unwrap_or_else(|e| Err(join_failed(check, &e))),
    }
}

/// Builds the handlers and loads their models on a blocking thread, by `cold_start` (the
/// smaller of `[handler] timeout` and `RUNPOD_INIT_TIMEOUT`, counted from the start).
async fn load_handlers(
    config: &Config,
    gpu_present: bool,
    simulated: bool,
    cold_start: Instant,
) -> Result<HandlerSet, StartupError> {
    let timeout = cold_start.saturating_duration_since(Instant::now());
    let owned = config.clone();
    let loading =
        tokio::task::spawn_blocking(move || HandlerSet::build(&owned, gpu_present, simulated));
    let failed = |reason: String| StartupError {
        check: "model_load",
        reason,
    };
    match tokio::time::timeout(timeout, loading).await {
        Err(_) => Err(failed(format!(
            "loading the models took longer than the cold-start budget ([handler] timeout = {} \
             s, or RUNPOD_INIT_TIMEOUT when smaller)",
            config.handler.timeout
        ))),
        Ok(Err(_)) => Err(failed("loading the models failed unexpectedly".to_owned())),
        Ok(Ok(Err(e))) => Err(failed(e.to_string())),
        Ok(Ok(Ok(handlers))) => Ok(handlers),
    }
}

pub(super) fn log_start(worker: &Worker) {
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
