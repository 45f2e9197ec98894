//! Classify speed on the GPU against the CPU, and against Python torch running the same
//! TorchScript on the same card (`handler/bench_python.py`, carried inside the binary).

use std::path::Path;

use serde_json::{json, Value};

use super::device_checks::{model_config, LABELS};
use super::{Ctx, Table, Verdict};
use bench::models::{measure, Speed};
use worker::config::DeviceChoice;
use worker::handlers::HandlerSet;

/// The Python baseline, embedded so that the GPU kit needs no source tree.
const PYTHON_BASELINE: &str = include_str!("../../handler/bench_python.py");
/// Jobs in flight at once.
const CONCURRENCY: usize = 4;
/// Jobs per measurement on the GPU and on the CPU.
const GPU_JOBS: usize = 400;
const CPU_JOBS: usize = 100;
/// The text `bench_python.py` classifies (the same work on both sides).
const TEXT: &str = "Preheat the oven to 180 degrees, whisk two eggs with sugar, fold in the flour and bake for 25 minutes.";

fn describe(speed: &Speed) -> String {
    format!(
        "{:.0} jobs/s, p50 {:.1} ms, p99 {:.1} ms",
        speed.per_s, speed.p50_ms, speed.p99_ms
    )
}

async fn handler_speed(ctx: &Ctx, device: DeviceChoice, jobs: usize) -> Option<Speed> {
    let config = model_config(ctx, device);
    let on_gpu = device == DeviceChoice::Cuda;
    let handlers = tokio::task::spawn_blocking(move || HandlerSet::build(&config, on_gpu, false))
        .await
        .ok()?
        .ok()?;
    let input = json!({ "task": "classify", "text": TEXT, "labels": LABELS });
    let ordinal = on_gpu.then_some(ctx.device.index);
    measure(&handlers, "classify", input, CONCURRENCY, jobs, ordinal).await
}

/// Runs the baseline script with `python` and `args`: its JSON, or why it failed.
pub(super) async fn run_python(python: &Path, args: &[String]) -> Result<Value, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let script = dir.path().join("bench_python.py");
    std::fs::write(&script, PYTHON_BASELINE).map_err(|e| e.to_string())?;
    let output = tokio::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    serde_json::from_slice(&output.stdout).map_err(|_| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("no output").to_owned();
        format!("the Python baseline failed: {last}")
    })
}

/// Runs the baseline with `python` on CUDA device `ordinal`.
async fn python_speed(python: &Path, models: &Path, ordinal: usize) -> Result<Speed, String> {
    let args: Vec<String> = [
        "--models".to_owned(),
        models.display().to_string(),
        "--device".to_owned(),
        format!("cuda:{ordinal}"),
        "--tasks".to_owned(),
        "classify".to_owned(),
        "--concurrency".to_owned(),
        CONCURRENCY.to_string(),
        "--jobs".to_owned(),
        GPU_JOBS.to_string(),
    ]
    .into();
    let parsed = run_python(python, &args).await?;
    let field = |name: &str| parsed["classify"][name].as_f64().unwrap_or(0.0);
    Ok(Speed {
        p50_ms: field("p50_ms"),
        p99_ms: field("p99_ms"),
        per_s: field("throughput"),
    })
}

/// The speed rows (reported, never failing).
pub(super) async fn run(ctx: &Ctx, table: &mut Table) {
    if ctx.simulated {
        table.add(
            "classify speed GPU vs CPU",
            "simulated GPU: nothing runs on a GPU",
            Verdict::Skip,
        );
        return;
    }
    let gpu = handler_speed(ctx, DeviceChoice::Cuda, GPU_JOBS).await;
    let cpu = handler_speed(ctx, DeviceChoice::Cpu, CPU_JOBS).await;
    let figure = match (&gpu, &cpu) {
        (Some(g), Some(c)) => format!(
            "c={CONCURRENCY}: GPU {}; CPU {}; GPU/CPU {:.1}x",
            describe(g),
            describe(c),
            g.per_s / c.per_s.max(f64::MIN_POSITIVE)
        ),
        _ => "a classify job failed".to_owned(),
    };
    table.add("classify speed GPU vs CPU", figure, Verdict::Reported);
    let Some(python) = &ctx.python else {
        table.add(
            "classify speed vs Python torch",
            "no python3 with torch given (--python)",
            Verdict::Skip,
        );
        return;
    };
    let figure = match (python_speed(python, &ctx.base.handler.model_dir, ctx.device.index).await, &gpu)
    {
        (Ok(py), Some(ours)) => format!(
            "same TorchScript on the same GPU, c={CONCURRENCY}: Python {}; ours {}; ours/Python {:.2}x",
            describe(&py),
            describe(ours),
            ours.per_s / py.per_s.max(f64::MIN_POSITIVE)
        ),
        (Err(e), _) => e,
        (Ok(_), None) => "our classify job failed".to_owned(),
    };
    table.add("classify speed vs Python torch", figure, Verdict::Reported);
}
