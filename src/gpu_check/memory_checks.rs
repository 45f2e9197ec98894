//! Memory admission on the card: a burst of jobs sized so that exactly N fit the budget beside
//! the resident memory, a real CUDA OOM inside a handler, external pressure from another
//! process, and the learned footprint against the allocator's peak.

use std::future::Future;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::harness::{self, Answer, Harness};
use super::{gib, hog, Ctx, Table, Verdict};
use worker::config::{Config, DeviceChoice, HandlerConfig, Size};

/// Jobs that must fit the budget at once in the burst.
const N: u64 = 4;
/// Kept aside when sizing jobs: the resident memory may move a little between two starts.
const SLACK: u64 = 256_000_000;
/// What a job allocates below its reservation (the allocator rounds, kernels need a little).
const UNDER_RESERVATION: u64 = 128_000_000;

/// A config serving `alloc` (the allocating module; echo on a simulated GPU) with `per_job`
/// reserved per job.
pub(super) fn alloc_config(ctx: &Ctx, per_job: u64, limit: u32) -> Config {
    let mut config = ctx.base.clone();
    config.handler.max_concurrency = limit;
    config.handler.local_queue_max_wait_s = 120;
    config.gpu.adaptive = true;
    config.handlers.clear();
    let handler = if ctx.simulated {
        HandlerConfig {
            kind: Some("echo".into()),
            ..HandlerConfig::default()
        }
    } else {
        HandlerConfig {
            kind: Some("torchscript".into()),
            model: Some("alloc.pt".into()),
            inputs: Some(vec!["request".into()]),
            ..HandlerConfig::default()
        }
    };
    config.handlers.insert(
        "alloc".into(),
        HandlerConfig {
            max_concurrency: limit,
            device: DeviceChoice::Cuda,
            gpu_memory: Some(Size::from_bytes(per_job)),
            ..handler
        },
    );
    config
}

/// A job that holds `bytes` on the GPU for about half a second (reports it, when simulated).
pub(super) fn alloc_job(ctx: &Ctx, bytes: u64) -> Value {
    let megabytes = bytes / 1_000_000;
    if ctx.simulated {
        return json!({ "task": "alloc", "gpu_peak_mb": megabytes, "sleep_ms": 300 });
    }
    // Each pass reads and writes the block once: ~7.5e11 bytes of passes is about half a
    // second on an H100's ~3 TB/s.
    let passes = (750_000_000_000 / bytes.max(1)).clamp(1, 10_000);
    json!({
        "task": "alloc",
        "inputs": { "request": { "shape": [2], "dtype": "int64", "data": [megabytes, passes] } }
    })
}

/// The highest figures `/health` showed while something ran.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Peaks {
    pub(super) running: u64,
    /// GiB in use on the device (NVML; simulated: what is booked).
    pub(super) used_gib: f64,
}

