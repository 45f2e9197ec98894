//! The take loop: asks the queue for as many jobs as could start now, and hands each to a job
//! task. While jobs flow, a second take is asked while the first is answered (pipelining): a
//! short job ends microseconds after its take, and with one take in flight each take found
//! one or two free slots and waited a full round trip. Never more is asked than could start:
//! the free slots minus what the takes in flight asked for. An idle queue sees one long-poll
//! at a time, as before. At shutdown, takes in flight are let finish (a take whose answer has
//! started is read, for a few seconds at most) and their jobs answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{job, Worker};
use crate::queue::client::TakeResponse;
use crate::queue::{Backoff, QueueError};

/// A take held at least this long was a real long-poll: ask again at once.
const LONG_POLL_HELD: Duration = Duration::from_secs(1);

/// Takes in flight at once while jobs flow: one being answered, the next already asked.
const MAX_TAKES_IN_FLIGHT: usize = 2;

/// What one take did, once handled.
pub(super) enum Step {
    /// Jobs were taken and handed to their tasks (their handles); whether the queue sent all
    /// that was asked (it has more: a next take may overlap); pause this long, if at all,
    /// before the next take.
    Took(Vec<JoinHandle<()>>, bool, Option<Duration>),
    /// Nothing taken (an error, a rate limit); pause this long.
    Pause(Duration),
    /// `shutdown` was cancelled.
    Stopped,
}

/// A take's answer, with how many jobs it asked for.
type Answered = (usize, Result<Option<TakeResponse>, QueueError>);

/// One take of `wanted` jobs (the request only: [`handle`] hands its jobs out).
async fn take(worker: &Worker, wanted: usize, shutdown: &CancellationToken) -> Answered {
    let job_in_progress = !worker.board.is_empty();
    (
        wanted,
        worker.client.take(wanted, job_in_progress, shutdown).await,
    )
}

/// How many more jobs could start now, beyond `asked` (what the takes in flight asked for).
fn wanted(worker: &Worker, asked: usize) -> usize {
    if !worker.delivery.has_room() {
        // Results the queue is slow to take: no new work until some are delivered.
        return 0;
    }
    worker.admitter.takeable().saturating_sub(asked)
}

/// One turn, one take at a time (a worker stepped batch by batch): waits until some job could
/// start, asks the queue for as many as could, and hands each to a job task.
pub(super) async fn take_once(
    worker: &Arc<Worker>,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Step {
    let wanted = loop {
        let wanted = wanted(worker, 0);
        if wanted > 0 {
            break wanted;
        }
        tokio::select! {
            () = room_may_have_come(worker) => {}
            () = shutdown.cancelled() => return Step::Stopped,
        }
    };
    let started = Instant::now();
    let answered = take(worker, wanted, shutdown).await;
    handle(worker, answered, started, backoff)
}

/// Waits for a freed slot, a delivered result or grown limit, or the sampling rhythm: memory
/// used by others changes without telling us (the SDK sleeps 1 s and re-checks).
async fn room_may_have_come(worker: &Worker) {
    let recheck = Duration::from_millis(worker.config.gpu.sample_interval_ms);
    tokio::select! {
        () = worker.limits.slot_freed() => {}
        () = tokio::time::sleep(recheck) => {}
    }
}

/// Hands a take's jobs to their tasks, or says how long to pause.
fn handle(
    worker: &Arc<Worker>,
    (wanted, answer): Answered,
    started: Instant,
    backoff: &mut Backoff,
) -> Step {
    let queue = &worker.config.queue;
    match answer {
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
            Step::Took(handles, count >= wanted, pause)
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

type InFlight<'a> =
    FuturesUnordered<Pin<Box<dyn Future<Output = (Instant, Answered)> + Send + 'a>>>;

/// Runs until `shutdown` is cancelled, then lets the takes in flight finish.
pub(super) async fn run(worker: Arc<Worker>, shutdown: CancellationToken) {
    let mut backoff = backoff_for(&worker);
    let mut in_flight: InFlight<'_> = FuturesUnordered::new();
    // Jobs the takes in flight asked for: not yet here, but they will need slots.
    let mut asked = 0usize;
    // The last answer brought all it asked for: the queue has a backlog, and a second take may
    // overlap the first. (A partial answer means it has none: a second long-poll parked beside
    // the first would only be woken with it for the next job.)
    let mut flowing = false;
    let mut paused_until: Option<tokio::time::Instant> = None;
    while !shutdown.is_cancelled() {
        let most = if flowing { MAX_TAKES_IN_FLIGHT } else { 1 };
        let may_ask = paused_until.is_none() && in_flight.len() < most;
        if may_ask {
            let wanted = wanted(&worker, asked);
            if wanted > 0 {
                asked += wanted;
                let (worker, shutdown) = (&worker, &shutdown);
                in_flight.push(Box::pin(async move {
                    let started = Instant::now();
                    (started, take(worker, wanted, shutdown).await)
                }));
                continue;
            }
        }
        let pause_over = async {
            match paused_until {
                Some(until) => tokio::time::sleep_until(until).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((started, answered)) = in_flight.next() => {
                asked -= answered.0;
                match handle(&worker, answered, started, &mut backoff) {
                    Step::Stopped => break,
                    Step::Took(_, full, pause) => {
                        flowing = full;
                        paused_until = pause.map(|p| tokio::time::Instant::now() + p);
                    }
                    Step::Pause(pause) => {
                        flowing = false;
                        paused_until = Some(tokio::time::Instant::now() + pause);
                    }
                }
            }
            () = room_may_have_come(&worker), if may_ask => {}
            () = pause_over => paused_until = None,
            () = shutdown.cancelled() => break,
        }
    }
    // A take whose answer has started brings its jobs in (they are ours now): answered too.
    while let Some((started, answered)) = in_flight.next().await {
        let _ = handle(&worker, answered, started, &mut backoff);
    }
    tracing::info!("no longer taking jobs");
}
