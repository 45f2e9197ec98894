//! The batcher against a model that says what it saw: which rows went together, where the
//! split and bisect found their culprits, what a cancelled job's rows never reached.

use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::thread::JoinHandle;

use super::*;
use crate::outcome::ErrorType;

/// An id that makes the model fail (a model error, not an OOM).
const POISON: u32 = 666;

/// Each output row is `[sum of the row's ids, its length, rows in its batch]`. Fails on a row
/// holding [`POISON`], and runs out of memory above `oom_above` padded tokens. With `hold`,
/// each pass waits for a message first, so rows pile up behind it.
struct TellingModel {
    oom_above: usize,
    batches: Mutex<Vec<Vec<Vec<u32>>>>,
    hold: Option<Mutex<Receiver<()>>>,
    started: Mutex<Option<Sender<()>>>,
}

impl TellingModel {
    fn new(oom_above: usize) -> Self {
        Self {
            oom_above,
            batches: Mutex::default(),
            hold: None,
            started: Mutex::default(),
        }
    }

    /// A model that waits for a release before each pass and says when one started.
    fn held(oom_above: usize) -> (Self, SyncSender<()>, Receiver<()>) {
        let (release, hold) = sync_channel(0);
        let (started, passes) = channel();
        let model = Self {
            hold: Some(Mutex::new(hold)),
            started: Mutex::new(Some(started)),
            ..Self::new(oom_above)
        };
        (model, release, passes)
    }

    fn seen(&self) -> Vec<Vec<Vec<u32>>> {
        self.batches.lock().unwrap().clone()
    }
}

impl BatchModel<Vec<u32>, Vec<f32>> for TellingModel {
    fn forward(&self, rows: &[&Vec<u32>]) -> Result<Vec<Vec<f32>>, tch::TchError> {
        if let Some(started) = self.started.lock().unwrap().as_ref() {
            let _ = started.send(());
        }
        if let Some(hold) = &self.hold {
            hold.lock().unwrap().recv().unwrap();
        }
        self.batches
            .lock()
            .unwrap()
            .push(rows.iter().map(|r| r.to_vec()).collect());
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if rows.len() * width > self.oom_above {
            return Err(tch::TchError::Torch(
                "CUDA out of memory. Tried to allocate 2.00 GiB".into(),
            ));
        }
        if rows.iter().any(|r| r.contains(&POISON)) {
            return Err(tch::TchError::Torch("index out of range in self".into()));
        }
        Ok(rows
            .iter()
            .map(|r| {
                let sum: u32 = r.iter().sum();
                vec![sum as f32, r.len() as f32, rows.len() as f32]
            })
            .collect())
    }
}

fn limits(max_rows: usize, max_tokens: usize) -> BatchLimits {
    BatchLimits {
        max_rows,
        max_tokens,
        max_delay: Duration::ZERO,
    }
}

/// A row of `len` ids that identifies job `job` (every id is the job's number).
fn row_of(job: u32, len: usize) -> Vec<u32> {
    vec![job; len]
}

fn submit(
    batcher: &Arc<Batcher>,
    rows: Vec<Vec<u32>>,
    ticket: Ticket,
) -> JoinHandle<Result<Vec<Vec<f32>>, JobError>> {
    let batcher = batcher.clone();
    std::thread::spawn(move || batcher.run(rows, &ticket))
}

/// Waits until `count` rows are pending (the submitting threads have handed them in).
fn pending_reaches(batcher: &Batcher, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while batcher.report().pending_rows < count {
        assert!(Instant::now() < deadline, "rows never arrived");
        std::thread::yield_now();
    }
}

/// A batcher whose model holds every pass until released, with job 1's pass (one row of
/// `warm_len` tokens) already holding it: rows submitted now pile up behind that pass.
struct Held {
    model: Arc<TellingModel>,
    batcher: Arc<Batcher>,
    warm: JoinHandle<Result<Vec<Vec<f32>>, JobError>>,
    release: SyncSender<()>,
    started: Receiver<()>,
}

