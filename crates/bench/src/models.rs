//! Extract and classify on the real MiniLM, on the CPU, at concurrency 1, 2 and 4: the worker's
//! handlers against the same TorchScript model called from Python torch
//! (`handler/bench_python.py`), doing the same work.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use serde_json::{json, Value};

use worker::config::Config;
use worker::handlers::{ChunkSink, HandlerSet, JobContext, JobSettings};
use worker::outcome::JobError;

/// Jobs per concurrency level.
const JOBS_PER_WORKER: usize = 8;

/// A sink that drops stream chunks (the benchmarks measure the model path).
pub struct NoStream;

#[async_trait]
impl ChunkSink for NoStream {
    async fn send(&self, _: &str, _: Value) -> Result<(), JobError> {
        Ok(())
    }
}

/// The classify job's text and labels (the extract job's input is [`document`]).
pub const CLASSIFY_TEXT: &str = "Preheat the oven to 180 degrees, whisk two eggs with sugar, fold in the flour and bake for 25 minutes.";
/// The classify job's labels.
pub const LABELS: [&str; 5] = ["invoice", "recipe", "poem", "contract", "resume"];

/// A document of 60 sentences, the extract job's input.
pub fn document() -> String {
    (0..60)
        .map(|i| {
            format!(
                "Sentence number {i} describes the quarterly results of division {}.",
                i % 7
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Latencies and throughput of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speed {
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Jobs per second.
    pub per_s: f64,
}

/// Runs `jobs` jobs of `input` at `concurrency` on `task`'s handler (on CUDA ordinal `device`,
/// if given), after one warm-up job; `None` if a job fails.
pub async fn measure(
    handlers: &HandlerSet,
    task: &str,
    input: Value,
    concurrency: usize,
    jobs: usize,
    device: Option<usize>,
) -> Option<Speed> {
    let handler = handlers.get(task)?.handler.clone().ok()?;
    let run = |input: Value| {
        let handler = handler.clone();
        async move {
            let map = input.as_object().cloned().unwrap_or_default();
            let mut ctx = JobContext::new(
                "bench".into(),
                map,
                Arc::new(NoStream),
                JobSettings::unbounded(),
            );
            ctx.device = device;
            let start = Instant::now();
            let prepared = handler.prepare(&ctx).await.ok()?;
            handler.run(ctx, prepared).await.ok()?;
            Some(start.elapsed().as_secs_f64() * 1000.0)
        }
    };
    run(input.clone()).await?; // warm-up (and label cache)
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let start = Instant::now();
    let tasks: Vec<_> = (0..jobs)
        .map(|_| {
            let (semaphore, job) = (semaphore.clone(), run(input.clone()));
            tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                job.await
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.push(task.await.ok()??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Some(Speed {
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        per_s: jobs as f64 / elapsed,
    })
}

/// Runs the comparison; `None` if the models or the Python baseline are missing.
pub async fn run(models: &Path, python: &Path) -> Option<String> {
    let mut config = Config::default();
    config.handler.model_dir = models.to_path_buf();
    config
        .handlers
        .retain(|name, _| name == "extract" || name == "classify");
    let handlers = tokio::task::spawn_blocking(move || HandlerSet::build(&config, false, false))
        .await
        .ok()?
        .ok()?;
    let extract = json!({"task": "extract", "document": {"text": document()}});
    let classify = json!({"task": "classify", "text": CLASSIFY_TEXT, "labels": LABELS});
    let mut report = String::from(
        "Models on the CPU: runpod-worker handlers vs the same TorchScript MiniLM from Python torch\n  \
         task      conc  ours p50 ms  python p50 ms  ours jobs/s  python jobs/s  throughput ratio\n",
    );
    for concurrency in [1, 2, 4] {
        let jobs = JOBS_PER_WORKER * concurrency;
        let baseline = std::process::Command::new(python)
            .arg(models.parent()?.join("bench_python.py"))
            .args([
                "--models",
                &models.display().to_string(),
                "--concurrency",
                &concurrency.to_string(),
                "--jobs",
                &jobs.to_string(),
            ])
            .output()
            .ok()?;
        let baseline: Value = serde_json::from_slice(&baseline.stdout).ok()?;
        for (task, input) in [("extract", &extract), ("classify", &classify)] {
            let speed = measure(&handlers, task, input.clone(), concurrency, jobs, None).await?;
            let (p50, throughput) = (speed.p50_ms, speed.per_s);
            let (py_p50, py_throughput) = (
                baseline[task]["p50_ms"].as_f64()?,
                baseline[task]["throughput"].as_f64()?,
            );
            report += &format!(
                "  {task:<9} {concurrency:>4} {p50:>12.1} {py_p50:>14.1} {throughput:>12.1} {py_throughput:>14.1} {:>16.2}x\n",
                throughput / py_throughput
            );
        }
    }
    Some(report)
}
