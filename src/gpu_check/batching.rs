//! Batching across jobs on the card: each job's output batched equals its output unbatched
//! (labels, probabilities within 1e-4, embeddings cosine ≥ 0.9999), and classify and
//! embeddings jobs/s at concurrency 64 batched against unbatched (`max_batch_rows = 1`), with
//! p99 at concurrency 1 (reported, never failing). On a simulated GPU the equality row runs on
//! the CPU and the speed rows are skipped (`make bench` has the CPU's figures).

use serde_json::Value;

use super::device_checks::model_config;
use super::{Ctx, Table, Verdict};
use bench::batching::{input, passes, run_inputs};
use bench::embeddings::texts;
use bench::models::Speed;
use worker::config::DeviceChoice;
use worker::handlers::HandlerSet;

/// Jobs in the speed rows, per concurrency level.
const JOBS: usize = 2048;
/// The concurrency of the throughput rows.
const WIDE: usize = 64;

/// Classify and extract on the card, batching bounded by `max_rows`.
async fn handlers(ctx: &Ctx, max_rows: usize) -> Option<HandlerSet> {
    let mut config = model_config(ctx, DeviceChoice::Cuda);
    config.batching.max_batch_rows = max_rows;
    config.handler.max_concurrency = WIDE as u32;
    for table in config.handlers.values_mut() {
        table.max_concurrency = WIDE as u32;
    }
    let gpu = !ctx.simulated;
    tokio::task::spawn_blocking(move || HandlerSet::build(&config, true, !gpu))
        .await
        .ok()?
        .ok()
}

fn ordinal(ctx: &Ctx) -> Option<usize> {
    (!ctx.simulated).then_some(ctx.device.index)
}

