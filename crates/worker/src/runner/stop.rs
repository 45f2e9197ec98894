//! The stop channel: long-polls job-stop and abandons the jobs the queue names.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::queue::{Backoff, QueueError};

/// An empty answer faster than this means the queue is not long-polling: pause before the next.
const QUICK_ANSWER: Duration = Duration::from_secs(1);

/// Runs until `finished`: through the drain too, so a job can still be stopped while draining.
pub(super) async fn run(worker: Arc<Worker>, finished: CancellationToken) {
    if worker.client.endpoints().stop_url().is_none() {
        tracing::warn!(
            "RUNPOD_WEBHOOK_GET_JOB has no /job-take/ in its path: the stop channel is off"
        );
        return;
    }
    let queue = &worker.config.queue;
    let mut backoff = Backoff::new(
        Duration::from_millis(queue.backoff_initial_ms),
        Duration::from_millis(queue.backoff_max_ms),
    );
    loop {
        let started = Instant::now();
        let answer = tokio::select! {
            answer = worker.client.poll_stop() => answer,
            () = finished.cancelled() => return,
        };
        let pause = match answer {
            Ok(ids) => {
                backoff.reset();
                for id in &ids {
                    if worker.board.cancel(id) {
                        tracing::info!(job_id = %id, "stop signal: abandoning the job; no result is posted");
                    } else {
                        tracing::debug!(job_id = %id, "stop signal for a job this worker does not hold");
                    }
                }
                let quick = started.elapsed() < QUICK_ANSWER;
                (ids.is_empty() && quick)
                    .then(|| Duration::from_millis(queue.empty_poll_floor_ms).max(QUICK_ANSWER))
            }
            Err(QueueError::RateLimited) => Some(Duration::from_secs(queue.rate_limited_wait_s)),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!("stop channel: {e}; retrying in {delay:?}");
                Some(delay)
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = finished.cancelled() => return,
            }
        }
    }
}
