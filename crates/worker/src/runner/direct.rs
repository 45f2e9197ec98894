//! Jobs that arrive as HTTP requests (load-balancing mode) instead of from a queue. Each one runs
//! the stages a taken job runs, from [`dispatch`](super::job::dispatch) on (admit, prepare,
//! reserve, execute, release), under the same limits and memory ledger; only its answer, its
//! stream chunks and its progress go back to the request waiting for it, not to a queue.
//!
//! What a queue does for a taken job is done here: a bound on what waits (past it, a request is
//! refused at once with the retry signal), a deadline from the request's arrival, and a stop
//! when the client goes away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::{job, Worker};
use crate::handlers::ChunkSink;
use crate::outcome::{ErrorType, JobError};
use crate::queue::Job;

/// Stream chunks a request may have waiting to be written before the job's next chunk waits
/// for the client: a slow reader slows its own job, never the worker's memory.
const CHUNKS_IN_FLIGHT: usize = 16;

/// A finished request's answer: the job's result and its times, as `/runsync` reports them.
#[derive(Debug)]
pub struct DirectAnswer {
    /// The job id the worker gave the request (in logs and in the reply).
    pub id: String,
    /// The output, or the error result.
    pub result: Result<Value, JobError>,
    /// From arrival to the start of its work (admission's wait).
    pub delay: Duration,
    /// From the start of its work to its result.
    pub execution: Duration,
}

/// Why a request was not taken at all.
#[derive(Debug)]
pub enum NotTaken {
    /// The worker is draining (SIGTERM) or must be replaced: it takes nothing new.
    Draining,
    /// As many requests as may wait already do: the retry signal, at once.
    Full(JobError),
}

/// The requests in flight, by job id: where each one's answer and chunks go.
#[derive(Default)]
pub(crate) struct DirectReplies {
    waiting: Mutex<HashMap<String, Reply>>,
}

struct Reply {
    answer: oneshot::Sender<DirectAnswer>,
    chunks: Option<mpsc::Sender<Value>>,
    arrived: Instant,
    started: Option<Instant>,
}

impl DirectReplies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Reply>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the request's work as started (its admission wait is over).
    pub(super) fn started(&self, job_id: &str) {
        if let Some(reply) = self.lock().get_mut(job_id) {
            reply.started = Some(Instant::now());
        }
    }

    /// Whether `job_id` is a request's job (not a queue's) that has not ended.
    pub(super) fn holds(&self, job_id: &str) -> bool {
        self.lock().contains_key(job_id)
    }

    /// Hands `result` to the request waiting for `job_id`; `false` if none waits (any more).
    pub(super) fn answer(&self, job_id: &str, result: Result<Value, JobError>) -> bool {
        let Some(reply) = self.lock().remove(job_id) else {
            return false;
        };
        let now = Instant::now();
        let started = reply.started.unwrap_or(now);
        // A client that went away gets nothing: its job was stopped, or ended meanwhile.
        let _ = reply.answer.send(DirectAnswer {
            id: job_id.to_owned(),
            result,
            delay: started.saturating_duration_since(reply.arrived),
            execution: now.saturating_duration_since(started),
        });
        true
    }

    /// Where the job's chunks go, if it is a request's: the request's stream, or nowhere for a
    /// request that does not stream (as `/runsync` on the queue, it gets the final output).
    pub(super) fn sink(&self, job_id: &str) -> Option<Arc<dyn ChunkSink>> {
        let waiting = self.lock();
        let reply = waiting.get(job_id)?;
        Some(Arc::new(RequestSink(reply.chunks.clone())))
    }

    /// A request's job that was stopped (its client went away) ends without an answer.
    pub(super) fn forget(&self, job_id: &str) -> bool {
        self.lock().remove(job_id).is_some()
    }
}

/// A request's stream chunks (none, for a request that does not stream).
struct RequestSink(Option<mpsc::Sender<Value>>);

#[async_trait]
impl ChunkSink for RequestSink {
    async fn send(&self, _job_id: &str, chunk: Value) -> Result<(), JobError> {
        let Some(chunks) = &self.0 else {
            return Ok(());
        };
        chunks.send(chunk).await.map_err(|_| {
            JobError::new(
                ErrorType::Interrupted,
                "the client closed the stream before the job ended",
            )
        })
    }
}

