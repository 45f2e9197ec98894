//! One taken job, from the take to its answer, one stage after another: take (routing, in
//! [`dispatch`]) → admit (slots) → prepare (fetch and parse, CPU only) → reserve (GPU memory)
//! → execute (model work) → release (slots, memory) → report (learning, deliver or spool).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::board::AlreadyHere;
use super::delivery::{answer, QueueSink};
use super::execute::{self, Bounds, Deadline, Execution};
use super::{HeldJob, Worker};
use crate::admission::{
    Admitted, Admitter, GlobalSlot, Learned, LimitChange, QueuedTicket, Refusal, Reservation,
    RetrySignal,
};
use crate::handlers::{HandlerEntry, HandlerId, JobContext};
use crate::observed::JobEvent;
use crate::outcome::{ErrorType, JobError};
use crate::queue::{BadJob, Job};
use crate::telemetry::job_span;
use runpod_protocol::job::{id_problem, shown_id};

/// Takes charge of one item of a take: registers it (so the next ping lists it) and spawns
/// the task that answers it. Runs synchronously in the take loop, so the next `takeable()`
/// already counts this job against its handler. A job whose id is already in hand is not
/// started again (the running copy answers); one whose id cannot go in a URL as it is is
/// answered without ever being listed in the heartbeat.
pub(super) fn dispatch(worker: &Arc<Worker>, item: Result<Job, BadJob>) -> Option<JoinHandle<()>> {
    worker.record(JobEvent::Taken);
    let id = match &item {
        Ok(job) => Some(job.id.clone()),
        Err(bad) => bad.id.clone(),
    };
    let Some(id) = id else {
        worker.record(JobEvent::Unanswerable);
        if let Err(BadJob { problem, .. }) = item {
            tracing::error!("received a job that cannot be answered ({problem}); skipping it");
        }
        return None;
    };
    if let Some(problem) = id_problem(&id) {
        tracing::warn!(job_id = %shown_id(&id), "{problem}: answering it without holding it");
        return Some(refuse(worker, id, JobError::invalid_input(problem), ()));
    }
    let held = match worker.board.register(&id) {
        Ok(held) => held,
        Err(already) => {
            worker.record(JobEvent::Duplicate);
            match already {
                AlreadyHere::Running => tracing::warn!(
                    job_id = %id,
                    "the queue sent a job already in hand (a repeated id, or a lease that ran out \
                     while it ran): not started again; the running copy answers"
                ),
                AlreadyHere::Answered => tracing::warn!(
                    job_id = %id,
                    "the queue sent a job whose result was just delivered (its lease ran out \
                     while it ran): not started again"
                ),
            }
            return None;
        }
    };
    let job = match item {
        Ok(job) => job,
        Err(BadJob { problem, .. }) => {
            let error = JobError::invalid_input(problem);
            return Some(refuse(worker, id, error, held));
        }
    };
    let routed = worker
        .handlers
        .route(&job.input)
        .map(|r| (r.entry.id, r.input));
    Some(match routed {
        Err(error) => refuse(worker, job.id, error, held),
        Ok((handler, input)) => {
            let slot = worker.limits.try_global();
            let ticket = worker.limits.enqueue(handler);
            let batch_id = job.raw.get("batchId").and_then(Value::as_str);
            let span = job_span(&job.id, batch_id);
            let run = run(worker.clone(), job, handler, input, ticket, slot, held);
            worker.tracker.spawn(run.instrument(span))
        }
    })
}

/// Answers a job refused before it could run (its id, its shape, its task) with `error`,
/// holding `guards` (its place on the board, where it has one) until the answer is posted. It
/// holds no job slot: its answer is bounded by the delivery budget, as every result is.
fn refuse<G: Send + 'static>(
    worker: &Arc<Worker>,
    id: String,
    error: JobError,
    guards: G,
) -> JoinHandle<()> {
    let worker = worker.clone();
    worker.tracker.clone().spawn(async move {
        let _guards = guards;
        answer(&worker, &id, None, Err(error), false).await;
    })
}

