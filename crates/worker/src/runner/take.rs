//! The take loop: asks the queue for as many jobs as could start now, and hands each to a job
//! task. It stops at once when the shutdown token is cancelled, abandoning a pending long-poll.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{job, Worker};
use crate::queue::{Backoff, QueueError};

/// A take held at least this long was a real long-poll: ask again at once.
const LONG_POLL_HELD: Duration = Duration::from_secs(1);

/// What one turn of the take loop did.
pub(super) enum Step {
    /// Jobs were taken and handed to their tasks (their handles); pause this long, if at all,
    /// before the next take.
    Took(Vec<JoinHandle<()>>, Option<Duration>),
    /// Nothing taken (an error, a rate limit); pause this long.
    Pause(Duration),
    /// `shutdown` was cancelled.
    Stopped,
}

/// One turn: waits until some job could start, asks the queue for as many as could, and hands
/// each to a job task.
pub(super) async fn take_once(
    worker: &Arc<Worker>,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Step {
    let queue = &worker.config.queue;
    let wanted = loop {
        let wanted = worker.admitter.takeable();
        if wanted > 0 {
            break wanted;
        }
        // Full: wait for a slot instead of polling (the SDK sleeps 1 s and re-checks). Memory
        // used by others changes without telling us, so re-check at the sampling rhythm too.
        let recheck = Duration::from_millis(worker.config.gpu.sample_interval_ms);
        tokio::select! {
            () = worker.limits.slot_freed() => {}
            () = tokio::time::sleep(recheck) => {}
            () = shutdown.cancelled() => return Step::Stopped,
        }
    };
    let job_in_progress = !worker.board.is_empty();
    let started = Instant::now();
    match worker.client.take(wanted, job_in_progress, shutdown).await {
        Ok(None) => Step::Stopped,
        Ok(Some(response)) => {
            backoff.reset();
            let count = response.jobs.len();
            worker
                .metrics
                .takes
                .with_label_values(&[if count == 0 { "empty" } else { "jobs" }])
                .inc();
            if count > wanted {
                tracing::warn!("asked for {wanted} job(s), the queue sent {count}: the extra ones wait for a slot");
            }
            let handles = response
                .jobs
                .into_iter()
                .filter_map(|item| job::dispatch(worker, item))
                .collect();
            let quick_and_empty = count == 0 && response.held < LONG_POLL_HELD;
            let pause = quick_and_empty.then(|| Duration::from_millis(queue.empty_poll_floor_ms));
            Step::Took(handles, pause)
        }
        Err(QueueError::RateLimited) => {
            worker
                .metrics
                .takes
                .with_label_values(&["rate_limited"])
                .inc();
            tracing::warn!(
                "job-take: the queue asked us to slow down (429); waiting {} s",
                queue.rate_limited_wait_s
            );
            Step::Pause(Duration::from_secs(queue.rate_limited_wait_s))
        }
        Err(e) => {
            worker.metrics.takes.with_label_values(&["error"]).inc();
            let delay = backoff.next_delay();
            tracing::warn!(
                "job-take failed after {:?}: {e}; retrying in {delay:?}",
                started.elapsed()
            );
            Step::Pause(delay)
        }
    }
}

/// A fresh backoff with the configured bounds.
pub(super) fn backoff_for(worker: &Worker) -> Backoff {
    Backoff::new(
        Duration::from_millis(worker.config.queue.backoff_initial_ms),
        Duration::from_millis(worker.config.queue.backoff_max_ms),
    )
}

/// Runs until `shutdown` is cancelled.
pub(super) async fn run(worker: Arc<Worker>, shutdown: CancellationToken) {
    let mut backoff = backoff_for(&worker);
    while !shutdown.is_cancelled() {
        let pause = match take_once(&worker, &shutdown, &mut backoff).await {
            Step::Stopped => break,
            Step::Took(_, pause) => pause,
            Step::Pause(pause) => Some(pause),
        };
        if let Some(pause) = pause.filter(|p| !p.is_zero()) {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => break,
            }
        }
    }
    tracing::info!("no longer taking jobs");
}
