//! Handlers: what runs a job once it is admitted. The [`Handler`] trait, the context a job
//! runs with, and the set of handlers built from `[handlers.<name>]`.

mod classify;
pub mod document;
mod echo;
mod extract;
pub mod fetch;
mod models;
pub mod openai;
pub mod parser;
mod registry;
mod stream_out;
mod tensors;
mod torchscript;
mod torchscript_batch;

use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::outcome::JobError;

pub use classify::{Classifier, ClassifyHandler, ClassifyMode};
pub use echo::EchoHandler;
pub use extract::{chunk_ranges, ExtractHandler};
pub use parser::{ParseLimits, ParserPool};
pub use registry::{BatchUse, HandlerEntry, HandlerId, HandlerSet, Routed};
pub use torchscript::TorchScriptHandler;

/// One kind of work, in two stages: [`Handler::prepare`] does what needs no GPU memory (check
/// the input, fetch and parse a document) and [`Handler::run`] the model work, which is the
/// only part that holds the job's GPU reservation. Implementations run model calls on blocking
/// threads, never on the async runtime, and check `ctx.cancel` at their safe points.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The CPU-only stage before GPU memory is reserved. By default there is none.
    async fn prepare(&self, ctx: &JobContext) -> Result<Prepared, JobError> {
        let _ = ctx;
        Ok(Prepared::nothing())
    }

    /// Runs one job to its output or its error, with what [`Handler::prepare`] made.
    async fn run(&self, ctx: JobContext, prepared: Prepared) -> Result<Value, JobError>;

    /// One small inference on each device's model copy, at start-up before the first take, so
    /// that the first job does not pay for libtorch's first calls (the profiling executor's
    /// runs, the CUDA kernels' loading). Blocking: called on a blocking thread. By default
    /// there is nothing to warm.
    fn warm_up(&self) -> Result<(), String> {
        Ok(())
    }

    /// The batchers its model work runs on. A handler with any does all its GPU work there,
    /// whose batches book their own memory: its jobs reserve none at admission. By default
    /// there are none (each job's model work runs on its own and is reserved for).
    fn batchers(&self) -> Vec<Arc<dyn crate::model::AnyBatcher>> {
        Vec::new()
    }
}

/// What a handler's prepare stage hands to its run stage (each handler knows its own type).
pub struct Prepared(Option<Box<dyn Any + Send>>);

impl Prepared {
    /// Nothing was prepared.
    pub fn nothing() -> Self {
        Self(None)
    }

    /// `value` was prepared.
    pub fn new<T: Send + 'static>(value: T) -> Self {
        Self(Some(Box::new(value)))
    }

    /// The prepared value, which must be a `T` (a mismatch is a bug, reported as `Internal`).
    pub fn take<T: 'static>(self) -> Result<T, JobError> {
        self.0
            .and_then(|value| value.downcast::<T>().ok())
            .map(|value| *value)
            .ok_or_else(|| JobError::internal("the handler's prepare stage did not run"))
    }
}

/// Where a job's stream chunks go (job-stream in the worker, stdout in `test-input`).
#[async_trait]
pub trait ChunkSink: Send + Sync {
    /// Delivers one chunk, in order.
    async fn send(&self, job_id: &str, chunk: Value) -> Result<(), JobError>;

    /// Delivers a progress update (`IN_PROGRESS` with a small output), best effort: a lost
    /// update costs the client a stale figure, never the job. By default it goes nowhere.
    async fn progress(&self, job_id: &str, update: Value) {
        let _ = (job_id, update);
    }
}

/// Everything a handler gets for one job.
#[derive(Clone)]
pub struct JobContext {
    /// The job id (for logs and stream chunks).
    pub job_id: String,
    /// `input`, already checked to be an object.
    pub input: Map<String, Value>,
    /// Set when the job is stopped, cancelled or out of time: stop at the next safe point.
    pub cancel: CancellationToken,
    /// Whether the worker runs on a simulated GPU (enables echo's test-only options).
    pub simulated_gpu: bool,
    /// The GPU admission reserved memory on, for handlers with a model on every GPU.
    pub device: Option<usize>,
    /// The largest output the job may return (`[queue] max_result_size`): handlers that can
    /// tell the size of their output before they build it refuse it early.
    pub max_output_bytes: u64,
    /// How often a long job sends a progress update (`[handler] progress_interval_ms`);
    /// `None`: never.
    pub progress_every: Option<std::time::Duration>,
    /// How long the job's rows may wait in a batcher for GPU memory (the local queue's
    /// bound); `None`: as long as the job runs.
    pub memory_wait: Option<std::time::Duration>,
    sink: Arc<dyn ChunkSink>,
    chunks_sent: Arc<AtomicUsize>,
    threads: TaskTracker,
    /// Progress POSTs, each run to its end even when the job ends mid-POST.
    progress_posts: TaskTracker,
    gpu_peak: Arc<AtomicU64>,
}

/// What every job's context takes from the worker's configuration: read once, so each place
/// that runs a job (the runner, `test-input`, the benchmarks) builds the same context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSettings {
    /// `[queue] max_result_size`.
    pub max_output_bytes: u64,
    /// `[handler] progress_interval_ms`; `None` when 0.
    pub progress_every: Option<std::time::Duration>,
    /// Whether the GPU is simulated (`[gpu] simulate`).
    pub simulated_gpu: bool,
}

