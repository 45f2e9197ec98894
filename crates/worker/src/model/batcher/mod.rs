//! Dynamic batching across jobs: one batcher per loaded model and device runs every forward
//! pass of that model, on one thread of its own, with rows from whichever jobs are waiting.
//!
//! Continuous, as TEI batches: a batch forms whenever the model is free (no timer unless
//! `max_batch_delay_us` asks for one), bounded by rows, padded tokens and the GPU memory the
//! device ledger grants it (see [`forming`] for which rows go together). Jobs tokenize on their
//! own threads and hand over token ids; only the forward pass is shared.
//!
//! Memory is booked per batch: before it runs, a batch books what it needs in its device's
//! ledger (learned bytes per padded token once the allocator has shown a few peaks; before
//! that, the declared `gpu_memory_per_request` for each job in it) and releases it after. When
//! not even one row fits, rows wait until their job's local-queue bound, then get the retry
//! signal. A CUDA OOM halves the token limit (grown back a step per good batch) and runs the
//! batch again in halves; any other model error is bisected the same way: only a row that
//! fails alone fails, and only its job. A job whose `cancel` is set (deadline, stop, drain)
//! loses its waiting rows before they run.

mod forming;
mod stats;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use crate::metrics::BatchMetrics;
pub use stats::BatchReport;

use self::forming::{Bounds, History, Row};
use self::stats::{Counters, MetricsSlot};
use super::torch_error;
use crate::outcome::JobError;

/// How long a batch short of memory waits before it looks again (our own jobs release memory
/// without telling the batcher; others' use is sampled at about this pace anyway).
const MEMORY_RECHECK: Duration = Duration::from_millis(20);
/// Samples of the allocator's peak before bytes per token are trusted.
const PEAK_SAMPLES: u64 = 3;
/// Margin over the largest bytes per token seen.
const PEAK_MARGIN: f64 = 1.25;

/// What a batcher batches: a row of token ids (special tokens included), or a job's tensors.
pub trait BatchItem: Send + Sync + 'static {
    /// Its size in what a pass's token limit counts (tokens; a tensor input's elements).
    fn size(&self) -> usize;
    /// Items of one group may share a pass.
    fn group(&self) -> u64;
}

impl BatchItem for Vec<u32> {
    fn size(&self) -> usize {
        self.len()
    }

    fn group(&self) -> u64 {
        forming::bucket(self.len()) as u64
    }
}

/// A model that runs on items of one group: one output per item, in order.
pub trait BatchModel<I, O>: Send + Sync + 'static {
    /// One forward pass over `items` (token rows are padded to the longest).
    fn forward(&self, items: &[&I]) -> Result<Vec<O>, tch::TchError>;
}

/// A batcher of any item type, as the worker sees it: attached at start, reported in
/// `/health`, `/metrics` and the console.
pub trait AnyBatcher: Send + Sync {
    /// Connects it to its worker.
    fn attach(&self, attachment: BatchAttachment);
    /// What it has done and learned.
    fn report(&self) -> BatchReport;
    /// The CUDA device its model computes on (`None`: the CPU).
    fn cuda_device(&self) -> Option<usize>;
    /// Which batcher it is (clones share it).
    fn identity(&self) -> usize;
}

/// Where a batcher books the GPU memory of its batches: its device's ledger.
pub trait BatchMemory: Send + Sync {
    /// Bytes a batch could book now.
    fn room(&self) -> u64;
    /// Books `bytes` for one batch, released when the guard is dropped; `None` if not there.
    fn book(&self, bytes: u64) -> Option<Box<dyn Send>>;
    /// The `retry_after` of a job whose rows found no memory.
    fn retry_after(&self) -> u64;
    /// The batcher has nothing left to run (after passes ran): a moment to give cached memory
    /// back. By default nothing.
    fn idle(&self) {}
    /// The CUDA device whose allocator peak is this batch's own, when nothing else is booked
    /// there now (`None` on the CPU, on a simulated GPU, or while others run).
    fn measurable(&self) -> Option<usize>;
}

/// What the batcher needs from the worker it runs in (absent in `test-input` and benches).
pub struct BatchAttachment {
    /// The device ledger; `None` for a CPU model.
    pub memory: Option<Arc<dyn BatchMemory>>,
    /// Bytes a job of the handlers on this model declares (`gpu_memory_per_request`): what a
    /// batch books per job in it until bytes per token are learned.
    pub declared_per_job: u64,
    /// The worker's metrics.
    pub metrics: BatchMetrics,
}