async fn run(
    worker: Arc<Worker>,
    job: Job,
    handler: HandlerId,
    input: Map<String, Value>,
    ticket: QueuedTicket,
    slot: Option<GlobalSlot>,
    held: HeldJob,
) {
    // On the heartbeat board until this task ends, however it ends.
    let stop = held.stop().clone();
    let entry = worker.handlers.entry(handler);
    let handler = entry.name.as_str();
    worker.record(JobEvent::Queued {
        job_id: &job.id,
        handler,
    });
    // The local queue's bound covers the whole wait, from the take: for a global slot (jobs
    // the queue sent beyond what was asked), the handler's slot, then memory.
    let taken_at = Instant::now();
    let max_wait = worker.config.local_queue_max_wait();
    let admitter = &worker.admitter;

    // Admit: the slots.
    let admitted = admitter
        .admit(
            entry,
            ticket,
            slot,
            taken_at,
            max_wait,
            &stop,
            &worker.interrupt,
        )
        .await;
    let Admitted { slot, permit } = match admitted {
        Ok(admitted) => admitted,
        Err(Refusal::Stopped) => {
            finish_cancelled(&worker, &job.id);
            return;
        }
        Err(Refusal::Interrupted) => {
            answer(&worker, &job.id, None, Err(interrupted()), false).await;
            return;
        }
        Err(Refusal::Retry(signal)) => {
            answer_retry(&worker, &job.id, signal).await;
            return;
        }
    };
    let active = permit.active_at_start();
    worker.record(JobEvent::Started { job_id: &job.id });
    worker.direct.started(&job.id);

    // The job's time counts from here. The queue counts `policy.executionTimeout` from the
    // take: what is left of it, so our own `Timeout` arrives before the queue gives up.
    let deadline = Deadline::of(
        worker.config.execution_timeout(),
        job.policy_execution_timeout(),
        taken_at.elapsed(),
    );
    // A request's job (load-balancing mode) streams back to its request, a taken job to the queue.
    let sink = worker
        .direct
        .sink(&job.id)
        .unwrap_or_else(|| Arc::new(QueueSink(worker.client.clone())));
    let mut ctx = JobContext::new(job.id.clone(), input, sink, worker.job_settings);
    let stages = Stages {
        worker: &worker,
        entry,
        job_id: &job.id,
        active,
        admitter,
        stop: &stop,
        wait_until: taken_at + max_wait,
    };
    let mut bounds = Bounds::new(deadline, &stop, &worker.interrupt, ctx.cancel.clone());
    let Worked {
        ended,
        reservation,
        model_time,
    } = stages.prepare_reserve_execute(&mut ctx, &mut bounds).await;
    if matches!(ended, Ended::Ran(Execution::Finished(_))) {
        // Before the slot is released: a freed slot must not start a take first.
        worker.refresh_if_due();
    }

    // Release: the job's slots and GPU memory go back as soon as its threads have really
    // returned (a timed-out or stopped model call may still be running), not after the result
    // is delivered, which can take `delivery_retry_s`: the next job starts meanwhile, and the
    // results in delivery are bounded by their own budget (`answer`).
    let release = async {
        ctx.threads_finished().await;
        // With a host-wide ledger the release also empties the allocator's cache, off the
        // async threads (see `Ledger`): peers may use the memory at once.
        drop(reservation);
        drop(permit);
        drop(slot);
    };
    // Report: learning, then deliver or spool.
    let report = async {
        match ended {
            Ended::Refused(signal) => answer_retry(&worker, &job.id, signal).await,
            Ended::Ran(Execution::Cancelled) => finish_cancelled(&worker, &job.id),
            Ended::Ran(Execution::Finished(mut result)) => {
                worker.admitter.oom_retry_signal(&mut result);
                let learned = worker
                    .lessons
                    .learn(handler, &result, model_time, ctx.gpu_peak());
                report_lesson(&worker, handler, learned);
                if learned.replace_worker {
                    worker.ask_to_be_replaced(&result);
                }
                let streamed = ctx.chunks_sent() > 0;
                // No progress update may follow the result.
                ctx.progress_delivered().await;
                answer(&worker, &job.id, Some(handler), result, streamed).await;
            }
        }
    };
    tokio::join!(release, report);
}

/// How the stages after admission ended.
enum Ended {
    /// The job ran (or was cut short by its deadline, a stop or the drain).
    Ran(Execution),
    /// GPU memory did not come free in time: the retry signal, without running the model.
    Refused(RetrySignal),
}

/// What the stages after admission leave to the release and the report.
struct Worked {
    ended: Ended,
    /// The job's GPU memory, if it got that far.
    reservation: Option<Reservation>,
    /// How long the model work ran (what learning times).
    model_time: Duration,
}