impl JobSettings {
    /// The settings `config` gives, on a simulated GPU or not.
    pub fn from_config(config: &Config, simulated_gpu: bool) -> Self {
        let progress_ms = config.handler.progress_interval_ms;
        Self {
            max_output_bytes: config.queue.max_result_size.bytes(),
            progress_every: (progress_ms > 0)
                .then(|| std::time::Duration::from_millis(progress_ms)),
            simulated_gpu,
        }
    }

    /// No output limit and no progress updates, on a real GPU (the benchmarks).
    pub fn unbounded() -> Self {
        Self {
            max_output_bytes: u64::MAX,
            progress_every: None,
            simulated_gpu: false,
        }
    }
}

impl JobContext {
    /// The context of one job, whose chunks go to `sink`: the only way one is made.
    pub fn new(
        job_id: String,
        input: Map<String, Value>,
        sink: Arc<dyn ChunkSink>,
        settings: JobSettings,
    ) -> Self {
        Self {
            job_id,
            input,
            cancel: CancellationToken::new(),
            simulated_gpu: settings.simulated_gpu,
            device: None,
            max_output_bytes: settings.max_output_bytes,
            progress_every: settings.progress_every,
            memory_wait: None,
            sink,
            chunks_sent: Arc::new(AtomicUsize::new(0)),
            threads: TaskTracker::new(),
            progress_posts: TaskTracker::new(),
            gpu_peak: Arc::new(AtomicU64::new(0)),
        }
    }

    /// What the job hands a batcher with its rows: its cancellation and its memory wait.
    pub fn ticket(&self) -> crate::model::Ticket {
        crate::model::Ticket {
            cancel: self.cancel.clone(),
            memory_wait: self.memory_wait,
        }
    }

    /// Reports the job's peak GPU memory (bytes), which admission learns footprints from.
    pub fn report_gpu_peak(&self, bytes: u64) {
        self.gpu_peak.fetch_max(bytes, Ordering::AcqRel);
    }

    /// The peak reported, if any.
    pub fn gpu_peak(&self) -> Option<u64> {
        Some(self.gpu_peak.load(Ordering::Acquire)).filter(|b| *b > 0)
    }

    /// Runs `work` on a blocking thread (model calls never run on the async runtime). A panic
    /// there fails this job only. If the job ends first (timeout, stop), the thread's late
    /// result is discarded, and the job's slot and memory stay reserved until the thread has
    /// really returned, so they are never promised twice.
    pub async fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, JobError> {
        self.threads.spawn_blocking(work).await.map_err(|e| {
            if e.is_panic() {
                JobError::internal("the handler failed unexpectedly; the worker is still running")
            } else {
                JobError::internal("the handler's thread was cancelled")
            }
        })
    }

    /// Waits until every thread started by [`JobContext::run_blocking`] has returned.
    pub async fn threads_finished(&self) {
        self.threads.close();
        self.threads.wait().await;
    }

    /// Sends a progress update. Awaited in the handler, so it always reaches the queue before
    /// the job's final result (the SDK's fire-and-forget updates could land after it,
    /// runpod-python #250). The POST runs as a task of its own: when the job ends while it is
    /// in flight (its deadline, a stop), it still completes, and the result waits for it
    /// ([`JobContext::progress_delivered`]); a dropped request could otherwise reach the queue
    /// after the result.
    pub async fn progress(&self, update: Value) {
        let (sink, job_id) = (self.sink.clone(), self.job_id.clone());
        let post = self
            .progress_posts
            .spawn(async move { sink.progress(&job_id, update).await });
        let _ = post.await;
    }

    /// Waits until every progress update sent has been answered by the queue (or has failed):
    /// call it before the job's result is posted.
    pub async fn progress_delivered(&self) {
        self.progress_posts.close();
        self.progress_posts.wait().await;
    }

    /// Streams one chunk to the job's client (job-stream, `{"output": chunk}`).
    pub async fn stream(&self, chunk: Value) -> Result<(), JobError> {
        self.sink.send(&self.job_id, chunk).await?;
        self.chunks_sent.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// How many chunks were streamed (a job that streamed ends with `isStream=true`).
    pub fn chunks_sent(&self) -> usize {
        self.chunks_sent.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A queue whose progress POSTs take a while; it notes each one when it is answered.
    struct SlowProgress(Mutex<Vec<Value>>);

    #[async_trait]
    impl ChunkSink for SlowProgress {
        async fn send(&self, _: &str, _: Value) -> Result<(), JobError> {
            Ok(())
        }

        async fn progress(&self, _: &str, update: Value) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.0.lock().unwrap().push(update);
        }
    }

    #[tokio::test]
    async fn a_progress_update_cut_short_by_the_jobs_end_is_delivered_before_its_result() {
        let sink = Arc::new(SlowProgress(Mutex::default()));
        let ctx = JobContext::new(
            "p".into(),
            Map::new(),
            sink.clone(),
            JobSettings::unbounded(),
        );
        // The job's deadline ends the handler while the update is in flight.
        let cut = tokio::time::timeout(
            Duration::from_millis(20),
            ctx.progress(serde_json::json!({"chunks_done": 1})),
        )
        .await;
        assert!(cut.is_err(), "the handler was cut short mid-POST");
        assert!(sink.0.lock().unwrap().is_empty(), "not answered yet");
        // What the runner does before it posts the result.
        ctx.progress_delivered().await;
        assert_eq!(sink.0.lock().unwrap().len(), 1, "the update landed first");
    }
}