/// Submits HTTP requests as jobs to a started worker (load-balancing mode).
#[derive(Clone)]
pub struct Submitter {
    pub(super) worker: Arc<Worker>,
}

/// A request that was taken: its answer, its chunks if it streams, and the guard that stops its
/// job if the request is dropped (the client went away) before the answer came.
pub struct PendingJob {
    /// The job id given to the request.
    pub id: String,
    /// The answer, once the job ends.
    pub answer: oneshot::Receiver<DirectAnswer>,
    /// The stream chunks, in order, when the request asked to stream.
    pub chunks: Option<mpsc::Receiver<Value>>,
    _stop_if_dropped: StopIfDropped,
}

struct StopIfDropped {
    worker: Arc<Worker>,
    id: String,
}

impl Drop for StopIfDropped {
    fn drop(&mut self) {
        // Answered already: nothing to stop. Otherwise the client is gone: stop its job, so
        // its slot and memory go back (it ends as a job the queue stopped, unanswered).
        if self.worker.direct.holds(&self.id) && !self.worker.board.cancel(&self.id) {
            // Not on the board: its task ended without answering (a panic). Nothing will
            // answer it now; its place in the waiting room goes back.
            self.worker.direct.forget(&self.id);
        }
    }
}

impl Submitter {
    /// Takes a request as a job: `input` and `policy` as a `/runsync` body carries them.
    /// `deadline` is the request's whole time from now (the job's `policy.executionTimeout`,
    /// as a queue would count it from the take). Refused at once while draining, or when
    /// `max_waiting` requests already wait beyond those that can run.
    pub fn submit(
        &self,
        input: Value,
        deadline: Duration,
        stream: bool,
    ) -> Result<PendingJob, NotTaken> {
        let worker = &self.worker;
        if worker.stop_taking.is_cancelled() {
            return Err(NotTaken::Draining);
        }
        let id = format!("lb-{}", uuid::Uuid::new_v4());
        let (answer_tx, answer) = oneshot::channel();
        let (chunks_tx, chunks) = if stream {
            let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        {
            let mut waiting = worker.direct.lock();
            let (_, global_limit) = worker.limits.global_usage();
            let room = global_limit + worker.config.server.max_waiting;
            if waiting.len() >= room {
                return Err(NotTaken::Full(self.waiting_room_full(waiting.len())));
            }
            waiting.insert(
                id.clone(),
                Reply {
                    answer: answer_tx,
                    chunks: chunks_tx,
                    arrived: Instant::now(),
                    started: None,
                },
            );
        }
        let mut raw = Map::new();
        raw.insert("id".into(), json!(id));
        raw.insert("input".into(), input.clone());
        raw.insert(
            "policy".into(),
            json!({ "executionTimeout": deadline.as_millis() as u64 }),
        );
        let pending = PendingJob {
            id: id.clone(),
            answer,
            chunks,
            _stop_if_dropped: StopIfDropped {
                worker: worker.clone(),
                id: id.clone(),
            },
        };
        // The task it spawns answers through `direct` (every way a job ends answers, or the
        // guard above forgets it).
        let _ = job::dispatch(worker, Ok(Job { id, input, raw }));
        Ok(pending)
    }

    /// The retry signal for a request refused because the waiting room is full: when memory
    /// should free up for a GPU worker, the local wait's figure otherwise.
    fn waiting_room_full(&self, in_flight: usize) -> JobError {
        let worker = &self.worker;
        let retry_after = if worker.memory.ledgers().is_empty() {
            worker.config.gpu.retry_after_min_s.max(1)
        } else {
            worker.memory.retry_after()
        };
        JobError {
            retry_after: Some(retry_after),
            ..JobError::new(
                ErrorType::InsufficientGpuMemory,
                format!(
                    "the worker is full ({in_flight} requests running or waiting); retry shortly"
                ),
            )
        }
    }

    /// Whether the worker still takes requests.
    pub fn is_taking(&self) -> bool {
        !self.worker.stop_taking.is_cancelled()
    }
}
