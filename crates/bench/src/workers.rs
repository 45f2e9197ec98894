//! Part 1 of the comparison: runpod-worker and the official SDK worker, one mock queue, the same
//! job stream, at concurrency 1, 4 and 16.
//!
//! Per worker, concurrency and job kind, after a warm-up (excluded):
//! - throughput: the worker is stopped (SIGSTOP, its whole process tree), the queue is loaded
//!   with the run's jobs, the worker is continued and the clock starts: the client cannot be the
//!   bottleneck. Jobs/s is jobs over the time until the queue holds none of them queued or running; slot utilisation is the jobs'
//!   time in a slot (the mock's take-to-done, summed) over slots × that time; CPU time is the
//!   tree's user + system time over the run, per job.
//! - latency: jobs offered open-loop at half the slower worker's median throughput (below
//!   saturation for both), each one a `/runsync` whose round trip the harness times.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::procs;
use super::queue::{start_worker, Proc, Queue, Setup, Worker};
use super::stats::{p50_p99, utilisation, Spread};

/// Concurrency levels compared.
pub const CONCURRENCY: [usize; 3] = [1, 4, 16];
/// Repetitions of every measurement.
pub const REPS: usize = 3;
/// Longest one run may take: past it the worker has died or hung, and the part fails.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// One job kind of the stream.
#[derive(Debug, Clone)]
pub struct JobKind {
    /// Its name in the tables.
    pub name: &'static str,
    /// The job's input (the same for both workers).
    pub input: Value,
    /// Jobs per slot in one throughput run of our worker.
    pub ours_per_slot: usize,
    /// Jobs per slot in one throughput run of the SDK's (it takes one batch a second: see
    /// BENCHMARKS.md, so a longer run only costs time).
    pub sdk_per_slot: usize,
}

/// A document of 60 sentences (the extract job's input), as `bench models` uses.
pub fn document() -> String {
    super::models::document()
}

/// The job kinds: echo, a 200 ms sleep, and the real model (classify, extract).
pub fn kinds() -> Vec<JobKind> {
    vec![
        JobKind {
            name: "echo",
            input: json!({"task": "echo", "n": 1}),
            // Long enough (4,000 jobs at 16 slots) that the run's start and its 5 ms end poll
            // are a small share of it: 800 jobs at ~8,000 jobs/s took a tenth of a second.
            ours_per_slot: 250,
            sdk_per_slot: 3,
        },
        JobKind {
            name: "sleep 200 ms",
            input: json!({"task": "echo", "sleep_ms": 200}),
            ours_per_slot: 5,
            sdk_per_slot: 3,
        },
        JobKind {
            name: "classify",
            input: json!({"task": "classify", "text": super::models::CLASSIFY_TEXT, "labels": super::models::LABELS}),
            ours_per_slot: 5,
            sdk_per_slot: 3,
        },
        JobKind {
            name: "extract",
            input: json!({"task": "extract", "document": {"text": document()}}),
            ours_per_slot: 3,
            sdk_per_slot: 3,
        },
    ]
}

/// One worker's figures for one job kind at one concurrency.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Jobs in one throughput run.
    pub jobs: usize,
    /// Jobs per second from a pre-loaded queue.
    pub jobs_s: Spread,
    /// Slot utilisation (0–1).
    pub utilisation: Spread,
    /// Offered load of the latency runs, jobs/s.
    pub offered_s: f64,
    /// Jobs per latency run.
    pub latency_jobs: usize,
    /// Submit-to-result p50, ms.
    pub p50_ms: Spread,
    /// Submit-to-result p99, ms.
    pub p99_ms: Spread,
    /// Worker CPU time per job (process tree), ms.
    pub cpu_ms: Spread,
    /// Peak resident memory of the process tree so far, MB.
    pub peak_rss_mb: f64,
}

/// Both workers' figures for one kind and concurrency.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The job kind.
    pub kind: &'static str,
    /// Slots.
    pub concurrency: usize,
    /// runpod-worker.
    pub ours: Figures,
    /// The SDK worker.
    pub sdk: Figures,
}

/// One throughput run: (jobs/s, utilisation, CPU ms per job).
pub async fn throughput_run(
    queue: &Queue,
    endpoint: &str,
    proc: &Proc,
    input: &Value,
    jobs: usize,
    slots: usize,
) -> Result<(f64, f64, f64)> {
    let pids = procs::tree(proc.pid());
    procs::signal(&pids, "STOP");
    let submitted = stream::iter(0..jobs)
        .map(|_| queue.submit(endpoint, input))
        .buffered(8)
        .collect::<Vec<_>>()
        .await;
    let ids = submitted.into_iter().collect::<Result<Vec<_>>>();
    let cpu_before = procs::cpu_s(&pids);
    procs::signal(&pids, "CONT");
    let start = Instant::now();
    let ids = ids?;
    // The end is read from the queue's own count of completed jobs, polled: waiting on each
    // job's status in turn would add one request per job to the mock while the worker runs
    // (at 16 echo slots that capped the figure at a third of what the worker does).
    while queue.unfinished(endpoint).await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = procs::cpu_s(&procs::tree(proc.pid())) - cpu_before;
    // Each job's time in a slot, read once the clock has stopped.
    let mut busy_ms = 0.0;
    for id in &ids {
        let body = queue.settle(endpoint, id).await?;
        busy_ms += body["executionTime"].as_f64().unwrap_or(0.0);
    }
    Ok((
        jobs as f64 / wall,
        utilisation(busy_ms / 1000.0, slots, wall),
        cpu * 1000.0 / jobs as f64,
    ))
}

