//! The worker's background tasks besides the take loop and the heartbeat: re-sending results
//! spooled by an earlier run, re-measuring the resident GPU memory when a device is idle, and
//! re-reading the host-wide ledgers, all off the job path and off the async threads' I/O.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::gpu::GpuAccess;

/// Re-sends results spooled by an earlier run. Delivered, expired (404) and refused results
/// leave the spool; the others stay for the next start.
pub(super) async fn resend_spooled(worker: Arc<Worker>) {
    // Directory and file reads (maybe on a network volume): not on an async thread.
    let spool = worker.spool.clone();
    let pending = tokio::task::spawn_blocking(move || spool.pending())
        .await
        .unwrap_or_default();
    if pending.is_empty() {
        return;
    }
    tracing::info!(
        "re-sending {} spooled result(s) from {}",
        pending.len(),
        worker.spool.dir().display()
    );
    let ours = url::Url::parse(&worker.client.endpoints().job_done)
        .map(|u| u.origin())
        .ok();
    for (path, result) in pending {
        // The spool may sit on a shared volume: never send our key to a URL someone else wrote.
        let origin = url::Url::parse(&result.url).map(|u| u.origin()).ok();
        if origin.is_none() || origin != ours {
            tracing::error!(
                job_id = %result.job_id,
                "spooled result targets another queue than RUNPOD_WEBHOOK_POST_OUTPUT; not sent, kept at {}",
                path.display()
            );
            continue;
        }
        match worker
            .client
            .deliver_to(&result.url, &result.job_id, &result.body)
            .await
        {
            Ok(()) => {
                tracing::info!(job_id = %result.job_id, "spooled result delivered");
                let spool = worker.spool.clone();
                let _ = tokio::task::spawn_blocking(move || spool.remove(&path)).await;
            }
            Err(
                e @ (crate::queue::client::DeliveryError::Gone(_)
                | crate::queue::client::DeliveryError::Rejected { .. }),
            ) => {
                tracing::warn!(job_id = %result.job_id, "spooled result dropped: {e}");
                let spool = worker.spool.clone();
                let _ = tokio::task::spawn_blocking(move || spool.remove(&path)).await;
            }
            Err(e) => {
                tracing::warn!(job_id = %result.job_id, "spooled result still not delivered ({e}); kept")
            }
        }
    }
}

/// How often idle devices are checked for a resident re-measure (one only happens after jobs
/// ran there, and releases the allocator's cache first).
const RESIDENT_REMEASURE_EVERY: Duration = Duration::from_secs(10);

/// Re-measures the resident memory of devices that went idle after running jobs, off the job
/// path, until `stop`.
pub(super) async fn remeasure_resident(worker: Arc<Worker>, stop: CancellationToken) {
    if worker.gpu_access != GpuAccess::Cuda {
        return;
    }
    every(RESIDENT_REMEASURE_EVERY, false, stop, move || {
        worker.memory.remeasure_idle()
    })
    .await;
}

/// Re-reads the host-wide ledgers at the sampling pace, off the async threads, so take sizing
/// and `/health` see the peers' bookings without waiting for the file's lock.
pub(super) async fn refresh_shared_ledgers(
    worker: Arc<Worker>,
    interval: Duration,
    stop: CancellationToken,
) {
    if !worker.memory.ledgers().iter().any(|l| l.host().is_some()) {
        return;
    }
    every(interval, true, stop, move || worker.memory.refresh_shared()).await;
}

/// Runs the blocking `work` on a blocking thread every `interval` (at once first, if
/// `at_start`), one run at a time, until `stop`.
async fn every(
    interval: Duration,
    at_start: bool,
    stop: CancellationToken,
    work: impl Fn() + Clone + Send + 'static,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if !at_start {
        ticker.tick().await;
    }
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let _ = tokio::task::spawn_blocking(work.clone()).await;
    }
}
