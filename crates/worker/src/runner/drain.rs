//! The drain: once the take loop has stopped, the jobs in hand finish within the grace, and
//! whatever is left is answered `Interrupted`; a second signal ends the wait at once.

use std::sync::Arc;
use std::time::Duration;

use super::Worker;
use crate::observed::Phase;

/// After the drain's interrupt (every job is answered then), how long to wait for model
/// threads that do not return before exiting without them.
const STUCK_THREADS_GRACE: Duration = Duration::from_secs(5);

/// The take loop has stopped: wait for the jobs in hand, then interrupt what is left.
pub(super) async fn drain(worker: &Arc<Worker>) {
    worker.phase.set(Phase::Draining);
    worker.tracker.close();
    let held = worker.board.len();
    if held > 0 {
        tracing::info!("draining: {held} job(s) in hand");
    }
    if worker.lessons.device_tripped() {
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
