//! The heartbeat: a ping every `RUNPOD_PING_INTERVAL` listing the ids of the jobs in hand.
//!
//! It runs on its own OS thread with its own runtime, so no handler — even one that blocks an
//! executor thread — can delay it (the SDK moved its ping to a separate process for the same
//! reason, after workers were killed as unresponsive).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

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
                let mut clocks = Clocks::new(interval);
                loop {
                    tokio::select! {
                        _ = ticker.tick() => {}
                        () = finished.cancelled() => break,
                    }
                    let ids = worker.board.ids();
                    for warning in clocks.tick(Instant::now(), SystemTime::now(), ids.len()) {
                        tracing::warn!("{warning}");
                    }
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

/// What the heartbeat sees of its own clocks between pings: a gap far longer than the interval
/// (the process was stopped, SIGSTOP, or starved: the queue may have let its leases run out),
/// and the system clock moving apart from the monotonic one (a clock jump). Either is said in
/// the log, since a job then running twice, or a result refused, is otherwise unexplained.
struct Clocks {
    interval: Duration,
    last: Option<(Instant, SystemTime)>,
}

/// A ping this much later than due is a pause worth saying (beyond scheduling noise).
const PAUSE_SLACK: Duration = Duration::from_secs(2);
/// The wall clock and the monotonic clock apart by more than this between two pings: a jump.
const CLOCK_JUMP: Duration = Duration::from_secs(2);

impl Clocks {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
        }
    }

    /// The warnings for this tick, at `now` (monotonic) and `wall`, with `held` jobs in hand.
    fn tick(&mut self, now: Instant, wall: SystemTime, held: usize) -> Vec<String> {
        let Some((last_now, last_wall)) = self.last.replace((now, wall)) else {
            return Vec::new();
        };
        let mut warnings = Vec::new();
        let gap = now.saturating_duration_since(last_now);
        if gap > self.interval * 2 + PAUSE_SLACK {
            warnings.push(format!(
                "this worker was paused {:.1} s between two pings (stopped, SIGSTOP, or starved \
                 of CPU): the queue may have let the leases of its {held} job(s) run out and \
                 handed them to another worker; a result it then refuses (404) is why",
                gap.as_secs_f64()
            ));
        }
        let (ahead, behind) = match wall.duration_since(last_wall) {
            Ok(wall_gap) => (wall_gap.saturating_sub(gap), gap.saturating_sub(wall_gap)),
            // The wall clock went back past the last ping.
            Err(back) => (Duration::ZERO, gap + back.duration()),
        };
        if ahead > CLOCK_JUMP || behind > CLOCK_JUMP {
            let (by, way) = if ahead > behind {
                (ahead, "forward")
            } else {
                (behind, "back")
            };
            warnings.push(format!(
                "the system clock jumped {way} by {:.1} s: times in the log around here are off",
                by.as_secs_f64()
            ));
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_gap_and_a_clock_jump_are_said_and_ordinary_ticks_are_not() {
        let interval = Duration::from_millis(200);
        let mut clocks = Clocks::new(interval);
        let (t0, w0) = (Instant::now(), SystemTime::now());
        assert!(clocks.tick(t0, w0, 1).is_empty());
        let (t1, w1) = (t0 + interval, w0 + interval);
        assert!(clocks.tick(t1, w1, 1).is_empty(), "an ordinary tick");
        // Stopped for 40 s: both clocks moved on together.
        let (t2, w2) = (t1 + Duration::from_secs(40), w1 + Duration::from_secs(40));
        let said = clocks.tick(t2, w2, 3);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].contains("paused 40.0 s") && said[0].contains("3 job(s)"),
            "{said:?}"
        );
        // The wall clock jumped an hour ahead within one interval.
        let said = clocks.tick(t2 + interval, w2 + interval + Duration::from_secs(3600), 0);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains("jumped forward by 3600.0 s"), "{said:?}");
        let (t3, w3) = (
            t2 + interval * 2,
            w2 + interval * 2 + Duration::from_secs(3600),
        );
        let said = clocks.tick(t3, w3 - Duration::from_secs(7200), 0);
        assert!(
            said.len() == 1 && said[0].contains("jumped back by 72"),
            "{said:?}"
        );
    }
}