/// A batcher's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Rows per forward pass (1: no batching across rows).
    pub max_rows: usize,
    /// Padded tokens per forward pass.
    pub max_tokens: usize,
    /// How long a batch that is not full waits for more rows (0: never).
    pub max_delay: Duration,
}

/// What a job hands in with its rows.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// The job's cancellation: its rows are dropped once it is set.
    pub cancel: CancellationToken,
    /// How long its rows may wait for GPU memory, counted from when they arrived or from when
    /// memory ran short, whichever is later (the local queue's bound); `None`: as long as the
    /// job runs.
    pub memory_wait: Option<Duration>,
}

impl Ticket {
    /// A ticket of no job: never cancelled, waits for memory as long as it takes (warm-up).
    pub fn unbounded() -> Self {
        Self {
            cancel: CancellationToken::new(),
            memory_wait: None,
        }
    }
}

type Reply<O> = SyncSender<Result<Vec<O>, JobError>>;

/// One job's call: its rows and where their outputs go.
struct Request<I, O> {
    rows: Vec<Arc<I>>,
    out: Vec<Option<O>>,
    missing: usize,
    reply: Reply<O>,
    ticket: Ticket,
    arrived: Instant,
}

struct State<I, O> {
    /// Rows waiting, in arrival order.
    pending: Vec<Row>,
    requests: HashMap<u64, Request<I, O>>,
    next_request: u64,
    /// The request that started the previous batch, and the passes so far.
    history: History,
    /// Since when no pass could form for want of memory.
    short_since: Option<Instant>,
    /// Whether a pass ran since the batcher was last idle.
    ran_since_idle: bool,
    closed: bool,
}

impl<I, O> Default for State<I, O> {
    fn default() -> Self {
        Self {
            pending: Vec::new(),
            requests: HashMap::new(),
            next_request: 0,
            history: History::default(),
            short_since: None,
            ran_since_idle: false,
            closed: false,
        }
    }
}

struct Shared<I, O> {
    model: Arc<dyn BatchModel<I, O>>,
    /// The CUDA device the model computes on, if any.
    cuda: Option<usize>,
    limits: BatchLimits,
    labels: [String; 2],
    state: Mutex<State<I, O>>,
    wake: Condvar,
    counters: Counters,
    attachment: RwLock<Option<Arc<dyn BatchMemory>>>,
    declared_per_job: std::sync::atomic::AtomicU64,
    metrics: MetricsSlot,
}

/// One model on one device, batching the rows of every job that uses it: token rows in,
/// embeddings (or logits) out, unless told otherwise. Clones share it; its thread ends when
/// the last clone is dropped.
pub struct Batcher<I = Vec<u32>, O = Vec<f32>> {
    shared: Arc<Shared<I, O>>,
    _closer: Arc<Closer<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _closer: self._closer.clone(),
        }
    }
}

/// Closes the batcher when the last of its clones goes.
struct Closer<I, O>(Arc<Shared<I, O>>);

impl<I: BatchItem, O: Send + 'static> AnyBatcher for Batcher<I, O> {
    fn attach(&self, attachment: BatchAttachment) {
        Batcher::attach(self, attachment);
    }

    fn report(&self) -> BatchReport {
        Batcher::report(self)
    }

    fn cuda_device(&self) -> Option<usize> {
        Batcher::cuda_device(self)
    }

    fn identity(&self) -> usize {
        Arc::as_ptr(&self.shared).cast::<()>() as usize
    }
}

impl<I, O> Drop for Closer<I, O> {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_all();
    }
}

