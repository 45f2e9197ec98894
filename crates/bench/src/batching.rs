//! Batching across jobs on against off, in one run and one process: classify jobs and OpenAI
//! embeddings jobs through the worker's handlers (no queue: what is measured is the model
//! path), one distinct everyday text per job, at concurrency 1, 4, 16 and 64. "Off" is
//! `[batching] max_batch_rows = 1`, each row its own forward pass, as before batching. Both on
//! the CPU here; `gpu-check` has the same rows on a card.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use worker::config::Config;
use worker::handlers::{HandlerSet, JobContext, JobSettings};

use super::embeddings::texts;
use super::models::{Speed, LABELS};

/// The concurrency levels.
pub const LEVELS: [usize; 4] = [1, 4, 16, 64];

/// One setting of the worker.
#[derive(Debug, Clone, Copy)]
struct Setting {
    max_rows: usize,
    /// libtorch intra-op threads (0: one per core).
    threads: usize,
}

/// Unbatched first: the process's first heavy run pays for warming what no warm-up reaches
/// (measured: whichever setting ran first was 10–20% slower at concurrency 1).
const SETTINGS: [Setting; 3] = [
    Setting {
        max_rows: 1,
        threads: 0,
    },
    Setting {
        max_rows: 64,
        threads: 0,
    },
    Setting {
        max_rows: 64,
        threads: 1,
    },
];

/// A job's input for `task` (`classify` or `embeddings`) on `text`.
pub fn input(task: &str, text: &str) -> Value {
    match task {
        "classify" => json!({"task": "classify", "text": text, "labels": LABELS}),
        _ => json!({
            "openai_route": "/v1/embeddings",
            "openai_input": {"model": "all-MiniLM-L6-v2", "input": text},
        }),
    }
}

/// Runs every input once, `concurrency` at a time, on CUDA ordinal `device` if given; `None`
/// if a job fails.
pub async fn measure_inputs(
    handlers: &HandlerSet,
    inputs: Vec<Value>,
    concurrency: usize,
    device: Option<usize>,
) -> Option<Speed> {
    Some(run_inputs(handlers, inputs, concurrency, device).await?.0)
}

/// Runs every input once, `concurrency` at a time, on CUDA ordinal `device` if given: the
/// speed and each job's output, in the inputs' order; `None` if a job fails.
pub async fn run_inputs(
    handlers: &HandlerSet,
    inputs: Vec<Value>,
    concurrency: usize,
    device: Option<usize>,
) -> Option<(Speed, Vec<Value>)> {
    let run = |input: Value| {
        let entry = handlers.route(&input).ok()?;
        let handler = entry.entry.handler.clone().ok()?;
        let map = entry.input;
        Some(async move {
            let sink = Arc::new(super::models::NoStream);
            let mut ctx = JobContext::new("bench".into(), map, sink, JobSettings::unbounded());
            ctx.device = device;
            let start = Instant::now();
            let prepared = handler.prepare(&ctx).await.ok()?;
            let output = handler.run(ctx, prepared).await.ok()?;
            Some((start.elapsed().as_secs_f64() * 1000.0, output))
        })
    };
    let jobs = inputs.len();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(jobs);
    for input in inputs {
        let (semaphore, job) = (semaphore.clone(), run(input)?);
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            job.await
        }));
    }
    let mut latencies = Vec::with_capacity(jobs);
    let mut outputs = Vec::with_capacity(jobs);
    for task in tasks {
        let (latency, output) = task.await.ok()??;
        latencies.push(latency);
        outputs.push(output);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let speed = Speed {
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        per_s: jobs as f64 / elapsed,
    };
    Some((speed, outputs))
}

/// Rows per forward pass so far, over every batcher of `handlers`: (passes, rows).
pub fn passes(handlers: &HandlerSet) -> (u64, u64) {
    handlers
        .batchers()
        .iter()
        .map(|b| b.batcher.report())
        .fold((0, 0), |(p, r), report| {
            (p + report.batches, r + report.rows)
        })
}

/// The handlers `setting` gives, on the CPU.
async fn build(models: &Path, setting: Setting) -> Option<HandlerSet> {
    let mut config = Config::default();
    config.handler.model_dir = models.to_path_buf();
    config.batching.max_batch_rows = setting.max_rows;
    config
        .handlers
        .retain(|name, _| name == "extract" || name == "classify");
    let threads = if setting.threads == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        setting.threads
    };
    worker::model::set_threads(threads);
    tokio::task::spawn_blocking(move || HandlerSet::build(&config, false, false))
        .await
        .ok()?
        .ok()
}

