//! The report stage's delivery: a job's result posted to the queue, replaced by a small error
//! when the queue refuses it, spooled when the queue cannot be reached in time, and its fate
//! recorded once. Stream chunks and progress updates go to the queue through [`QueueSink`].

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::Worker;
use crate::handlers::ChunkSink;
use crate::observed::JobEvent;
use crate::outcome::{done_body, refused_result, sized_done_body, DoneBody, JobError};
use crate::queue::client::DeliveryError;
use crate::queue::{QueueClient, SpooledResult};
use runpod_protocol::job::{id_problem, shown_id};

/// Posts the job's result and lets go of it. A result over the size limit becomes an
/// `OutputTooLarge` error (the platform would refuse it and the result would be lost); a result
/// the queue would not take in time goes to the spool, to be re-sent at the next start.
pub(super) async fn answer(
    worker: &Worker,
    job_id: &str,
    ran_by: Option<&str>,
    result: Result<Value, JobError>,
    streamed: bool,
) {
    if worker.direct.holds(job_id) {
        answer_request(worker, job_id, ran_by, result);
        return;
    }
    // A worker that must be replaced says so with its last result, once it has drained: the
    // platform may stop it as soon as it reads `stopPod`.
    let leaving = worker.lessons.device_tripped() || worker.recycler.requested();
    if leaving {
        // A take already answering when the worker stopped taking still brings its jobs in:
        // only once the take loop has ended is "the last result" really the last. Bounded,
        // for a worker stepped batch by batch (tests), where no take loop runs.
        let _ = tokio::time::timeout(TAKE_LOOP_END_WAIT, worker.take_loop_ended.cancelled()).await;
    }
    let stop_pod = leaving && worker.board.begin_answer(job_id);
    let limit = worker.config.queue.max_result_size.bytes();
    let (result, body) = sized_done_body(result, stop_pod, limit);
    worker.record(JobEvent::Answered {
        job_id,
        ran_by,
        result: &result,
    });
    if let Err(e) = &result {
        tracing::warn!(
            job_id = %shown_id(job_id),
            "job failed: {} ({})",
            e.message,
            e.error_type.as_str()
        );
    }
    // Posted (and retried, or spooled) within the budget of results in delivery.
    let _in_delivery = worker.delivery.enter(body.get().len()).await;
    match worker.client.post_done(job_id, &body, streamed).await {
        Ok(()) => {
            if result.is_ok() {
                worker.board.delivered(job_id);
            }
            tracing::debug!(job_id, "result delivered");
        }
        Err(DeliveryError::Gone(_)) => {
            undelivered(worker, "gone");
            tracing::warn!(
                job_id = %shown_id(job_id),
                "result dropped: the queue no longer knows the job (404): it expired or was \
                 handed to another worker"
            );
        }
        Err(DeliveryError::Rejected { status, reason }) => {
            let size = body.get().len() as u64;
            let replacement = refused_result(status, &reason, size);
            // Counted as what it became: an error result, not the output the queue refused.
            worker.record(JobEvent::Replaced {
                job_id,
                was_output: result.is_ok(),
                by: &replacement,
            });
            post_replacement(worker, job_id, replacement, stop_pod, streamed).await;
        }
        Err(error) if id_problem(job_id).is_some() => {
            // Re-sending it at every start would never work better: it is not kept. The error
            // may quote the URL, which holds the id: cut short.
            undelivered(worker, "dropped");
            let error: String = error.to_string().chars().take(200).collect();
            tracing::warn!(job_id = %shown_id(job_id), "result dropped: {error}");
        }
        Err(error) => spool(worker, job_id, body, streamed, &error).await,
    }
}

/// Answers a request's job (load-balancing mode) to the request waiting for it: no queue, no
/// size limit of the queue's, nothing to deliver or spool.
fn answer_request(
    worker: &Worker,
    job_id: &str,
    ran_by: Option<&str>,
    result: Result<Value, JobError>,
) {
    worker.record(JobEvent::Answered {
        job_id,
        ran_by,
        result: &result,
    });
    if let Err(e) = &result {
        tracing::warn!(
            job_id,
            "request failed: {} ({})",
            e.message,
            e.error_type.as_str()
        );
    }
    // Its client may have gone meanwhile (then nobody waits, and nothing is lost).
    let _ = worker.direct.answer(job_id, result);
}

/// Keeps a result the queue would not take in time, to be re-sent at the next start.
async fn spool(
    worker: &Worker,
    job_id: &str,
    body: DoneBody,
    streamed: bool,
    error: &DeliveryError,
) {
    let spooled = SpooledResult {
        job_id: job_id.to_owned(),
        url: worker.client.endpoints().done_url(job_id, streamed),
        body,
    };
    // A file write (maybe on a network volume): not on an async thread.
    let spool = worker.spool.clone();
    let saved = tokio::task::spawn_blocking(move || spool.save(&spooled))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    // Counted as what became of it, once that is known.
    match saved {
        Ok(path) => {
            undelivered(worker, "spooled");
            tracing::error!(
                job_id,
                "result could not be delivered ({error}); spooled at {} for the next start",
                path.display()
            );
        }
        Err(e) => {
            undelivered(worker, "lost");
            tracing::error!(
                job_id,
                "result could not be delivered ({error}) nor spooled ({e}): it is lost"
            );
        }
    }
}

/// How long a leaving worker's result waits for the take loop to end (a take's body gets 3 s).
const TAKE_LOOP_END_WAIT: Duration = Duration::from_secs(5);

/// Posts a small error result in place of one the queue refused, once: if the queue refuses
/// that too, the result is dropped (and counted); if it cannot be delivered, it is spooled.
async fn post_replacement(
    worker: &Worker,
    job_id: &str,
    replacement: JobError,
    stop_pod: bool,
    streamed: bool,
) {
    tracing::warn!(
        job_id = %shown_id(job_id),
        "{}; posting it as an {} error",
        replacement.message,
        replacement.error_type.as_str()
    );
    let body = done_body(&Err(replacement), stop_pod);
    match worker.client.post_done(job_id, &body, streamed).await {
        Ok(()) => undelivered(worker, "replaced"),
        Err(error @ (DeliveryError::Gone(_) | DeliveryError::Rejected { .. })) => {
            undelivered(worker, "rejected");
            tracing::warn!(job_id = %shown_id(job_id), "result dropped: {error}");
        }
        Err(error) => spool(worker, job_id, body, streamed, &error).await,
    }
}

/// Records a result the queue did not take (in `/health` and `/metrics`).
fn undelivered(worker: &Worker, fate: &str) {
    worker.record(JobEvent::Undelivered { fate });
}

/// Stream chunks go to job-stream.
pub(super) struct QueueSink(pub(super) QueueClient);

#[async_trait]
impl ChunkSink for QueueSink {
    async fn send(&self, job_id: &str, chunk: Value) -> Result<(), JobError> {
        self.0.post_stream(job_id, &chunk).await.map_err(|e| {
            tracing::error!(job_id, "stream chunk could not be delivered: {e}");
            JobError::internal("a stream chunk could not be delivered to the queue")
        })
    }

    async fn progress(&self, job_id: &str, update: Value) {
        if let Err(e) = self.0.post_progress(job_id, &update).await {
            tracing::warn!(job_id, "a progress update could not be delivered: {e}");
        }
    }
}
