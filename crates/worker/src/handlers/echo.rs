//! `echo`: returns its input unchanged. For diagnostics, tests and benchmarks.
//!
//! Options (all optional, in `input`): `sleep_ms` waits (cancellable), `stream: N` sends N
//! chunks first. On a simulated GPU only (test tools): `block_ms` blocks its executor thread
//! (proves the heartbeat's isolation from a misbehaving handler), `fail: "panic" | "oom" |
//! "cuda"` (a panic, a CUDA out-of-memory, a CUDA context that no longer works) and
//! `gpu_peak_mb` (the peak GPU memory it pretends to reach, which admission learns footprints
//! from).

use async_trait::async_trait;
use serde_json::{json, Value};
use std::time::Duration;

use super::{Handler, JobContext, Prepared};
use crate::outcome::JobError;

/// Longest `block_ms` accepted.
const MAX_BLOCK_MS: u64 = 60_000;
/// Longest `sleep_ms` accepted: one hour.
const MAX_SLEEP_MS: u64 = 3_600_000;
/// Most chunks one job may stream.
const MAX_STREAM_CHUNKS: u64 = 10_000;
/// Largest simulated peak, MB.
const MAX_PEAK_MB: u64 = 10_000_000;

/// The echo handler.
#[derive(Debug, Default)]
pub struct EchoHandler;

fn option_u64(ctx: &JobContext, key: &str, max: u64) -> Result<u64, JobError> {
    match ctx.input.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(value) => value.as_u64().filter(|n| *n <= max).ok_or_else(|| {
            JobError::invalid_input(format!(
                "input.{key} must be a whole number from 0 to {max}"
            ))
        }),
    }
}

#[async_trait]
impl Handler for EchoHandler {
    async fn run(&self, ctx: JobContext, _prepared: Prepared) -> Result<Value, JobError> {
        let sleep_ms = option_u64(&ctx, "sleep_ms", MAX_SLEEP_MS)?;
        let block_ms = option_u64(&ctx, "block_ms", MAX_BLOCK_MS)?;
        if block_ms > 0 && !ctx.simulated_gpu {
            // It stalls an executor thread on purpose: a test tool, not for production queues.
            return Err(JobError::invalid_input(
                "input.block_ms is only honoured on a simulated GPU ([gpu] simulate)",
            ));
        }
        let chunks = option_u64(&ctx, "stream", MAX_STREAM_CHUNKS)?;
        let peak_mb = option_u64(&ctx, "gpu_peak_mb", MAX_PEAK_MB)?;
        if peak_mb > 0 {
            if !ctx.simulated_gpu {
                return Err(JobError::invalid_input(
                    "input.gpu_peak_mb is only honoured on a simulated GPU ([gpu] simulate)",
                ));
            }
            ctx.report_gpu_peak(peak_mb * 1_000_000);
        }
        if let Some(fail) = ctx.input.get("fail") {
            if !ctx.simulated_gpu {
                return Err(JobError::invalid_input(
                    "input.fail is only honoured on a simulated GPU ([gpu] simulate)",
                ));
            }
            match fail.as_str() {
                Some("panic") => panic!("echo was asked to panic"),
                Some("oom") => return Err(JobError::gpu_memory_exhausted(10)),
                Some("cuda") => {
                    return Err(JobError::device_failure(
                        "the GPU stopped working (simulated)",
                    ))
                }
                _ => {
                    return Err(JobError::invalid_input(
                        "input.fail must be \"panic\", \"oom\" or \"cuda\"",
                    ))
                }
            }
        }
        for index in 0..chunks {
            if ctx.cancel.is_cancelled() {
                break;
            }
            ctx.stream(json!({ "chunk": index, "of": chunks })).await?;
        }
        if block_ms > 0 {
            // Deliberately blocks the thread it runs on (see the module doc).
            std::thread::sleep(Duration::from_millis(block_ms));
        }
        if sleep_ms > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                () = ctx.cancel.cancelled() => {}
            }
        }
        Ok(Value::Object(ctx.input))
    }
}