/// One setting's figures: per (task, concurrency), the speed and the mean rows per pass.
async fn run_setting(models: &Path, setting: Setting) -> Option<Vec<(Speed, f64)>> {
    let handlers = build(models, setting).await?;
    let mut figures = Vec::new();
    for task in ["classify", "embeddings"] {
        // Warm: the profiling executor's runs, the label cache.
        measure_inputs(&handlers, vec![input(task, "warm up"); 4], 2, None).await?;
        for concurrency in LEVELS {
            let jobs = (concurrency * 8).clamp(48, 384);
            let inputs = texts(jobs).iter().map(|t| input(task, t)).collect();
            let before = passes(&handlers);
            let speed = measure_inputs(&handlers, inputs, concurrency, None).await?;
            let after = passes(&handlers);
            let mean_rows = (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64;
            figures.push((speed, mean_rows));
        }
    }
    Some(figures)
}

/// Python torch classifying `jobs` of the same texts sentence-transformers' way (sorted by
/// length, 32 per call, no per-job work): texts/s, or why not.
fn python_sorted(python: &Path, models: &Path, jobs: usize) -> Result<f64, String> {
    let script = models
        .parent()
        .map(|dir| dir.join("bench_python.py"))
        .ok_or("no handler directory")?;
    let output = std::process::Command::new(python)
        .arg(script)
        .arg("--models")
        .arg(models)
        .args(["--jobs", &jobs.to_string(), "--sorted-batches", "32"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    let parsed: Value = serde_json::from_slice(&output.stdout)
        .map_err(|_| "the Python baseline gave no figures".to_owned())?;
    parsed["classify_sorted"]["throughput"]
        .as_f64()
        .ok_or_else(|| "the Python baseline gave no throughput".to_owned())
}

/// The report; `None` if the models are missing or a job failed. With `python` (a Python with
/// torch), classify at the highest concurrency is also set against Python's sorted batches.
pub async fn run(models: &Path, python: Option<&Path>) -> Option<String> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut results = Vec::new();
    for setting in SETTINGS {
        results.push(run_setting(models, setting).await?);
    }
    let mut report = format!(
        "Batching across jobs on the CPU ({cores} cores), one distinct text per job, in process:\n\
         batched (max_batch_rows 64, 2048 padded tokens) vs unbatched (max_batch_rows 1), and \
         batched with intra_op_threads = 1\n  \
         task        conc  batched jobs/s  p50 ms  p99 ms  rows/pass  unbatched jobs/s  p50 ms  \
         p99 ms  ratio  1-thread jobs/s  ratio\n"
    );
    let rows = ["classify", "embeddings"]
        .iter()
        .flat_map(|task| LEVELS.iter().map(move |c| (*task, *c)));
    for (i, (task, concurrency)) in rows.enumerate() {
        let (off, _) = results[0][i];
        let (on, mean_rows) = results[1][i];
        let (one, _) = results[2][i];
        report += &format!(
            "  {task:<11} {concurrency:>4} {:>15.1} {:>7.1} {:>7.1} {mean_rows:>10.1} {:>17.1} {:>7.1} {:>7.1} {:>5.2}x {:>16.1} {:>5.2}x\n",
            on.per_s,
            on.p50_ms,
            on.p99_ms,
            off.per_s,
            off.p50_ms,
            off.p99_ms,
            on.per_s / off.per_s,
            one.per_s,
            on.per_s / one.per_s,
        );
    }
    if let Some(python) = python {
        let widest = LEVELS.len() - 1;
        let ours = results[1][widest].0.per_s;
        let jobs = (LEVELS[widest] * 8).clamp(48, 384);
        report += &match python_sorted(python, models, jobs) {
            Ok(theirs) => format!(
                "classify at c={}, batched: {ours:.1} jobs/s (each a job); Python torch on the same \
                 texts, sorted, 32 a call (no per-job work): {theirs:.1} texts/s: {:.2}x\n",
                LEVELS[widest],
                ours / theirs.max(f64::MIN_POSITIVE)
            ),
            Err(why) => format!("Python's sorted batches did not run: {why}\n"),
        };
    }
    Some(report)
}
