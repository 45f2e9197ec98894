//! One taken job, from the take to its answer, one stage after another: take (routing, in
//! [`dispatch`]) → admit (slots) → prepare (fetch and parse, CPU only) → reserve (GPU memory)
//! → execute (model work) → release (slots, memory) → report (learning, deliver or spool).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::board::AlreadyHere;
use super::execute::{self, Bounds, Deadline, Execution};
use super::{HeldJob, JobCounters, Worker};
use crate::admission::{
    Admitted, Admitter, GlobalSlot, Learned, LimitChange, QueuedTicket, Refusal, Reservation,
    RetrySignal,
};
use crate::handlers::{ChunkSink, HandlerEntry, JobContext};
use crate::outcome::{done_body, refused_result, sized_done_body, ErrorType, JobError};
use crate::queue::client::DeliveryError;
use crate::queue::{BadJob, Job, QueueClient, SpooledResult};
use crate::telemetry::job_span;
use runpod_protocol::job::{id_problem, shown_id};

/// Takes charge of one item of a take: registers it (so the next ping lists it) and spawns
/// the task that answers it. Runs synchronously in the take loop, so the next `takeable()`
/// already counts this job against its handler. A job whose id is already in hand is not
/// started again (the running copy answers); one whose id cannot go in a URL as it is is
/// answered without ever being listed in the heartbeat.
pub(super) fn dispatch(worker: &Arc<Worker>, item: Result<Job, BadJob>) -> Option<JoinHandle<()>> {
    JobCounters::bump(&worker.counters.taken);
    let id = match &item {
        Ok(job) => Some(job.id.clone()),
        Err(bad) => bad.id.clone(),
    };
    let Some(id) = id else {
        JobCounters::bump(&worker.counters.unanswerable);
        if let Err(BadJob { problem, .. }) = item {
            tracing::error!("received a job that cannot be answered ({problem}); skipping it");
        }
        return None;
    };
    if let Some(problem) = id_problem(&id) {
        tracing::warn!(job_id = %shown_id(&id), "{problem}: answering it without holding it");
        let worker = worker.clone();
        return Some(worker.tracker.clone().spawn(async move {
            answer(&worker, &id, Err(JobError::invalid_input(problem)), false).await;
        }));
    }
    let held = match worker.board.register(&id) {
        Ok(held) => held,
        Err(already) => {
            JobCounters::bump(&worker.counters.duplicates);
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
    let slot = worker.limits.try_global();
    let job = match item {
        Ok(job) => job,
        Err(BadJob { problem, .. }) => {
            let worker = worker.clone();
            return Some(worker.tracker.clone().spawn(async move {
                let (_slot, _held) = (slot, held);
                answer(&worker, &id, Err(JobError::invalid_input(problem)), false).await;
            }));
        }
    };
    let routed = worker
        .handlers
        .route(&job.input)
        .map(|r| (r.entry.name.clone(), r.input));
    let worker_ref = worker.clone();
    Some(match routed {
        Err(error) => worker.tracker.spawn(async move {
            let (_slot, _held) = (slot, held);
            answer(&worker_ref, &job.id, Err(error), false).await;
        }),
        Ok((handler, input)) => {
            let ticket = worker
                .limits
                .enqueue(&handler)
                .expect("every routed handler has limits");
            let batch_id = job.raw.get("batchId").and_then(Value::as_str);
            let span = job_span(&job.id, batch_id);
            worker
                .tracker
                .spawn(run(worker_ref, job, handler, input, ticket, slot, held).instrument(span))
        }
    })
}

async fn run(
    worker: Arc<Worker>,
    job: Job,
    handler: String,
    input: Map<String, Value>,
    ticket: QueuedTicket,
    slot: Option<GlobalSlot>,
    held: HeldJob,
) {
    // On the heartbeat board until this task ends, however it ends.
    let stop = held.stop().clone();
    worker.recent.taken(&job.id, &handler);
    // The local queue's bound covers the whole wait, from the take: for a global slot (jobs
    // the queue sent beyond what was asked), the handler's slot, then memory.
    let taken_at = Instant::now();
    let max_wait = worker.config.local_queue_max_wait();
    let entry = worker
        .handlers
        .get(&handler)
        .expect("routed to a known handler");
    let admitter = Admitter::new(worker.limits.clone(), worker.memory.clone());

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
    let Admitted {
        slot: _slot,
        permit,
    } = match admitted {
        Ok(admitted) => admitted,
        Err(Refusal::Stopped) => {
            finish_cancelled(&worker, &job.id);
            return;
        }
        Err(Refusal::Interrupted) => {
            answer(&worker, &job.id, Err(interrupted()), false).await;
            return;
        }
        Err(Refusal::Retry(signal)) => {
            answer_retry(&worker, &job.id, signal).await;
            return;
        }
    };
    let active = permit.active_at_start();
    worker.recent.started(&job.id);

    // The job's time counts from here. The queue counts `policy.executionTimeout` from the
    // take: what is left of it, so our own `Timeout` arrives before the queue gives up.
    let deadline = Deadline::of(
        worker.config.execution_timeout(),
        job.policy_execution_timeout(),
        taken_at.elapsed(),
    );
    let sink = Arc::new(QueueSink(worker.client.clone()));
    let simulated = worker.sampler.probe().is_simulated();
    let mut ctx = JobContext::new(
        job.id.clone(),
        input,
        sink,
        CancellationToken::new(),
        simulated,
    );
    ctx.max_output_bytes = worker.config.queue.max_result_size.bytes();
    ctx.progress_every = match worker.config.handler.progress_interval_ms {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    let stages = Stages {
        worker: &worker,
        entry,
        job_id: &job.id,
        active,
        admitter: &admitter,
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

    // Release: the handler's slot and the job's GPU memory go back as soon as its threads
    // have really returned (a timed-out or stopped model call may still be running), not
    // after the result is delivered, which can take `delivery_retry_s`.
    let release = async {
        ctx.threads_finished().await;
        // With a host-wide ledger the release also empties the allocator's cache, off the
        // async threads (see `Ledger`): peers may use the memory at once.
        drop(reservation);
        drop(permit);
    };
    // Report: learning, then deliver or spool.
    let report = async {
        match ended {
            Ended::Refused(signal) => answer_retry(&worker, &job.id, signal).await,
            Ended::Ran(Execution::Cancelled) => finish_cancelled(&worker, &job.id),
            Ended::Ran(Execution::Finished(mut result)) => {
                if let Err(error) = &mut result {
                    if error.is_out_of_memory() {
                        // When memory should free up, as for an admission refusal.
                        error.retry_after = Some(worker.memory.retry_after());
                    }
                }
                worker.metrics.job_finished(&handler, &result);
                let learned = worker
                    .lessons
                    .learn(&handler, &result, model_time, ctx.gpu_peak());
                report_lesson(&worker, &handler, learned);
                if learned.replace_worker {
                    worker.ask_to_be_replaced(&result);
                }
                answer(&worker, &job.id, result, ctx.chunks_sent() > 0).await;
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
        let metrics = &self.worker.metrics;
        let handler = self.entry.name.as_str();
        metrics.admissions.with_label_values(&[handler]).inc();
        tracing::info!(job_id = %self.job_id, "{}", self.entry.started_line(self.active));
        let simulated = ctx.simulated_gpu;
        // Models are loaded on every GPU: the job runs where its memory is reserved (a
        // simulated GPU computes on the CPU, where there is one copy).
        if !simulated {
            ctx.device = reservation.as_ref().map(Reservation::device);
        }
        let lessons = &self.worker.lessons;
        let peak_probe = lessons.peak_probe(reservation.as_ref(), simulated);
        let started = Instant::now();
        let execution = execute::run(self.entry, ctx.clone(), prepared, bounds).await;
        let model_time = started.elapsed();
        if let Some(peak) = peak_probe.and_then(|probe| lessons.peak(probe)) {
            ctx.report_gpu_peak(peak);
        }
        Worked {
            ended: Ended::Ran(execution),
            reservation,
            model_time,
        }
    }
}

/// Answers a job with the retry signal, counted by its reason.
async fn answer_retry(worker: &Worker, job_id: &str, signal: RetrySignal) {
    worker
        .metrics
        .retry_signals
        .with_label_values(&[signal.reason])
        .inc();
    answer(worker, job_id, Err(signal.error), false).await;
}

/// Counts and logs what a finished job taught admission.
fn report_lesson(worker: &Worker, handler: &str, learned: Learned) {
    if learned.oom {
        worker.metrics.ooms.with_label_values(&[handler]).inc();
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
    JobCounters::bump(&worker.counters.cancelled);
    worker.recent.cancelled(job_id);
    tracing::info!(job_id, "job stopped by the queue; no result posted");
}

/// Posts the job's result and lets go of it. A result over the size limit becomes an
/// `OutputTooLarge` error (the platform would refuse it and the result would be lost); a result
/// the queue would not take in time goes to the spool, to be re-sent at the next start.
async fn answer(worker: &Worker, job_id: &str, result: Result<Value, JobError>, streamed: bool) {
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
    worker.recent.finished(job_id, &result);
    match &result {
        Ok(_) => JobCounters::bump(&worker.counters.completed),
        Err(e) => {
            JobCounters::bump(&worker.counters.failed);
            tracing::warn!(
                job_id = %shown_id(job_id),
                "job failed: {} ({})",
                e.message,
                e.error_type.as_str()
            );
        }
    }
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

/// Keeps a result the queue would not take in time, to be re-sent at the next start.
async fn spool(
    worker: &Worker,
    job_id: &str,
    body: crate::outcome::DoneBody,
    streamed: bool,
    error: &DeliveryError,
) {
    undelivered(worker, "spooled");
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
    match saved {
        Ok(path) => tracing::error!(
            job_id,
            "result could not be delivered ({error}); spooled at {} for the next start",
            path.display()
        ),
        Err(e) => tracing::error!(
            job_id,
            "result could not be delivered ({error}) nor spooled ({e}): it is lost"
        ),
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

/// Counts a result the queue did not take (in `/health` and `/metrics`).
fn undelivered(worker: &Worker, fate: &str) {
    JobCounters::bump(&worker.counters.undelivered);
    worker.metrics.undelivered.with_label_values(&[fate]).inc();
}

/// Stream chunks go to job-stream.
struct QueueSink(QueueClient);

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
