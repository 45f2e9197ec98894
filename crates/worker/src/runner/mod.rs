//! The worker: the take loop, the job tasks, the heartbeat and the stop channel, and the drain
//! that ends them.
//!
//! One rule runs through it: capacity is reserved before work is taken. The take loop asks
//! the limits and memory how many jobs could start, takes at most that many (less what takes
//! in flight asked for), and gives each a global slot, held until its work has stopped; its
//! result then holds a place in the delivery budget until it is answered. A job's life then reads top to bottom in
//! [`job`]: admit (slots, `admission::Admitter`), prepare (fetch and parse, CPU only), reserve
//! (GPU memory), execute (model work), release (slot and memory, before the result is
//! posted), report (deliver or spool), all under one cancel arm ([`Bounds`]); a [`HeldJob`]
//! keeps it on the heartbeat board until it ends, whichever way. Every taken job is answered, even at SIGTERM, except a job the
//! queue itself stopped (the SDK's behaviour).

mod background;
mod board;
mod delivery;
mod direct;
mod drain;
mod execute;
pub mod fitness;
mod heartbeat;
mod in_delivery;
mod job;
mod recycle;
mod start;
mod stop;
mod take;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admitter, Lessons};
use crate::config::Config;
use crate::gpu::GpuProbe;
use crate::handlers::HandlerSet;
use crate::handlers::JobSettings;
use crate::health;
use crate::observed::{Observed, Phase, WorkerSlot};
use crate::queue::{QueueClient, QueueEndpoints, Spool};

pub use board::{HeldJob, JobBoard};
pub use direct::{DirectAnswer, NotTaken, PendingJob, Submitter};
pub use execute::{execute, prepare, run, Bounds, Deadline, Execution, LimitSource};
pub use fitness::Fitness;

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
    /// The start-up checks (`serve`: the SDK's variables; tests and `local`: none).
    pub fitness: Fitness,
    /// The pages served beside `/health` on the worker's port (the binary's console).
    pub pages: Option<PortPages>,
    /// Whether the process holds more than this worker (`local`: the queue, its jobs and
    /// their results). Its resident memory (RSS) then says nothing about a leak in the worker,
    /// so `recycle_memory_factor` watches only the GPUs' resident memory.
    pub shares_process: bool,
}

/// Builds the pages served beside `/health` on the worker's port from the worker's observed
/// state and the token that ends them: the binary passes its console, so this library never
/// depends on it.
pub type PortPages = Box<dyn FnOnce(WorkerSlot, CancellationToken) -> axum::Router + Send>;

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
    /// How many jobs to take, each job's slots and memory, the OOM retry signal, peaks.
    pub(crate) admitter: Admitter,
    /// What finished jobs teach admission, and whether the device is still fit.
    pub(crate) lessons: Lessons,
    /// What each job's context takes from the configuration.
    pub(crate) job_settings: JobSettings,
    pub(crate) tracker: TaskTracker,
    pub(crate) spool: Spool,
    /// Cancelled to stop taking: by the shutdown signal, or when the worker must be replaced.
    pub(crate) stop_taking: CancellationToken,
    /// Cancelled once the take loop has returned: no job can arrive any more.
    pub(crate) take_loop_ended: CancellationToken,
    /// What `/health` and `/metrics` read.
    pub(crate) observed: Arc<Observed>,
    /// Whether the worker should be replaced on purpose (`refresh_worker`, memory growth).
    pub(crate) recycler: recycle::Recycler,
    /// Results being posted: bounded apart from the job slots (see [`in_delivery`]).
    pub(crate) delivery: in_delivery::DeliveryBudget,
    /// The requests in flight in load-balancing mode, answered to their clients (see [`direct`]).
    pub(crate) direct: direct::DirectReplies,
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
    /// It asked for a fresh worker on purpose (`refresh_worker`, memory growth) and drained.
    Refreshed,
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

    /// Asks for a fresh worker after a finished job when `refresh_worker` is set or memory has
    /// grown past its factor: stops taking; the last result carries `stopPod`.
    pub(crate) fn refresh_if_due(&self) {
        let reason = if self.config.handler.refresh_worker {
            Some("refresh_worker is set: a fresh worker after every job".to_owned())
        } else {
            self.recycler.grown(&self.memory)
        };
        let Some(reason) = reason else {
            return;
        };
        if self.recycler.request(reason.clone()) {
            tracing::warn!("{reason}: draining and asking for a fresh worker (stopPod)");
            self.stop_taking.cancel();
        }
    }
}

/// Runs a worker until `setup.shutdown` is cancelled (or the worker must be replaced) and
/// every taken job is answered.
pub async fn run_worker(setup: WorkerSetup) -> Result<WorkerExit, StartupError> {
    match start_worker(setup).await? {
        Some(started) => Ok(started.run().await),
        None => Ok(WorkerExit::Drained),
    }
}

/// A worker that has started (models loaded; heartbeat, stop channel, HTTP endpoints and
/// background tasks running) and takes jobs when told to: [`StartedWorker::run_next_batch`]
/// takes, runs and reports one batch (tests step the worker with it), [`StartedWorker::run`]
/// takes until shutdown and drains.
pub struct StartedWorker {
    worker: Arc<Worker>,
    /// Ends the heartbeat, the stop channel and the HTTP server.
    finished: CancellationToken,
    http: tokio::task::JoinHandle<()>,
    /// The queue's heartbeat and stop channel (none in load-balancing mode).
    heartbeat: Option<std::thread::JoinHandle<()>>,
    stop_loop: Option<tokio::task::JoinHandle<()>>,
}

/// Where a worker's jobs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobSource {
    /// Taken from the queue, which is pinged, polled for stops and sent the spooled results.
    Queue,
    /// HTTP requests (load-balancing mode): no queue is ever contacted.
    Requests,
}

