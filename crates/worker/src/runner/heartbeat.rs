//! The heartbeat: a ping every `RUNPOD_PING_INTERVAL` listing the ids of the jobs in hand.
//!
//! It runs on its own OS thread with its own runtime, so no handler — even one that blocks an
//! executor thread — can delay it (the SDK moved its ping to a separate process for the same
//! reason, after workers were killed as unresponsive).

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::queue::QueueClient;

/// Starts the heartbeat thread; it stops when `finished` is cancelled.
pub(super) fn spawn(
    worker: &Arc<Worker>,
    finished: CancellationToken,
) -> Result<JoinHandle<()>, String> {
    // A client of its own: a reqwest client is tied to the runtime that first used it.
    let client = QueueClient::new(
        worker.client.endpoints().clone(),
        worker.config.queue.clone(),
    )
    .map_err(|e| e.to_string())?;
    let interval = client.endpoints().ping_interval;
    let worker = worker.clone();
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!("heartbeat cannot start its runtime: {e}");
                    return;
                }
            };
            runtime.block_on(async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = ticker.tick() => {}
                        () = finished.cancelled() => break,
                    }
                    let ids = worker.board.ids();
                    match client.ping(&ids).await {
                        Ok(()) => worker.metrics.pings.with_label_values(&["ok"]).inc(),
                        Err(e) => {
                            worker.metrics.pings.with_label_values(&["error"]).inc();
                            tracing::warn!("heartbeat failed: {e}");
                        }
                    }
                }
            });
        })
        .map_err(|e| e.to_string())
}