impl<I: BatchItem, O: Send + 'static> Batcher<I, O> {
    /// Starts the batcher's thread for `model` (named `name`, computing on `device`).
    pub fn start(
        model: Arc<dyn BatchModel<I, O>>,
        name: &str,
        device: tch::Device,
        limits: BatchLimits,
    ) -> Self {
        let cuda = match device {
            tch::Device::Cuda(index) => Some(index),
            _ => None,
        };
        let device = super::device_label(device);
        let limits = BatchLimits {
            max_rows: limits.max_rows.max(1),
            max_tokens: limits.max_tokens.max(1),
            ..limits
        };
        let shared = Arc::new(Shared {
            model,
            limits,
            labels: [name.to_owned(), device.clone()],
            cuda,
            state: Mutex::default(),
            wake: Condvar::new(),
            counters: Counters::default(),
            attachment: RwLock::new(None),
            declared_per_job: 0.into(),
            metrics: MetricsSlot::default(),
        });
        shared
            .counters
            .token_limit
            .store(limits.max_tokens, Ordering::Relaxed);
        let runner = shared.clone();
        std::thread::Builder::new()
            .name(format!("batch-{device}"))
            .spawn(move || runner.run())
            .expect("a thread can be started at start-up");
        Self {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
        }
    }

    /// The CUDA device its model computes on (`None`: the CPU).
    pub fn cuda_device(&self) -> Option<usize> {
        self.shared.cuda
    }

    /// Whether `self` and `other` are the same batcher.
    pub fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Connects the batcher to its worker: memory booking and metrics.
    pub fn attach(&self, attachment: BatchAttachment) {
        *self
            .shared
            .attachment
            .write()
            .unwrap_or_else(PoisonError::into_inner) = attachment.memory;
        self.shared
            .declared_per_job
            .store(attachment.declared_per_job, Ordering::Relaxed);
        self.shared.metrics.set(attachment.metrics);
    }

    /// The configured limits.
    pub fn limits(&self) -> BatchLimits {
        self.shared.limits
    }

    /// Runs `rows` through the model with whatever else is waiting, blocking until every row
    /// has its output (in `rows`' order) or the job's first failure. Call it from a blocking
    /// thread.
    pub fn run(&self, rows: Vec<I>, ticket: &Ticket) -> Result<Vec<O>, JobError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = sync_channel(1);
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(JobError::internal("the model is shutting down"));
            }
            let id = state.next_request;
            state.next_request += 1;
            for (index, row) in rows.iter().enumerate() {
                let arrived_pass = state.history.passes;
                state.pending.push(Row {
                    request: id,
                    index,
                    len: row.size(),
                    group: row.group(),
                    arrived_pass,
                });
            }
            let count = rows.len();
            state.requests.insert(
                id,
                Request {
                    rows: rows.into_iter().map(Arc::new).collect(),
                    out: std::iter::repeat_with(|| None).take(count).collect(),
                    missing: count,
                    reply,
                    ticket: ticket.clone(),
                    arrived: Instant::now(),
                },
            );
            self.shared
                .counters
                .pending_rows
                .store(state.pending.len(), Ordering::Relaxed);
        }
        self.shared.wake.notify_one();
        answer
            .recv()
            .unwrap_or_else(|_| Err(JobError::internal("the batcher stopped")))
    }

    /// What it has done and learned.
    pub fn report(&self) -> BatchReport {
        let c = &self.shared.counters;
        let batches = Counters::load(&c.batches);
        let rows = Counters::load(&c.rows);
        let padded = Counters::load(&c.padded_tokens);
        let real = Counters::load(&c.real_tokens);
        let per_token = Counters::load(&c.bytes_per_token);
        BatchReport {
            model: self.shared.labels[0].clone(),
            device: self.shared.labels[1].clone(),
            batches,
            rows,
            mean_rows: if batches == 0 {
                0.0
            } else {
                rows as f64 / batches as f64
            },
            padding_waste: if padded == 0 {
                0.0
            } else {
                1.0 - real as f64 / padded as f64
            },
            token_limit: c.token_limit.load(Ordering::Relaxed),
            max_batch_tokens: self.shared.limits.max_tokens,
            max_batch_rows: self.shared.limits.max_rows,
            learned_bytes_per_token: (per_token > 0).then_some(per_token),
            oom_splits: Counters::load(&c.oom_splits),
            error_splits: Counters::load(&c.error_splits),
            pending_rows: c.pending_rows.load(Ordering::Relaxed),
        }
    }
}

/// Closes the batcher and answers every waiting job when its thread ends, however it ends.
struct ExitGuard<'a, I, O>(&'a Shared<I, O>);

impl<I, O> Drop for ExitGuard<'_, I, O> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.closed = true;
        state.pending.clear();
        for (_, request) in state.requests.drain() {
            let _ = request
                .reply
                .send(Err(JobError::internal("the model is shutting down")));
        }
    }
}

/// A batch and its memory booking (none on the CPU), released when it is dropped.
type Formed<I> = (Vec<Taken<I>>, Option<Box<dyn Send>>);

/// One row taken into a batch (shared with its request).
struct Taken<I> {
    request: u64,
    index: usize,
    item: Arc<I>,
}