/// Starts a worker; `None` if `setup.shutdown` came while it was starting (it took nothing).
pub async fn start_worker(setup: WorkerSetup) -> Result<Option<StartedWorker>, StartupError> {
    start(setup, JobSource::Queue).await
}

/// Starts a worker that serves HTTP requests (load-balancing mode) through
/// [`StartedWorker::submitter`] instead of taking jobs from a queue: `setup.endpoints` is never
/// contacted. `None` if `setup.shutdown` came while it was starting.
pub async fn start_for_requests(setup: WorkerSetup) -> Result<Option<StartedWorker>, StartupError> {
    start(setup, JobSource::Requests).await
}

async fn start(
    setup: WorkerSetup,
    source: JobSource,
) -> Result<Option<StartedWorker>, StartupError> {
    let WorkerSetup {
        config,
        endpoints,
        handlers,
        gpu,
        http_listener,
        shutdown,
        require_cuda,
        fitness,
        pages,
        shares_process,
    } = setup;
    let client = QueueClient::new(endpoints, config.queue.clone()).map_err(|e| StartupError {
        check: "queue",
        reason: e.to_string(),
    })?;
    let finished = CancellationToken::new();
    // Served from the start: during a cold start (models loading) `/ready` says 503 "starting".
    let slot = WorkerSlot::default();
    let pages = pages.map_or_else(axum::Router::new, |build| {
        build(slot.clone(), finished.clone())
    });
    let http = tokio::spawn(health::serve(
        http_listener,
        slot.clone(),
        pages,
        finished.clone(),
    ));
    let building = start::build_worker(
        config,
        handlers,
        gpu,
        client,
        &shutdown,
        start::Host {
            require_cuda,
            fitness: &fitness,
            shares_process,
        },
    );
    let built = tokio::select! {
        built = building => built,
        // A worker stopped while its models load has no job to answer: exit now rather than
        // after the load (up to `[handler] timeout`).
        () = shutdown.cancelled() => {
            tracing::info!("stopped while starting: no job was taken");
            finished.cancel();
            let _ = http.await;
            return Ok(None);
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
    start::log_start(&worker);

    let interval = Duration::from_millis(worker.config.gpu.sample_interval_ms);
    worker.sampler.spawn(interval, finished.clone());
    tokio::spawn(background::remeasure_resident(
        worker.clone(),
        finished.clone(),
    ));
    tokio::spawn(background::refresh_shared_ledgers(
        worker.clone(),
        interval,
        finished.clone(),
    ));
    let (heartbeat, stop_loop) = if source == JobSource::Queue {
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
        tokio::spawn(background::resend_spooled(worker.clone()));
        (Some(heartbeat), Some(stop_loop))
    } else {
        (None, None)
    };
    worker.phase.set(Phase::Ready);
    Ok(Some(StartedWorker {
        worker,
        finished,
        http,
        heartbeat,
        stop_loop,
    }))
}

impl StartedWorker {
    /// Takes one batch (waiting until some job could start, then as many as could), runs it,
    /// and returns once every job of it is answered: how many jobs it brought.
    pub async fn run_next_batch(&self) -> usize {
        let mut backoff = take::backoff_for(&self.worker);
        match take::take_once(&self.worker, &self.worker.stop_taking, &mut backoff).await {
            take::Step::Took(handles, _, _) => {
                let count = handles.len();
                for handle in handles {
                    let _ = handle.await;
                }
                count
            }
            take::Step::Pause(_) | take::Step::Stopped => 0,
        }
    }

    /// What `/health` would answer now.
    pub fn health(&self) -> serde_json::Value {
        health::health_report(&self.worker.observed).1
    }

    /// Takes jobs until shutdown (or until the worker must be replaced), drains, and stops.
    pub async fn run(self) -> WorkerExit {
        take::run(self.worker.clone(), self.worker.stop_taking.clone()).await;
        self.stop().await
    }

    /// Submits HTTP requests as jobs (load-balancing mode), while the worker takes them.
    pub fn submitter(&self) -> Submitter {
        Submitter {
            worker: self.worker.clone(),
        }
    }

    /// Serves requests through [`StartedWorker::submitter`] until shutdown (or until the worker
    /// must be replaced): from then on new requests are refused, and the ones in flight finish
    /// within the drain's grace before it stops.
    pub async fn serve_requests(self) -> WorkerExit {
        self.worker.stop_taking.cancelled().await;
        self.stop().await
    }

    /// No job can arrive any more: drain, say goodbye to the queue, stop.
    async fn stop(self) -> WorkerExit {
        let StartedWorker {
            worker,
            finished,
            http,
            heartbeat,
            stop_loop,
        } = self;
        worker.take_loop_ended.cancel();
        drain::drain(&worker).await;
        let replaced = worker.lessons.device_tripped();
        if replaced && heartbeat.is_some() {
            // Also said through the heartbeat URL, the SDK's channel for an unhealthy worker, in
            // case no result was left to carry `stopPod`.
            let reason = "GPU failures: drained, asking to be replaced";
            if let Err(e) = worker.client.report_unhealthy("gpu", reason).await {
                tracing::warn!("could not report the failure to the queue: {e}");
            }
        }
        finished.cancel();
        if let Some(stop_loop) = stop_loop {
            let _ = stop_loop.await;
        }
        let _ = http.await;
        if let Some(heartbeat) = heartbeat {
            let _ = tokio::task::spawn_blocking(move || heartbeat.join()).await;
        }
        tracing::info!("all taken jobs answered; worker stopped");
        if replaced {
            WorkerExit::Replaced
        } else if worker.recycler.requested() {
            WorkerExit::Refreshed
        } else {
            WorkerExit::Drained
        }
    }
}