/// Runs `work` while sampling the worker's `/health` every 10 ms.
pub(super) async fn watching<T>(harness: &Harness, work: impl Future<Output = T>) -> (T, Peaks) {
    let stop = CancellationToken::new();
    let watch = async {
        let mut peaks = Peaks::default();
        loop {
            let health = harness.health().await;
            let device = &health["gpus"][0];
            peaks.running = peaks
                .running
                .max(device["reservations"].as_u64().unwrap_or(0));
            let used = device["total_gb"].as_f64().unwrap_or(0.0)
                - device["free_gb"].as_f64().unwrap_or(0.0);
            peaks.used_gib = peaks.used_gib.max(used);
            tokio::select! {
                () = stop.cancelled() => return peaks,
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    };
    let work = async {
        let out = work.await;
        stop.cancel();
        out
    };
    let (out, peaks) = tokio::join!(work, watch);
    (out, peaks)
}

/// Bytes of resident memory the worker booked on device 0.
async fn resident_bytes(harness: &Harness) -> u64 {
    let health = harness.health().await;
    let gib = health["gpus"][0]["resident_gb"].as_f64().unwrap_or(0.0);
    (gib * (1u64 << 30) as f64) as u64
}

/// The memory rows.
pub(super) async fn run(ctx: &Ctx, table: &mut Table) {
    let Ok(mock) = harness::mock_queue().await else {
        table.add("burst: exactly N fit", "no mock queue", Verdict::Fail);
        return;
    };
    // What the worker holds for good with this handler, to size the jobs around it.
    let resident = match Harness::start(mock.clone(), alloc_config(ctx, 1_000_000_000, 1)).await {
        Ok(probe) => {
            let resident = resident_bytes(&probe).await;
            probe.stop().await;
            resident
        }
        Err(e) => {
            table.add("burst: exactly N fit", e, Verdict::Fail);
            return;
        }
    };
    let slack = if ctx.simulated { 0 } else { SLACK };
    let room = ctx.budget().saturating_sub(resident).saturating_sub(slack);
    let per_job = room / N;
    let mut config = alloc_config(ctx, per_job, 2 * N as u32);
    let load_file = tempfile::NamedTempFile::new().ok();
    if ctx.simulated {
        config.gpu.external_load_file = load_file.as_ref().map(|f| f.path().to_path_buf());
    }
    let worker = match Harness::start(mock, config).await {
        Ok(worker) => worker,
        Err(e) => {
            table.add("burst: exactly N fit", e, Verdict::Fail);
            return;
        }
    };
    burst(ctx, &worker, per_job, resident, table).await;
    oom(ctx, &worker, per_job, table).await;
    pressure(ctx, &worker, per_job, load_file.as_ref(), table).await;
    learned(ctx, &worker, per_job, table).await;
    worker.stop().await;
}

async fn burst(ctx: &Ctx, worker: &Harness, per_job: u64, resident: u64, table: &mut Table) {
    let job_bytes = per_job.saturating_sub(UNDER_RESERVATION);
    let ids: Vec<String> = (0..3 * N).map(|i| format!("burst-{i}")).collect();
    worker.submit_all(ids.iter().map(|id| (id.clone(), alloc_job(ctx, job_bytes))));
    let (answers, peaks) = watching(worker, async {
        let mut answers = Vec::new();
        for id in &ids {
            answers.push(worker.answer(id).await);
        }
        answers
    })
    .await;
    let ok = answers.iter().filter(|a| a.is_ok()).count();
    let ooms = count(&answers, "InsufficientGPUMemory");
    table.add(
        "burst: at most N at once, no OOM",
        format!(
            "N={N} jobs of {} fit beside {} resident; {ok}/{} ok, {ooms} OOM, peak {} running",
            gib(per_job),
            gib(resident),
            answers.len(),
            peaks.running
        ),
        Verdict::of(peaks.running <= N && ooms == 0 && ok == answers.len()),
    );
    let budget_gib = ctx.budget() as f64 / (1u64 << 30) as f64;
    let what = if ctx.simulated { "booked" } else { "NVML used" };
    // How far the figure can miss: the worker reads NVML at its sampling interval, so a peak
    // shorter than that may fall between two readings (each job here holds its memory for
    // 300 ms, well over the interval).
    let precision = if ctx.simulated {
        String::new()
    } else {
        format!(
            "; NVML read every {} ms: a peak shorter than that can be missed",
            ctx.base.gpu.sample_interval_ms
        )
    };
    table.add(
        "burst: memory used of budget",
        format!(
            "peak {what} {:.2} of {budget_gib:.2} GiB budget: {:.0}% (target 90%){precision}",
            peaks.used_gib,
            100.0 * peaks.used_gib / budget_gib.max(f64::MIN_POSITIVE)
        ),
        Verdict::Reported,
    );
}

fn count(answers: &[Answer], error_type: &str) -> usize {
    answers
        .iter()
        .filter(|a| harness::kind_of(a) == error_type)
        .count()
}

fn retry_after(answer: &Answer) -> Option<u64> {
    answer.as_ref().err()?.get("retry_after")?.as_u64()
}

async fn oom(ctx: &Ctx, worker: &Harness, per_job: u64, table: &mut Table) {
    let too_much = if ctx.simulated {
        json!({ "task": "alloc", "fail": "oom" })
    } else {
        alloc_job(ctx, 2 * ctx.device.total)
    };
    let failed = worker.run("oom", too_much).await;
    let next = worker.run("after-oom", alloc_job(ctx, per_job / 4)).await;
    let signalled = harness::kind_of(&failed) == "InsufficientGPUMemory";
    let how = if ctx.simulated {
        "simulated OOM (echo fail=oom)".to_owned()
    } else {
        format!("asked {} in one job", gib(2 * ctx.device.total))
    };
    table.add(
        "CUDA OOM in a handler",
        format!(
            "{how}: {} retry_after {}; next job {}",
            harness::kind_of(&failed),
            retry_after(&failed).map_or_else(|| "-".to_owned(), |s| format!("{s} s")),
            harness::kind_of(&next)
        ),
        Verdict::of(signalled && retry_after(&failed).is_some() && next.is_ok()),
    );
}

async fn pressure(
    ctx: &Ctx,
    worker: &Harness,
    per_job: u64,
    load_file: Option<&tempfile::NamedTempFile>,
    table: &mut Table,
) {
    // The last check's jobs have all answered; wait until they have also let go of memory.
    let _ = wait_for(worker, |device| device["reservations"].as_u64() == Some(0)).await;
    let health = worker.health().await;
    let free = (health["gpus"][0]["free_gb"].as_f64().unwrap_or(0.0) * (1u64 << 30) as f64) as u64;
    // Leave half a job free: no job fits until the other process leaves.
    let taken = free.saturating_sub(per_job / 2);
    let mut pressure = if ctx.simulated {
        let Some(file) = load_file else {
            return;
        };
        let _ = std::fs::write(file.path(), Size::from_bytes(taken).to_string());
        None
    } else {
        match hog::spawn(taken, ctx.device.index).await {
            Ok(hog) => Some(hog),
            Err(e) => {
                table.add("external memory pressure", e, Verdict::Fail);
                return;
            }
        }
    };
    let seen = wait_for_others(worker, |others| others >= taken as f64 * 0.9).await;
    let refused = worker.run("pressure", alloc_job(ctx, per_job / 2)).await;
    match pressure.take() {
        Some(hog) => hog.release().await,
        None => {
            if let Some(file) = load_file {
                let _ = std::fs::write(file.path(), "0GB");
            }
        }
    }
    let gone = wait_for_others(worker, |others| others < taken as f64 * 0.1).await;
    let admitted = worker
        .run("after-pressure", alloc_job(ctx, per_job / 4))
        .await;
    let ok = seen
        && gone
        && harness::kind_of(&refused) == "InsufficientGPUMemory"
        && retry_after(&refused).is_some()
        && admitted.is_ok();
    let who = if ctx.simulated {
        "external load file"
    } else {
        "another process"
    };
    table.add(
        "external memory pressure",
        format!(
            "{who} took {}: {} retry_after {}; after it left: {}",
            gib(taken),
            harness::kind_of(&refused),
            retry_after(&refused).map_or_else(|| "-".to_owned(), |s| format!("{s} s")),
            harness::kind_of(&admitted)
        ),
        Verdict::of(ok),
    );
}

/// Waits (up to 20 s) until the worker's `others_used` satisfies `done`.
async fn wait_for_others(worker: &Harness, done: impl Fn(f64) -> bool) -> bool {
    wait_for(worker, |device| {
        let others = device["others_used_gb"].as_f64().unwrap_or(0.0);
        done(others * (1u64 << 30) as f64)
    })
    .await
}

/// Waits (up to 20 s) until `/health`'s first GPU satisfies `done`.
async fn wait_for(worker: &Harness, done: impl Fn(&Value) -> bool) -> bool {
    for _ in 0..400 {
        if done(&worker.health().await["gpus"][0]) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn learned(ctx: &Ctx, worker: &Harness, per_job: u64, table: &mut Table) {
    let job_bytes = per_job / 2;
    for i in 0..6 {
        let _ = worker
            .run(&format!("learn-{i}"), alloc_job(ctx, job_bytes))
            .await;
    }
    let health = worker.health().await;
    let footprint = &health["handlers"]["alloc"]["footprint"];
    let peak = if ctx.simulated {
        "reported peak".to_owned()
    } else {
        worker::gpu::allocator::stats(ctx.device.index).map_or_else(
            || "allocator unreadable".to_owned(),
            |s| {
                format!(
                    "allocator peak {}",
                    gib(s.peak_allocated.saturating_sub(s.allocated))
                )
            },
        )
    };
    table.add(
        "learned footprint (adaptive)",
        format!(
            "jobs of {} alone: learned {:.2} GiB from {} samples ({peak}), declared {:.2} GiB, admitting {:.2} GiB",
            gib(job_bytes),
            footprint["learned_gb"].as_f64().unwrap_or(0.0),
            footprint["samples"].as_u64().unwrap_or(0),
            footprint["declared_gb"].as_f64().unwrap_or(0.0),
            footprint["admitted_gb"].as_f64().unwrap_or(0.0),
        ),
        Verdict::Reported,
    );
}
