//! Two `serve` worker processes on one card, sharing a host-wide ledger: together they never
//! book more than the budget, and the card never holds more than the budget on their account.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::harness::{self, ENDPOINT, KEY};
use super::memory_checks::{alloc_config, alloc_job};
use super::{gib, Ctx, Table, Verdict};
use worker::admission::HostLedger;
use worker::gpu;
use worker::queue::QueueEndpoints;

/// Jobs each worker may run at once: together they would want more than fits.
const PER_WORKER: u32 = 4;
/// Jobs submitted.
const JOBS: usize = 16;

/// Starts one `serve` worker with `config_file`, and waits until it is ready: the process and
/// the base URL of its port.
async fn start_worker(
    base: &str,
    config_file: &Path,
    log: &Path,
    name: &str,
) -> Result<(Child, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let stderr = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(config_file)
        .envs(QueueEndpoints::env_for(base, ENDPOINT, name, KEY))
        .env("RUNPOD_PING_INTERVAL", "500")
        // A check of memory admission, not of the host: the fitness checks (a disk nearly
        // full, say) must not decide it; `gpu-check`'s own rows prove the GPU.
        .env("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
        .env("RUNPOD_SKIP_GPU_CHECK", "true")
        .env_remove("RUNPOD_ENDPOINT_ID")
        .env_remove(worker::config::CONFIG_ENV)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start a worker process: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let listening = tokio::time::timeout(Duration::from_secs(300), lines.next_line()).await;
    match listening {
        Ok(Ok(Some(line))) if line.starts_with("listening on ") => {
            // It listens before its models load: wait until it takes jobs.
            let port = line.trim_start_matches("listening on ").trim().to_owned();
            let url = format!("{port}/ready");
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(|e| e.to_string())?;
            for _ in 0..3000 {
                let ready = client.get(&url).send().await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    return Ok((child, port));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(format!("worker {name} did not become ready"))
        }
        _ => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            Err(format!("worker {name} did not start: {}", tail.join(" / ")))
        }
    }
}

/// The sum of the counter `name` (all its labels) on a worker's `/metrics`; 0 when it cannot be
/// read (the row then says only what the answers show).
async fn counter(port: &str, name: &str) -> u64 {
    let Ok(response) = reqwest::get(format!("{port}/metrics")).await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The highest total the host-wide ledger held, and NVML's highest use, while `stop` is not
/// cancelled.
async fn watch(
    ledger: &HostLedger,
    ordinal: usize,
    simulated: bool,
    stop: CancellationToken,
) -> (u64, u64) {
    let probe = if simulated {
        None
    } else {
        gpu::detect(&worker::config::GpuConfig::default()).ok()
    };
    let (mut booked, mut used) = (0u64, 0u64);
    loop {
        if let Ok(totals) = ledger.totals() {
            booked = booked.max(totals.jobs + totals.resident);
        }
        if let Some(probe) = &probe {
            if let Some(d) = probe.read().iter().find(|d| d.index == ordinal) {
                used = used.max(d.used);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return (booked, used),
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}

/// The two-worker row.
pub(super) async fn run(ctx: &Ctx, table: &mut Table) {
    const CHECK: &str = "two workers, one host ledger";
    match two_workers(ctx).await {
        Ok((figure, ok)) => table.add(CHECK, figure, Verdict::of(ok)),
        Err(e) => table.add(CHECK, e, Verdict::Fail),
    }
}

async fn two_workers(ctx: &Ctx) -> Result<(String, bool), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mock = harness::mock_queue().await?;
    let budget = ctx.budget();
    // Five jobs' worth: with both workers' resident memory, at most four fit together.
    let per_job = budget / 5;
    let mut config = alloc_config(ctx, per_job, PER_WORKER);
    config.gpu.host_ledger_dir = Some(dir.path().join("ledger"));
    config.handler.model_dir =
        std::path::absolute(&config.handler.model_dir).map_err(|e| e.to_string())?;
    config.queue.spool_dir = dir.path().join("spool");
    let config_file = dir.path().join("worker.toml");
    let text = toml::to_string(&config).map_err(|e| e.to_string())?;
    std::fs::write(&config_file, text).map_err(|e| e.to_string())?;
    let ledger = HostLedger::open(&dir.path().join("ledger"), &ctx.device.uuid)
        .map_err(|e| format!("cannot open the host ledger: {e}"))?;
    worker::gpu::allocator::empty_cache();
    let baseline = if ctx.simulated {
        0
    } else {
        gpu::detect(&ctx.base.gpu)
            .ok()
            .and_then(|p| p.read().first().map(|d| d.used))
            .unwrap_or(0)
    };
    let base = mock.base_url();
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let (a, b) = tokio::join!(
        start_worker(&base, &config_file, &log_a, "peer-a"),
        start_worker(&base, &config_file, &log_b, "peer-b"),
    );
    let ((mut a, port_a), (mut b, port_b)) = (a?, b?);
    let job_bytes = per_job.saturating_sub(128_000_000);
    let ids: Vec<String> = (0..JOBS).map(|i| format!("peer-{i}")).collect();
    mock.enqueue_all(
        ENDPOINT,
        ids.iter()
            .map(|id| serde_json::json!({ "id": id, "input": alloc_job(ctx, job_bytes) })),
    );
    let stop = CancellationToken::new();
    let answers = async {
        let mut answers = Vec::new();
        for id in &ids {
            answers.push(harness::answer_of(&mock, id).await);
        }
        stop.cancel();
        answers
    };
    let (answers, (booked, used)) = tokio::join!(
        answers,
        watch(&ledger, ctx.device.index, ctx.simulated, stop.clone())
    );
    // The answers cannot tell a CUDA OOM from an admission refusal (both are the retry
    // signal); the workers' own counters can.
    let mut ooms = 0;
    let mut refusals = 0;
    for port in [&port_a, &port_b] {
        ooms += counter(port, "runpod_worker_ooms_total").await;
        refusals += counter(port, "runpod_worker_retry_signals_total").await;
    }
    let _ = a.kill().await;
    let _ = b.kill().await;
    let done = mock.endpoint(ENDPOINT).done;
    let by_a = done.iter().filter(|d| d.worker == "peer-a").count();
    let ok = answers.iter().filter(|r| r.is_ok()).count();
    let first_failure = answers
        .iter()
        .find_map(|a| a.as_ref().err())
        .map(|e| format!("; first failure: {}", e["error"].as_str().unwrap_or("?")))
        .unwrap_or_default();
    let used_by_workers = used.saturating_sub(baseline);
    let nvml = if ctx.simulated {
        String::new()
    } else {
        format!("; NVML peak above baseline {}", gib(used_by_workers))
    };
    let within = booked <= budget && (ctx.simulated || used_by_workers <= budget);
    // Both must have run jobs, or the ledger was never shared.
    let both_worked = by_a > 0 && by_a < done.len();
    Ok((
        format!(
            "jobs of {} on 2x{PER_WORKER} slots: {ok}/{JOBS} ok ({by_a} by one, {} by the other), {ooms} OOM, {refusals} retry signal(s); ledger peak {} of {} budget{nvml}{first_failure}",
            gib(per_job),
            done.len() - by_a,
            gib(booked),
            gib(budget)
        ),
        within && both_worked && ok == JOBS && ooms == 0,
    ))
}