/// The largest probability difference and the lowest embedding cosine between two runs of the
/// same jobs, and whether every label agrees.
fn compare(ours: &[Value], reference: &[Value]) -> (bool, f64, f64) {
    let (mut labels, mut delta, mut cosine) = (true, 0.0f64, 1.0f64);
    for (a, b) in ours.iter().zip(reference) {
        if let Some(scores) = b["scores"].as_object() {
            labels &= a["label"] == b["label"];
            for (label, p) in scores {
                let q = a["scores"][label].as_f64().unwrap_or(f64::NAN);
                delta = delta.max((q - p.as_f64().unwrap_or(f64::NAN)).abs());
            }
        }
        let vector = |v: &Value| -> Vec<f64> {
            v["data"][0]["embedding"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        let (x, y) = (vector(a), vector(b));
        if !x.is_empty() {
            cosine = cosine.min(bench::stats::cosine(&x, &y));
        }
    }
    (labels, delta, cosine)
}

fn describe(speed: &Speed) -> String {
    format!("{:.0} jobs/s, p99 {:.1} ms", speed.per_s, speed.p99_ms)
}

/// The batching rows.
pub(super) async fn run(ctx: &Ctx, table: &mut Table) {
    let (Some(batched), Some(unbatched)) = (handlers(ctx, 64).await, handlers(ctx, 1).await) else {
        table.add(
            "batched = unbatched",
            "the handlers did not load",
            Verdict::Fail,
        );
        return;
    };
    let device = ordinal(ctx);
    let jobs: Vec<Value> = texts(48)
        .iter()
        .enumerate()
        .map(|(i, t)| input(if i % 2 == 0 { "classify" } else { "embeddings" }, t))
        .collect();
    let before = passes(&batched);
    let ours = run_inputs(&batched, jobs.clone(), jobs.len(), device).await;
    let after = passes(&batched);
    let alone = run_inputs(&unbatched, jobs, 1, device).await;
    let (Some((_, ours)), Some((_, alone))) = (ours, alone) else {
        table.add("batched = unbatched", "a job failed", Verdict::Fail);
        return;
    };
    let (labels, delta, cosine) = compare(&ours, &alone);
    let rows = (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64;
    let ok = labels && delta <= 1e-4 && cosine >= 0.9999;
    table.add(
        "batched = unbatched",
        format!(
            "48 jobs at once ({rows:.1} rows a pass) vs one at a time: labels {}, max Δp {delta:.1e}, \
             min cosine {cosine:.6}{}",
            if labels { "equal" } else { "DIFFER" },
            if ctx.simulated { " (simulated: on the CPU)" } else { "" }
        ),
        Verdict::of(ok),
    );
    if ctx.simulated {
        table.add(
            "batched vs unbatched speed",
            "simulated GPU: nothing runs on a GPU (make bench has the CPU's figures)",
            Verdict::Skip,
        );
        return;
    }
    let index = ctx.device.index;
    let mut classify_batched = None;
    for task in ["classify", "embeddings"] {
        let inputs = |count: usize| texts(count).iter().map(|t| input(task, t)).collect();
        // The burst of 64 at once, batched: the allocator's peak against the budget, and
        // whether a pass ran out of memory.
        worker::gpu::allocator::reset_peak(index);
        let on = run_inputs(&batched, inputs(JOBS), WIDE, device).await;
        let peak = worker::gpu::allocator::stats(index).map_or(0, |s| s.peak_allocated);
        let splits: u64 = batched
            .batchers()
            .iter()
            .map(|b| b.batcher.report().oom_splits)
            .sum();
        let off = run_inputs(&unbatched, inputs(JOBS), WIDE, device).await;
        let on_one = run_inputs(&batched, inputs(200), 1, device).await;
        let off_one = run_inputs(&unbatched, inputs(200), 1, device).await;
        if task == "classify" {
            classify_batched = on.as_ref().map(|(speed, _)| speed.per_s);
        }
        let figure = match (on, off, on_one, off_one) {
            (Some((on, _)), Some((off, _)), Some((on_one, _)), Some((off_one, _))) => format!(
                "c={WIDE}: batched {}, unbatched {}: {:.1}x (target 5x); c=1 p99 {:.2}x of unbatched \
                 (target ≤ 1.1x); burst: allocator peak {} GiB of a {} GiB budget, {splits} OOM split(s)",
                describe(&on),
                describe(&off),
                on.per_s / off.per_s.max(f64::MIN_POSITIVE),
                on_one.p99_ms / off_one.p99_ms.max(f64::MIN_POSITIVE),
                super::gib(peak),
                super::gib(ctx.budget()),
            ),
            _ => "a job failed".to_owned(),
        };
        table.add(
            &format!("{task}: batched vs unbatched"),
            figure,
            Verdict::Reported,
        );
    }
    python_sorted_batches(ctx, classify_batched, table).await;
}

/// Our batched classify jobs/s at concurrency 64 against Python torch classifying the same
/// texts the way sentence-transformers' `encode` batches (sorted by length, 32 per call, no
/// per-job work at all): target ≥ 1×.
async fn python_sorted_batches(ctx: &Ctx, ours: Option<f64>, table: &mut Table) {
    const CHECK: &str = "classify: batched vs Python sorted batches";
    let Some(python) = &ctx.python else {
        table.add(
            CHECK,
            "no python3 with torch given (--python)",
            Verdict::Skip,
        );
        return;
    };
    let args: Vec<String> = [
        "--models".to_owned(),
        ctx.base.handler.model_dir.display().to_string(),
        "--device".to_owned(),
        format!("cuda:{}", ctx.device.index),
        "--jobs".to_owned(),
        JOBS.to_string(),
        "--sorted-batches".to_owned(),
        "32".to_owned(),
    ]
    .into();
    let figure = match (super::speed::run_python(python, &args).await, ours) {
        (Ok(parsed), Some(ours)) => {
            let theirs = parsed["classify_sorted"]["throughput"]
                .as_f64()
                .unwrap_or(0.0);
            format!(
                "{JOBS} distinct texts: ours {ours:.0} jobs/s at c={WIDE} (each a job), Python \
                 {theirs:.0} texts/s sorted, 32 a call: {:.2}x (target ≥ 1x)",
                ours / theirs.max(f64::MIN_POSITIVE)
            )
        }
        (Err(e), _) => e,
        (Ok(_), None) => "our classify jobs failed".to_owned(),
    };
    table.add(CHECK, figure, Verdict::Reported);
}
