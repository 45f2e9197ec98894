//! Part 4: the mock queue's own ceiling on the echo path. A client with no worker logic takes
//! jobs (`job-take`, one per request) and completes them at once with their input as output,
//! with `concurrency` such loops, from a pre-loaded queue; the same HTTP/1 keep-alive client
//! as the rest of the harness.

use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::queue::{Queue, KEY};
use super::stats::Spread;
use super::workers::REPS;

/// Echo jobs one take-and-complete loop does per run.
pub const JOBS_PER_LOOP: usize = 50;

async fn take_and_complete(
    http: reqwest::Client,
    root: String,
    worker: String,
    left: Arc<AtomicIsize>,
) -> Result<()> {
    // Claim a job before taking it: a take with nothing queued would be held for the long-poll.
    while left.fetch_sub(1, Ordering::SeqCst) > 0 {
        let reply = http
            .get(format!("{root}/job-take/{worker}?gpu=bench"))
            .header("Authorization", KEY)
            .send()
            .await?;
        if reply.status() != 200 {
            bail!("job-take: HTTP {}", reply.status());
        }
        let job: Value = reply.json().await?;
        let id = job["id"].as_str().unwrap_or_default();
        let done = http
            .post(format!("{root}/job-done/{worker}/{id}?gpu=bench"))
            .header("Authorization", KEY)
            .json(&json!({ "output": job["input"] }))
            .send()
            .await?;
        if !done.status().is_success() {
            bail!("job-done: HTTP {}", done.status());
        }
    }
    Ok(())
}

/// Jobs/s of the bare queue at `concurrency` loops, over the repetitions.
pub async fn run(queue: &Queue, concurrency: usize) -> Result<Spread> {
    let http = reqwest::Client::new();
    let input = json!({"task": "echo", "n": 1});
    let mut per_s = Vec::new();
    for rep in 0..REPS {
        let endpoint = format!("ceiling-c{concurrency}-{rep}");
        let jobs = JOBS_PER_LOOP * concurrency;
        stream::iter(0..jobs)
            .map(|_| queue.submit(&endpoint, &input))
            .buffered(8)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let root = format!("{}/v2/{endpoint}", queue.base());
        let left = Arc::new(AtomicIsize::new(jobs as isize));
        let start = Instant::now();
        let loops = (0..concurrency).map(|i| {
            tokio::spawn(take_and_complete(
                http.clone(),
                root.clone(),
                format!("ceiling-{i}"),
                left.clone(),
            ))
        });
        for task in futures::future::join_all(loops).await {
            task??;
        }
        per_s.push(jobs as f64 / start.elapsed().as_secs_f64());
    }
    Ok(Spread::of(&per_s))
}
