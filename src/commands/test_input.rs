//! `test-input`: runs one job in the SDK's `{"input": {...}}` format without a queue, prints
//! the job-done body it would post, and exits non-zero on an error result.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use runpod_protocol::job::{check_job_text, parse_job, JobLimits};
use std::time::Duration;
use worker::config::Config;
use worker::gpu;
use worker::handlers::{ChunkSink, HandlerSet, JobContext, JobSettings};
use worker::outcome::{done_body, sized_done_body, JobError};
use worker::runner::{execute, Bounds, Deadline, Execution};

/// Stream chunks are printed as they come, one JSON line each.
struct PrintSink;

#[async_trait]
impl ChunkSink for PrintSink {
    async fn send(&self, _job_id: &str, chunk: Value) -> Result<(), JobError> {
        println!("{}", serde_json::json!({ "stream": chunk }));
        Ok(())
    }

    async fn progress(&self, _job_id: &str, update: Value) {
        println!("{}", serde_json::json!({ "progress": update }));
    }
}

/// Runs the job from `json`, else from `file`.
pub async fn test_input(file: &Path, json: Option<&str>, config_path: Option<&Path>) -> i32 {
    let text = match json {
        Some(text) => text.to_owned(),
        None => match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("cannot read {}: {e}", file.display());
                return 1;
            }
        },
    };
    let mut job: Value = match serde_json::from_str(&text) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("the test input is not JSON: {e}");
            return 1;
        }
    };
    let config = match Config::load(config_path) {
        Ok((config, _)) => config,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    // The queue's limits apply here too: a job the worker would refuse is refused.
    let limits = JobLimits {
        max_bytes: usize::try_from(config.queue.max_job_size.bytes()).unwrap_or(usize::MAX),
        ..JobLimits::default()
    };
    if let Err(problem) = check_job_text(&text, limits) {
        println!(
            "{}",
            done_body(&Err(JobError::invalid_input(problem)), false)
        );
        return 1;
    }
    // The SDK's test format has no id; it defaults to "local_test".
    if let Value::Object(map) = &mut job {
        map.entry("id")
            .or_insert_with(|| Value::String("local_test".into()));
    }
    let gpu::FoundGpu { probe, access, .. } = match gpu::find(&config.gpu) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let gpu::GpuAccess::Broken(why) = &access {
        eprintln!("warning: {why}: CUDA handlers run on the CPU (degraded)");
    }
    let (gpu_present, simulated) = (access.gpu_present(), probe.is_simulated());
    let owned = config.clone();
    let built =
        tokio::task::spawn_blocking(move || HandlerSet::build(&owned, gpu_present, simulated))
            .await;
    let handlers = match built {
        Ok(Ok(handlers)) => handlers,
        Ok(Err(e)) => {
            eprintln!("{e}");
            return 1;
        }
        Err(_) => {
            eprintln!("loading the models failed unexpectedly");
            return 1;
        }
    };
    let result = match parse_job(job) {
        Err(bad) => Err(JobError::invalid_input(bad.problem)),
        Ok(job) => match handlers.route(&job.input) {
            Err(e) => Err(e),
            Ok(routed) => {
                let settings = JobSettings::from_config(&config, probe.is_simulated());
                let ctx =
                    JobContext::new(job.id.clone(), routed.input, Arc::new(PrintSink), settings);
                let deadline = Deadline::of(
                    config.execution_timeout(),
                    job.policy_execution_timeout(),
                    Duration::ZERO,
                );
                let never = CancellationToken::new();
                let bounds = Bounds::new(deadline, &never, &never, ctx.cancel.clone());
                match execute(routed.entry, ctx, &bounds).await {
                    Execution::Finished(result) => result,
                    Execution::Cancelled => Err(JobError::internal("the job was cancelled")),
                }
            }
        },
    };
    let (result, body) = sized_done_body(result, false, config.queue.max_result_size.bytes());
    println!("{body}");
    i32::from(result.is_err())
}