/// One latency run: `jobs` jobs offered at `rate` per second; (p50, p99) in ms.
pub async fn latency_run(
    queue: &Queue,
    endpoint: &str,
    input: &Value,
    jobs: usize,
    rate: f64,
) -> Result<(f64, f64)> {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(jobs);
    for i in 0..jobs {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let (queue, endpoint, input) = (queue.clone(), endpoint.to_owned(), input.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            queue.run_sync(&endpoint, &input).await?;
            Ok::<_, anyhow::Error>(sent.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut latencies = Vec::with_capacity(jobs);
    for task in tasks {
        latencies.push(task.await??);
    }
    Ok(p50_p99(&latencies))
}

/// Runs `jobs` of `input` and waits for all of them (warm-up, or the cold start's jobs).
pub async fn run_all(queue: &Queue, endpoint: &str, input: &Value, jobs: usize) -> Result<()> {
    let results = stream::iter(0..jobs)
        .map(|_| queue.run_sync(endpoint, input))
        .buffer_unordered(jobs.max(1))
        .collect::<Vec<_>>()
        .await;
    for result in results {
        result.with_context(|| format!("a job on {endpoint}"))?;
    }
    Ok(())
}

/// Jobs of one latency run at `rate` jobs/s: about 2 s of them, at least 3, at most 40. The
/// SDK worker saturates near 1 job/s at concurrency 1, so half its load is one job every 2 s:
/// more jobs would cost minutes of the 15-minute budget per kind.
pub fn latency_jobs(rate: f64) -> usize {
    ((rate * 2.0).round() as usize).clamp(3, 40)
}

struct Running {
    worker: Worker,
    endpoint: String,
    proc: Proc,
}

/// The whole side-by-side at every concurrency; progress goes to stderr.
pub async fn run(setup: &Setup, queue: &Queue) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for concurrency in CONCURRENCY {
        // Both workers wait on their own endpoint of the one mock; an idle one long-polls.
        let mut running = Vec::new();
        for worker in [Worker::Ours, Worker::Sdk] {
            let endpoint = format!("{}-c{concurrency}", worker.name());
            let proc = start_worker(setup, worker, queue.base(), &endpoint, concurrency)?;
            running.push(Running {
                worker,
                endpoint,
                proc,
            });
        }
        for kind in kinds() {
            let mut figures = Vec::new();
            for Running {
                worker,
                endpoint,
                proc,
            } in &running
            {
                eprintln!("  {} c={concurrency} {}", worker.name(), kind.name);
                // Warm-up: every slot once (first calls of each shape), twice over.
                // A worker that died at start-up would leave its jobs queued forever.
                tokio::time::timeout(
                    Duration::from_secs(180),
                    run_all(queue, endpoint, &kind.input, 2 * concurrency),
                )
                .await
                .map_err(|_| {
                    anyhow::anyhow!("{} warm-up got no results in 180 s", worker.name())
                })??;
                let per_slot = match worker {
                    Worker::Ours => kind.ours_per_slot,
                    Worker::Sdk => kind.sdk_per_slot,
                };
                let jobs = per_slot * concurrency;
                let (mut per_s, mut util, mut cpu) = (vec![], vec![], vec![]);
                for _ in 0..REPS {
                    let run = throughput_run(queue, endpoint, proc, &kind.input, jobs, concurrency);
                    let (p, u, c) = tokio::time::timeout(RUN_LIMIT, run)
                        .await
                        .map_err(|_| anyhow::anyhow!("{} stalled", worker.name()))??;
                    per_s.push(p);
                    util.push(u);
                    cpu.push(c);
                }
                figures.push(Figures {
                    jobs,
                    jobs_s: Spread::of(&per_s),
                    utilisation: Spread::of(&util),
                    cpu_ms: Spread::of(&cpu),
                    ..Figures::default()
                });
            }
            let rate = 0.5
                * figures
                    .iter()
                    .map(|f| f.jobs_s.median)
                    .fold(f64::INFINITY, f64::min);
            if !rate.is_finite() || rate <= 0.0 {
                bail!("no throughput measured for {}", kind.name);
            }
            for (Running { endpoint, proc, .. }, f) in running.iter().zip(figures.iter_mut()) {
                let jobs = latency_jobs(rate);
                let (mut p50, mut p99) = (vec![], vec![]);
                for _ in 0..REPS {
                    let run = latency_run(queue, endpoint, &kind.input, jobs, rate);
                    let (a, b) = tokio::time::timeout(RUN_LIMIT, run)
                        .await
                        .map_err(|_| anyhow::anyhow!("a latency run stalled"))??;
                    p50.push(a);
                    p99.push(b);
                }
                f.offered_s = rate;
                f.latency_jobs = jobs;
                f.p50_ms = Spread::of(&p50);
                f.p99_ms = Spread::of(&p99);
                f.peak_rss_mb = procs::peak_rss(&procs::tree(proc.pid())) as f64 / 1e6;
            }
            let sdk = figures.pop().unwrap_or_default();
            let ours = figures.pop().unwrap_or_default();
            rows.push(Row {
                kind: kind.name,
                concurrency,
                ours,
                sdk,
            });
        }
        drop(running);
    }
    Ok(rows)
}