impl Held {
    /// `before` sees the batcher before job 1 is submitted (to attach a ledger).
    fn start(oom_above: usize, warm_len: usize, before: impl FnOnce(&Batcher)) -> Self {
        let (model, release, started) = TellingModel::held(oom_above);
        let model = Arc::new(model);
        let batcher = Arc::new(Batcher::start(
            model.clone(),
            "m",
            tch::Device::Cpu,
            limits(64, 4096),
        ));
        before(&batcher);
        let warm = submit(&batcher, vec![row_of(1, warm_len)], Ticket::unbounded());
        started.recv().unwrap();
        Self {
            model,
            batcher,
            warm,
            release,
            started,
        }
    }

    /// Once `rows` rows are pending, lets every pass run; job 1's output.
    fn release_once_pending(self, rows: usize) -> Vec<Vec<f32>> {
        pending_reaches(&self.batcher, rows);
        drop(self.started);
        let release = self.release;
        std::thread::spawn(move || while release.send(()).is_ok() {});
        self.warm.join().unwrap().unwrap()
    }
}

#[test]
fn rows_of_jobs_waiting_together_share_a_pass_and_each_job_gets_only_its_own_rows() {
    // The first job's pass holds the model while eight more jobs arrive.
    let held = Held::start(usize::MAX, 20, |_| {});
    let (model, batcher) = (held.model.clone(), held.batcher.clone());
    let jobs: Vec<_> = (2..10u32)
        .map(|job| {
            let rows = (0..job as usize).map(|i| row_of(job, 17 + i)).collect();
            submit(&batcher, rows, Ticket::unbounded())
        })
        .collect();
    assert_eq!(held.release_once_pending((2..10).sum())[0][0], 20.0);
    for (job, handle) in (2..10u32).zip(jobs) {
        let out = handle.join().unwrap().unwrap();
        assert_eq!(out.len(), job as usize);
        for (i, row) in out.iter().enumerate() {
            let len = 17 + i;
            assert_eq!(row[0], (job as usize * len) as f32, "job {job} row {i}");
            assert_eq!(row[1], len as f32, "rows come back in the job's order");
        }
    }
    let seen = model.seen();
    assert_eq!(
        seen.len(),
        2,
        "one pass for the first job, one for the 44 rows behind it"
    );
    assert_eq!(seen[1].len(), 44);
    let report = batcher.report();
    assert_eq!((report.batches, report.rows), (2, 45));
    assert!(report.padding_waste < 0.5, "{report:?}");
}

#[test]
fn an_oom_halves_the_batch_and_the_token_limit_and_every_row_still_gets_its_output() {
    let model = Arc::new(TellingModel::new(64));
    let batcher = Arc::new(Batcher::start(
        model.clone(),
        "m",
        tch::Device::Cpu,
        limits(64, 4096),
    ));
    let rows = (0..8).map(|i| row_of(3, 17 + i % 2)).collect();
    let out = batcher.run(rows, &Ticket::unbounded()).unwrap();
    assert_eq!(out.len(), 8);
    let sizes: Vec<usize> = model.seen().iter().map(Vec::len).collect();
    assert_eq!(
        sizes,
        vec![8, 4, 2, 2, 4, 2, 2],
        "8 → 4 → 2 each: 2 × 18 tokens fit 64"
    );
    let report = batcher.report();
    assert_eq!(report.oom_splits, 3);
    assert!(report.token_limit < 4096, "the limit shrank: {report:?}");
}

#[test]
fn a_row_that_runs_out_of_memory_alone_fails_only_its_job() {
    let held = Held::start(100, 16, |_| {});
    let batcher = held.batcher.clone();
    // Job 2's row is 120 tokens wide: over the model's memory even alone. Job 3's fits.
    let big = submit(&batcher, vec![row_of(2, 120)], Ticket::unbounded());
    let small = submit(&batcher, vec![row_of(3, 70)], Ticket::unbounded());
    held.release_once_pending(2);
    let error = big.join().unwrap().unwrap_err();
    assert_eq!(error.error_type, ErrorType::InsufficientGpuMemory);
    assert!(error.retry_after.is_some());
    assert_eq!(small.join().unwrap().unwrap()[0][0], (3 * 70) as f32);
}

