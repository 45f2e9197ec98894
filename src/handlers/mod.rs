//! Handlers: what runs a job once it is admitted. The [`Handler`] trait, the context a job
//! runs with, and the set of handlers built from `[handlers.<name>]`.

mod classify;
pub mod document;
mod echo;
mod extract;
pub mod fetch;
mod models;
mod registry;
mod tensors;
mod torchscript;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::outcome::JobError;

pub use classify::{Classifier, ClassifyHandler, ClassifyMode};
pub use echo::EchoHandler;
pub use extract::{chunk_ranges, ExtractHandler};
pub use registry::{HandlerEntry, HandlerSet, Routed};
pub use torchscript::TorchScriptHandler;

/// One kind of work. Implementations run model calls on blocking threads, never on the async
/// runtime, and check `ctx.cancel` at their safe points.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one job to its output or its error.
    async fn run(&self, ctx: JobContext) -> Result<Value, JobError>;
}

/// Where a job's stream chunks go (job-stream in the worker, stdout in `test-input`).
#[async_trait]
pub trait ChunkSink: Send + Sync {
    /// Delivers one chunk, in order.
    async fn send(&self, job_id: &str, chunk: Value) -> Result<(), JobError>;
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
    sink: Arc<dyn ChunkSink>,
    chunks_sent: Arc<AtomicUsize>,
    threads: TaskTracker,
    gpu_peak: Arc<AtomicU64>,
}

impl JobContext {
    /// A context whose chunks go to `sink`.
    pub fn new(
        job_id: String,
        input: Map<String, Value>,
        sink: Arc<dyn ChunkSink>,
        cancel: CancellationToken,
        simulated_gpu: bool,
    ) -> Self {
        Self {
            job_id,
            input,
            cancel,
            simulated_gpu,
            device: None,
            sink,
            chunks_sent: Arc::new(AtomicUsize::new(0)),
            threads: TaskTracker::new(),
            gpu_peak: Arc::new(AtomicU64::new(0)),
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
