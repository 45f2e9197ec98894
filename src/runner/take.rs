//! The take loop: asks the queue for as many jobs as could start now, and hands each to a job
//! task. It stops at once when the shutdown token is cancelled, abandoning a pending long-poll.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{job, Worker};
use crate::queue::{Backoff, QueueError};

/// A take held at least this long was a real long-poll: ask again at once.
const LONG_POLL_HELD: Duration = Duration::from_secs(1);

/// Runs until `shutdown` is cancelled.
pub(super) async fn run(worker: Arc<Worker>, shutdown: CancellationToken) {
    let queue = &worker.config.queue;
    let mut backoff = Backoff::new(
        Duration::from_millis(queue.backoff_initial_ms),
        Duration::from_millis(queue.backoff_max_ms),
    );
    while !shutdown.is_cancelled() {
        let wanted = worker
            .limits
            .takeable_with(|handler, slots| worker.memory.startable(handler, slots));
        if wanted == 0 {
            // Full: wait for a slot instead of polling (the SDK sleeps 1 s and re-checks). Memory
            // used by others changes without telling us, so re-check at the sampling rhythm too.
            let recheck = Duration::from_millis(worker.config.gpu.sample_interval_ms);
            tokio::select! {
                () = worker.limits.slot_freed() => continue,
                () = tokio::time::sleep(recheck) => continue,
                () = shutdown.cancelled() => break,
            }
        }
        let job_in_progress = !worker.board.is_empty();
        let started = Instant::now();
        let pause = match worker.client.take(wanted, job_in_progress, &shutdown).await {
            Ok(None) => break,
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
                for item in response.jobs {
                    job::dispatch(&worker, item);
                }
                let quick_and_empty = count == 0 && response.held < LONG_POLL_HELD;
                quick_and_empty.then(|| Duration::from_millis(queue.empty_poll_floor_ms))
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
                Some(Duration::from_secs(queue.rate_limited_wait_s))
            }
            Err(e) => {
                worker.metrics.takes.with_label_values(&["error"]).inc();
                let delay = backoff.next_delay();
                tracing::warn!(
                    "job-take failed after {:?}: {e}; retrying in {delay:?}",
                    started.elapsed()
                );
                Some(delay)
            }
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