#[test]
fn a_model_error_is_bisected_to_the_job_that_caused_it_and_its_batch_mates_succeed() {
    let held = Held::start(usize::MAX, 16, |_| {});
    let batcher = held.batcher.clone();
    let mut poisoned = row_of(5, 18);
    poisoned[3] = POISON;
    let jobs: Vec<_> = [
        vec![row_of(4, 18), row_of(4, 19)],
        vec![row_of(5, 20), poisoned],
        vec![row_of(6, 17)],
        vec![row_of(7, 21), row_of(7, 22)],
    ]
    .into_iter()
    .map(|rows| submit(&batcher, rows, Ticket::unbounded()))
    .collect();
    held.release_once_pending(7);
    let results: Vec<_> = jobs.into_iter().map(|j| j.join().unwrap()).collect();
    assert_eq!(
        results[1].as_ref().unwrap_err().error_type,
        ErrorType::ModelError
    );
    for (job, result) in [(4, &results[0]), (6, &results[2]), (7, &results[3])] {
        let out = result.as_ref().unwrap();
        assert!(out.iter().all(|row| row[0] == job as f32 * row[1]), "{job}");
    }
    assert!(batcher.report().error_splits >= 2);
}

#[test]
fn a_cancelled_jobs_rows_never_reach_the_model() {
    let held = Held::start(usize::MAX, 16, |_| {});
    let (model, batcher) = (held.model.clone(), held.batcher.clone());
    let doomed = Ticket::unbounded();
    let cancelled = submit(&batcher, vec![row_of(8, 30); 5], doomed.clone());
    let kept = submit(&batcher, vec![row_of(9, 30)], Ticket::unbounded());
    pending_reaches(&batcher, 6);
    doomed.cancel.cancel();
    held.release_once_pending(6);
    assert!(cancelled.join().unwrap().is_err());
    kept.join().unwrap().unwrap();
    let ids: Vec<u32> = model.seen().iter().flatten().flatten().copied().collect();
    assert!(!ids.contains(&8), "no pass was spent on the cancelled job");
}

/// A ledger with `room` bytes; counts what was booked at once.
struct FakeLedger {
    room: AtomicU64,
    booked: Arc<AtomicU64>,
    most: AtomicU64,
}

struct Booked(Arc<AtomicU64>, u64);

impl Drop for Booked {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::SeqCst);
    }
}

impl BatchMemory for FakeLedger {
    fn room(&self) -> u64 {
        self.room
            .load(Ordering::SeqCst)
            .saturating_sub(self.booked.load(Ordering::SeqCst))
    }
    fn book(&self, bytes: u64) -> Option<Box<dyn Send>> {
        (bytes <= self.room()).then(|| {
            let now = self.booked.fetch_add(bytes, Ordering::SeqCst) + bytes;
            self.most.fetch_max(now, Ordering::SeqCst);
            Box::new(Booked(self.booked.clone(), bytes)) as Box<dyn Send>
        })
    }
    fn retry_after(&self) -> u64 {
        7
    }
    fn measurable(&self) -> Option<usize> {
        None
    }
}

fn attach(batcher: &Batcher, ledger: Arc<FakeLedger>, declared: u64) {
    batcher.attach(BatchAttachment {
        memory: Some(ledger),
        declared_per_job: declared,
        metrics: BatchMetrics::register(&prometheus::Registry::new()),
    });
}

#[test]
fn a_batch_books_the_declared_memory_of_each_job_in_it_and_shrinks_to_what_fits() {
    let ledger = Arc::new(FakeLedger {
        room: AtomicU64::new(25),
        booked: Arc::default(),
        most: AtomicU64::new(0),
    });
    let held = Held::start(usize::MAX, 16, |batcher| {
        attach(batcher, ledger.clone(), 10)
    });
    let (model, batcher) = (held.model.clone(), held.batcher.clone());
    let jobs: Vec<_> = (2..7u32)
        .map(|job| submit(&batcher, vec![row_of(job, 16)], Ticket::unbounded()))
        .collect();
    held.release_once_pending(5);
    for job in jobs {
        job.join().unwrap().unwrap();
    }
    let seen = model.seen();
    assert!(
        seen[1..].iter().all(|b| b.len() <= 2),
        "25 bytes hold 2 jobs of 10"
    );
    assert_eq!(ledger.most.load(Ordering::SeqCst), 20);
    assert_eq!(
        ledger.booked.load(Ordering::SeqCst),
        0,
        "every booking released"
    );
}