impl<I, O> Shared<I, O> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<I, O>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<I: BatchItem, O: Send + 'static> Shared<I, O> {
    fn labels(&self) -> [&str; 2] {
        [&self.labels[0], &self.labels[1]]
    }

    fn memory(&self) -> Option<Arc<dyn BatchMemory>> {
        self.attachment
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The batcher's thread: forms a batch, books its memory, runs it, hands out the rows. A
    /// panic in a pass fails that pass's jobs only; should the thread end any other way, every
    /// waiting job is answered and new ones are refused (none waits forever).
    fn run(self: Arc<Self>) {
        let _no_grad = tch::no_grad_guard();
        let _answers_all_on_exit = ExitGuard(&self);
        loop {
            let Some((batch, booking)) = self.next_batch() else {
                return;
            };
            let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.forward_split(&batch)
            }))
            .unwrap_or_else(|_| {
                tracing::error!(
                    "{} on {}: a forward pass panicked",
                    self.labels[0],
                    self.labels[1]
                );
                let failed = || {
                    JobError::internal("the model failed unexpectedly; the worker is still running")
                };
                batch
                    .iter()
                    .map(|t| (t.request, t.index, Err(failed())))
                    .collect()
            });
            drop(booking);
            self.deliver(results);
        }
    }

    /// Waits for rows and memory; `None` once the batcher is closed and drained.
    fn next_batch(&self) -> Option<Formed<I>> {
        let mut state = self.lock();
        loop {
            self.drop_cancelled(&mut state);
            if state.pending.is_empty() {
                if state.closed {
                    return None;
                }
                if std::mem::take(&mut state.ran_since_idle) {
                    if let Some(memory) = self.memory() {
                        memory.idle();
                    }
                }
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            if let Some(until) = self.delay_until(&state) {
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    state = self
                        .wake
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    continue;
                }
            }
            match self.form(&mut state) {
                Some(formed) => {
                    state.short_since = None;
                    state.ran_since_idle = true;
                    return Some(formed);
                }
                None => {
                    state.short_since.get_or_insert_with(Instant::now);
                    self.refuse_overdue(&mut state);
                    state = self
                        .wake
                        .wait_timeout(state, MEMORY_RECHECK)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    /// With a batch delay: when the oldest row stops waiting for company, unless the rows
    /// pending would already fill a batch.
    fn delay_until(&self, state: &State<I, O>) -> Option<Instant> {
        if self.limits.max_delay.is_zero() || state.closed {
            return None;
        }
        let tokens: usize = state.pending.iter().map(|r| r.len).sum();
        if state.pending.len() >= self.limits.max_rows || tokens >= self.limits.max_tokens {
            return None;
        }
        let oldest = state.pending.first()?;
        let arrived = state.requests.get(&oldest.request)?.arrived;
        Some(arrived + self.limits.max_delay)
    }

    /// The next batch and its memory booking, taken off the pending rows; `None` when not
    /// even its first row's memory is there.
    fn form(&self, state: &mut State<I, O>) -> Option<Formed<I>> {
        let memory = self.memory();
        let token_limit = self.counters.token_limit.load(Ordering::Relaxed);
        let per_token = Counters::load(&self.counters.bytes_per_token);
        let declared = self.declared_per_job.load(Ordering::Relaxed);
        let mut bounds = Bounds {
            max_rows: self.limits.max_rows,
            max_tokens: token_limit,
            max_requests: usize::MAX,
        };
        if let Some(memory) = &memory {
            let room = memory.room();
            let fitting = |each: u64| {
                room.checked_div(each)
                    .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            };
            let first = forming::anchor(&state.pending, state.history)?;
            let first_len = state.pending[first].len;
            if let Some(fits) = fitting(per_token) {
                // Short of memory for the first row alone: wait. (A token limit shrunk by an
                // OOM below one row's width is not a shortage: that row runs alone.)
                if fits < first_len {
                    return None;
                }
                bounds.max_tokens = bounds.max_tokens.min(fits);
            } else if let Some(jobs) = fitting(declared) {
                if jobs == 0 {
                    return None;
                }
                bounds.max_requests = jobs;
            }
        }
        let chosen = forming::form(&state.pending, &bounds, state.history);
        let rows: Vec<Row> = chosen.iter().map(|&i| state.pending[i]).collect();
        let width = rows.iter().map(|r| r.len).max().unwrap_or(0);
        let booking = match &memory {
            None => None,
            Some(memory) => {
                let requests = {
                    let mut ids: Vec<u64> = rows.iter().map(|r| r.request).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    ids.len() as u64
                };
                let bytes = if per_token > 0 {
                    per_token * (rows.len() * width) as u64
                } else {
                    declared * requests
                };
                Some(memory.book(bytes)?)
            }
        };
        state.history = History {
            previous: rows.first().map(|r| r.request),
            passes: state.history.passes + 1,
        };
        let mut taken_indices = chosen;
        taken_indices.sort_unstable();
        for &i in taken_indices.iter().rev() {
            state.pending.remove(i);
        }
        self.counters
            .pending_rows
            .store(state.pending.len(), Ordering::Relaxed);
        let metrics = self.metrics.get();
        let batch = rows
            .iter()
            .filter_map(|row| {
                let request = state.requests.get(&row.request)?;
                if let Some(metrics) = &metrics {
                    metrics.waited(self.labels(), request.arrived.elapsed());
                }
                Some(Taken {
                    request: row.request,
                    index: row.index,
                    item: request.rows.get(row.index)?.clone(),
                })
            })
            .collect();
        Some((batch, booking))
    }

    /// Drops the rows of jobs that ended (their deadline, a stop, the drain) before they run.
    fn drop_cancelled(&self, state: &mut State<I, O>) {
        let ended: Vec<u64> = state
            .requests
            .iter()
            .filter(|(_, r)| r.ticket.cancel.is_cancelled())
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            self.fail(state, id, JobError::internal("the job was cancelled"));
        }
        if state.closed {
            let all: Vec<u64> = state.requests.keys().copied().collect();
            for id in all {
                self.fail(state, id, JobError::internal("the model is shutting down"));
            }
        }
    }

    /// Gives the retry signal to jobs whose rows waited for memory past their bound: counted
    /// from when they arrived or from when memory ran short, whichever is later (a job that
    /// ran for minutes before this call gets its whole bound too).
    fn refuse_overdue(&self, state: &mut State<I, O>) {
        let now = Instant::now();
        let Some(short_since) = state.short_since else {
            return;
        };
        let overdue: Vec<u64> = state
            .requests
            .iter()
            .filter(|(_, r)| {
                r.ticket.memory_wait.is_some_and(|wait| {
                    now.saturating_duration_since(r.arrived.max(short_since)) >= wait
                })
            })
            .map(|(id, _)| *id)
            .collect();
        if overdue.is_empty() {
            return;
        }
        let retry_after = self.memory().map_or(10, |m| m.retry_after());
        for id in overdue {
            self.fail(state, id, JobError::gpu_memory_exhausted(retry_after));
        }
    }

    /// Answers request `id` with `error` and drops its waiting rows.
    fn fail(&self, state: &mut State<I, O>, id: u64, error: JobError) {
        if let Some(request) = state.requests.remove(&id) {
            let _ = request.reply.send(Err(error));
        }
        state.pending.retain(|row| row.request != id);
        self.counters
            .pending_rows
            .store(state.pending.len(), Ordering::Relaxed);
    }

    /// Runs `batch`; on a failure, runs its halves, down to single rows: an OOM also halves
    /// the token limit. Every row gets its own output or its own error.
    fn forward_split(&self, batch: &[Taken<I>]) -> Vec<(u64, usize, Result<O, JobError>)> {
        let rows: Vec<&I> = batch.iter().map(|t| t.item.as_ref()).collect();
        let width = rows.iter().map(|r| r.size()).max().unwrap_or(0);
        let padded = rows.len() * width;
        let measured = self.memory().and_then(|m| m.measurable());
        let baseline = measured.and_then(|device| {
            let stats = crate::gpu::allocator::stats(device)?;
            crate::gpu::allocator::reset_peak(device).then_some((device, stats.allocated))
        });
        let outcome = match self.model.forward(&rows) {
            Ok(out) if out.len() == rows.len() => Ok(out),
            Ok(out) => Err(JobError::internal(format!(
                "the model gave {} outputs for {} rows",
                out.len(),
                rows.len()
            ))),
            Err(error) => Err(torch_error(&error, 10)),
        };
        match outcome {
            Ok(out) => {
                if let Some((device, before)) = baseline {
                    self.learn_peak(device, before, padded);
                }
                self.count_batch(&rows, padded);
                self.grow_token_limit();
                batch
                    .iter()
                    .zip(out)
                    .map(|(t, row)| (t.request, t.index, Ok(row)))
                    .collect()
            }
            Err(error) => {
                let oom = error.is_out_of_memory();
                if oom {
                    self.shrink_token_limit(padded);
                    // What the failed pass left in the allocator's cache goes back to the card
                    // before the halves run.
                    if self.cuda.is_some() {
                        crate::gpu::allocator::empty_cache();
                    }
                }
                if batch.len() == 1 {
                    return vec![(batch[0].request, batch[0].index, Err(error))];
                }
                let cause = if oom { "oom" } else { "model_error" };
                let counter = if oom {
                    &self.counters.oom_splits
                } else {
                    &self.counters.error_splits
                };
                Counters::add(counter, 1);
                if let Some(metrics) = self.metrics.get() {
                    metrics.split(self.labels(), cause);
                }
                tracing::warn!(
                    "{} on {}: a batch of {} rows failed ({cause}); running it again in halves",
                    self.labels[0],
                    self.labels[1],
                    batch.len()
                );
                let (first, second) = batch.split_at(batch.len() / 2);
                let mut results = self.forward_split(first);
                results.extend(self.forward_split(second));
                results
            }
        }
    }

    /// Hands each row's output to its request; a request that failed is answered at once.
    fn deliver(&self, results: Vec<(u64, usize, Result<O, JobError>)>) {
        let mut state = self.lock();
        for (id, index, result) in results {
            match result {
                Err(error) => self.fail(&mut state, id, error),
                Ok(row) => {
                    let Some(request) = state.requests.get_mut(&id) else {
                        continue; // failed or cancelled meanwhile
                    };
                    if let Some(slot) = request.out.get_mut(index) {
                        if slot.replace(row).is_none() {
                            request.missing -= 1;
                        }
                    }
                    if request.missing == 0 {
                        if let Some(request) = state.requests.remove(&id) {
                            let out = request.out.into_iter().flatten().collect();
                            let _ = request.reply.send(Ok(out));
                        }
                    }
                }
            }
        }
    }

    fn count_batch(&self, rows: &[&I], padded: usize) {
        let real: usize = rows.iter().map(|r| r.size()).sum();
        let c = &self.counters;
        Counters::add(&c.batches, 1);
        Counters::add(&c.rows, rows.len() as u64);
        Counters::add(&c.padded_tokens, padded as u64);
        Counters::add(&c.real_tokens, real as u64);
        if let Some(metrics) = self.metrics.get() {
            metrics.batch(self.labels(), rows.len(), padded, real);
        }
    }

    /// After an OOM: half the tokens of the batch that failed (one row's width at the least).
    fn shrink_token_limit(&self, padded: usize) {
        let limit = &self.counters.token_limit;
        let now = limit.load(Ordering::Relaxed);
        let halved = (padded.min(now) / 2).max(1);
        limit.store(halved, Ordering::Relaxed);
        tracing::warn!(
            "{} on {}: out of GPU memory; batches hold at most {halved} padded tokens for now",
            self.labels[0],
            self.labels[1]
        );
    }

    /// After a good batch: an eighth of the configured limit back (additive increase).
    fn grow_token_limit(&self) {
        let max = self.limits.max_tokens;
        let limit = &self.counters.token_limit;
        let now = limit.load(Ordering::Relaxed);
        if now < max {
            limit.store((now + max.div_ceil(8)).min(max), Ordering::Relaxed);
        }
    }

    /// Learns bytes per padded token from the allocator's peak during a batch that ran alone.
    fn learn_peak(&self, device: usize, before: u64, padded: usize) {
        let Some(stats) = crate::gpu::allocator::stats(device) else {
            return;
        };
        if self.memory().and_then(|m| m.measurable()) != Some(device) || padded == 0 {
            return;
        }
        let peak = stats.peak_allocated.saturating_sub(before);
        let per_token = (peak as f64 / padded as f64 * PEAK_MARGIN).ceil() as u64;
        let c = &self.counters;
        let samples = c.peak_samples.fetch_add(1, Ordering::Relaxed) + 1;
        // The largest seen (attention grows faster than the tokens), once enough were seen.
        let largest = c
            .largest_per_token
            .fetch_max(per_token, Ordering::Relaxed)
            .max(per_token);
        if samples >= PEAK_SAMPLES {
            c.bytes_per_token.store(largest.max(1), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