impl Worked {
    fn before_the_model(ended: Ended) -> Self {
        Self {
            ended,
            reservation: None,
            model_time: Duration::ZERO,
        }
    }
}

/// The stages of an admitted job.
struct Stages<'a> {
    worker: &'a Worker,
    entry: &'a HandlerEntry,
    job_id: &'a str,
    /// Jobs of its handler running when it was admitted (for the start line).
    active: usize,
    admitter: &'a Admitter,
    stop: &'a CancellationToken,
    /// The local queue's bound, for the memory wait.
    wait_until: Instant,
}

impl Stages<'_> {
    /// Prepare (CPU only, no GPU memory held), reserve (GPU memory), execute (model work).
    /// The job's deadline covers prepare and execute; the wait for memory is local queue time,
    /// bounded by the local queue's bound, answered with the retry signal.
    async fn prepare_reserve_execute(
        &self,
        ctx: &mut JobContext,
        bounds: &mut Bounds<'_>,
    ) -> Worked {
        let prepared = match execute::prepare(self.entry, ctx, bounds).await {
            Ok(prepared) => prepared,
            Err(ended) => return Worked::before_the_model(Ended::Ran(ended)),
        };
        ctx.memory_wait = Some(self.worker.config.local_queue_max_wait());
        let waiting = Instant::now();
        let reservation = tokio::select! {
            reserved = self.admitter.reserve(self.entry, self.wait_until) => match reserved {
                Ok(reservation) => reservation,
                Err(signal) => return Worked::before_the_model(Ended::Refused(signal)),
            },
            () = self.stop.cancelled() => {
                return Worked::before_the_model(Ended::Ran(Execution::Cancelled))
            }
            () = self.worker.interrupt.cancelled() => {
                return Worked::before_the_model(Ended::Ran(Execution::Finished(Err(interrupted()))))
            }
        };
        bounds.extend(waiting.elapsed());
        self.worker.record(JobEvent::Admitted {
            handler: &self.entry.name,
        });
        tracing::info!(job_id = %self.job_id, "{}", self.entry.started_line(self.active));
        let simulated = ctx.simulated_gpu;
        // Models are loaded on every GPU: the job runs where its memory is reserved (a
        // simulated GPU computes on the CPU, where there is one copy).
        if !simulated {
            ctx.device = reservation.as_ref().map(Reservation::device);
        }
        let admitter = self.admitter;
        let peak_probe = admitter.peak_probe(reservation.as_ref(), simulated);
        let started = Instant::now();
        let execution = execute::run(self.entry, ctx.clone(), prepared, bounds).await;
        let model_time = started.elapsed();
        if let Some(peak) = peak_probe.and_then(|probe| admitter.peak(probe)) {
            ctx.report_gpu_peak(peak);
        }
        Worked {
            ended: Ended::Ran(execution),
            reservation,
            model_time,
        }
    }
}

/// Answers a job with the retry signal, counted by its reason (not as a job its handler ran).
async fn answer_retry(worker: &Worker, job_id: &str, signal: RetrySignal) {
    worker.record(JobEvent::RetrySignal {
        reason: signal.reason,
    });
    answer(worker, job_id, None, Err(signal.error), false).await;
}

/// Counts and logs what a finished job taught admission.
fn report_lesson(worker: &Worker, handler: &str, learned: Learned) {
    if learned.oom {
        worker.record(JobEvent::OutOfMemory { handler });
    }
    match learned.limit {
        Some(LimitChange::Shrunk(limit)) => {
            tracing::warn!("{handler}: out of GPU memory; running at most {limit} at once for now")
        }
        Some(LimitChange::Grew(limit, max)) => {
            tracing::info!("{handler}: {limit} at once again (of {max})")
        }
        None => {}
    }
}

/// The answer of a job the drain's grace ran out on before it could start.
fn interrupted() -> JobError {
    JobError::new(
        ErrorType::Interrupted,
        "the worker was shut down before the job could start; submit it again",
    )
}

fn finish_cancelled(worker: &Worker, job_id: &str) {
    let request = worker.direct.forget(job_id);
    worker.record(JobEvent::Cancelled { job_id });
    if request {
        tracing::info!(job_id, "request stopped: its client went away");
    } else {
        tracing::info!(job_id, "job stopped by the queue; no result posted");
    }
}