#[test]
fn rows_that_find_no_memory_by_their_jobs_bound_get_the_retry_signal() {
    let model = Arc::new(TellingModel::new(usize::MAX));
    let batcher = Batcher::start(model.clone(), "m", tch::Device::Cpu, limits(64, 4096));
    let ledger = Arc::new(FakeLedger {
        room: AtomicU64::new(5),
        booked: Arc::default(),
        most: AtomicU64::new(0),
    });
    attach(&batcher, ledger, 10);
    let ticket = Ticket {
        cancel: CancellationToken::new(),
        memory_wait: Some(Duration::from_millis(50)),
    };
    let error = batcher.run(vec![row_of(1, 16)], &ticket).unwrap_err();
    assert_eq!(error.error_type, ErrorType::InsufficientGpuMemory);
    assert_eq!(error.retry_after, Some(7));
    assert!(model.seen().is_empty());
}

#[test]
fn one_row_per_pass_when_batching_is_off() {
    let model = Arc::new(TellingModel::new(usize::MAX));
    let batcher = Arc::new(Batcher::start(
        model.clone(),
        "m",
        tch::Device::Cpu,
        limits(1, 4096),
    ));
    let out = batcher
        .run(
            (0..5).map(|i| row_of(2, 16 + i)).collect(),
            &Ticket::unbounded(),
        )
        .unwrap();
    assert_eq!(out.len(), 5);
    assert!(model.seen().iter().all(|b| b.len() == 1));
}

#[test]
fn a_token_limit_shrunk_below_a_rows_width_runs_it_alone_rather_than_waiting_for_memory() {
    let model = Arc::new(TellingModel::new(usize::MAX));
    let batcher = Batcher::start(model.clone(), "m", tch::Device::Cpu, limits(64, 4096));
    let ledger = Arc::new(FakeLedger {
        room: AtomicU64::new(1000),
        booked: Arc::default(),
        most: AtomicU64::new(0),
    });
    attach(&batcher, ledger.clone(), 10);
    // Learned: 10 bytes a token (100 tokens fit); an OOM left the limit at 8 tokens.
    let counters = &batcher.shared.counters;
    counters.bytes_per_token.store(10, Ordering::Relaxed);
    counters.token_limit.store(8, Ordering::Relaxed);
    let ticket = Ticket {
        cancel: CancellationToken::new(),
        memory_wait: Some(Duration::from_secs(5)),
    };
    let out = batcher
        .run(vec![row_of(4, 20), row_of(4, 20)], &ticket)
        .unwrap();
    assert_eq!(out.len(), 2);
    assert!(model.seen().iter().all(|b| b.len() == 1), "one row a pass");
    assert_eq!(
        ledger.most.load(Ordering::SeqCst),
        200,
        "20 tokens × 10 bytes"
    );
}

/// Panics on any row holding its id.
struct PanickingModel(u32);

impl BatchModel<Vec<u32>, Vec<f32>> for PanickingModel {
    fn forward(&self, rows: &[&Vec<u32>]) -> Result<Vec<Vec<f32>>, tch::TchError> {
        assert!(
            !rows.iter().any(|r| r.contains(&self.0)),
            "the model panicked"
        );
        Ok(rows.iter().map(|r| vec![r.len() as f32]).collect())
    }
}

#[test]
fn a_pass_that_panics_fails_its_jobs_and_the_batcher_goes_on() {
    let batcher = Batcher::start(
        Arc::new(PanickingModel(13)),
        "m",
        tch::Device::Cpu,
        limits(64, 4096),
    );
    let error = batcher
        .run(vec![row_of(13, 16)], &Ticket::unbounded())
        .unwrap_err();
    assert_eq!(error.error_type, ErrorType::Internal);
    let out = batcher
        .run(vec![row_of(2, 20)], &Ticket::unbounded())
        .unwrap();
    assert_eq!(out, vec![vec![20.0]]);
}
