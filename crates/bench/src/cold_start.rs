//! Part 2: cold start, process start to first result, both workers, with the real model. The
//! queue already holds one classify and one extract job when the process starts, so the first
//! result includes loading the model and the first call of each input shape. Start-up checks
//! and warm-up run as they ship (ours: its fitness checks and its warm-up call before the first
//! take; the SDK: none of its own, its automatic system checks skipped, see `queue`).

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use super::queue::{start_worker, Queue, Setup, Worker};
use super::stats::Spread;
use super::workers::{kinds, REPS};

/// Longest a cold start may take before the part fails (a worker that died at start-up).
const LIMIT: Duration = Duration::from_secs(120);

/// One worker's cold start, over the repetitions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ColdStart {
    /// Process start to the first of the two results, ms.
    pub first_ms: Spread,
    /// Process start to both results, ms.
    pub both_ms: Spread,
    /// The same two jobs on the warm process afterwards (submit to last result), ms.
    pub warm_ms: Spread,
}

async fn once(setup: &Setup, queue: &Queue, worker: Worker, rep: usize) -> Result<[f64; 3]> {
    let endpoint = format!("cold-{}-{rep}", worker.name());
    let inputs: Vec<Value> = kinds()
        .into_iter()
        .filter(|k| k.name == "classify" || k.name == "extract")
        .map(|k| k.input)
        .collect();
    let mut ids = Vec::new();
    for input in &inputs {
        ids.push(queue.submit(&endpoint, input).await?);
    }
    let start = Instant::now();
    let proc = start_worker(setup, worker, queue.base(), &endpoint, 4)?;
    let waits = ids.iter().map(|id| {
        let (queue, endpoint) = (queue.clone(), endpoint.clone());
        let id = id.clone();
        async move {
            queue.settle(&endpoint, &id).await?;
            Ok::<_, anyhow::Error>(start.elapsed().as_secs_f64() * 1000.0)
        }
    });
    let done = tokio::time::timeout(LIMIT, futures::future::try_join_all(waits))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{}: no result {} s after start",
                worker.name(),
                LIMIT.as_secs()
            )
        })??;
    let first = done.iter().copied().fold(f64::INFINITY, f64::min);
    let both = done.iter().copied().fold(0.0, f64::max);
    let warm_start = Instant::now();
    futures::future::try_join_all(inputs.iter().map(|input| queue.run_sync(&endpoint, input)))
        .await?;
    let warm = warm_start.elapsed().as_secs_f64() * 1000.0;
    drop(proc);
    Ok([first, both, warm])
}

/// The floor under our cold start: `runpod-worker --version`, which does nothing but load the
/// binary and its shared libraries (libtorch, and the CUDA libraries linked for GPU hosts).
pub fn load_floor_ms(binary: &std::path::Path) -> Spread {
    let runs: Vec<f64> = (0..REPS)
        .filter_map(|_| {
            let start = Instant::now();
            let status = std::process::Command::new(binary)
                .arg("--version")
                .stdout(std::process::Stdio::null())
                .status()
                .ok()?;
            status
                .success()
                .then(|| start.elapsed().as_secs_f64() * 1000.0)
        })
        .collect();
    Spread::of(&runs)
}

/// `binary mock-queue --port 0` from spawn to its `listening on` line, ms, over the repetitions.
pub fn mock_listen_ms(binary: &std::path::Path) -> Spread {
    use std::io::{BufRead, BufReader};
    let runs: Vec<f64> = (0..REPS)
        .filter_map(|_| {
            let start = Instant::now();
            let mut child = std::process::Command::new(binary)
                .args(["mock-queue", "--port", "0"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()?;
            let listening = BufReader::new(child.stdout.take()?)
                .lines()
                .map_while(Result::ok)
                .any(|line| line.starts_with("listening on "));
            let took = start.elapsed().as_secs_f64() * 1000.0;
            let _ = child.kill();
            let _ = child.wait();
            listening.then_some(took)
        })
        .collect();
    Spread::of(&runs)
}

/// Both workers' cold starts (repetitions alternate between them).
pub async fn run(setup: &Setup, queue: &Queue) -> Result<[ColdStart; 2]> {
    let mut samples = [vec![], vec![]];
    for rep in 0..REPS {
        for (i, worker) in [Worker::Ours, Worker::Sdk].into_iter().enumerate() {
            eprintln!("  cold start {} #{}", worker.name(), rep + 1);
            samples[i].push(once(setup, queue, worker, rep).await?);
        }
    }
    Ok(samples.map(|s| {
        let column = |k: usize| Spread::of(&s.iter().map(|r| r[k]).collect::<Vec<_>>());
        ColdStart {
            first_ms: column(0),
            both_ms: column(1),
            warm_ms: column(2),
        }
    }))
}
