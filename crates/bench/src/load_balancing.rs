//! Part 7: one embedding through a load-balancing worker's own `/v1/embeddings`, against the same
//! request through the queue (`local`'s `/v2/local/openai/v1/embeddings`: the request is queued,
//! taken by the worker, run, its result posted back and handed to the waiting client). One text
//! per request, closed-loop clients at 1 and 16, p50 and p99 of each request's latency; both
//! servers run the shipped `runpod.toml` with the same models on this machine. Then an echo job
//! through `/runsync` on both: the path alone, without the model's time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::embeddings::{free_port, start_local, texts, wait_ready};
use super::queue::{Proc, KEY};
use super::stats::p50_p99;

/// Concurrency levels.
pub const LEVELS: [usize; 2] = [1, 16];

/// Requests measured per level (after as many again to warm up, not counted).
const REQUESTS: usize = 400;

/// Starts `serve --load-balancing` on a free port with the shipped config; its base URL.
fn start_load_balancing(binary: &Path) -> Result<(Proc, String)> {
    let port = free_port()?.to_string();
    let child = Command::new(binary)
        .args(["serve", "--load-balancing"])
        .env("PORT", &port)
        .env("PORT_HEALTH", &port)
        .env("RUNPOD_WORKER_HOST", "127.0.0.1")
        .env("RUNPOD_AI_API_KEY", KEY)
        .env("RUNPOD_LOG_LEVEL", "WARN")
        .env("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env_remove("RUNPOD_ENDPOINT_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting serve --load-balancing")?;
    Ok((Proc { child }, format!("http://127.0.0.1:{port}")))
}

/// What a request sends: an embedding of one text, or an echo job (the path alone).
#[derive(Clone, Copy)]
enum Request {
    Embedding,
    Echo,
}

impl Request {
    fn body(self, text: &str) -> serde_json::Value {
        match self {
            Self::Embedding => json!({"model": "all-MiniLM-L6-v2", "input": [text]}),
            Self::Echo => json!({"input": {"task": "echo", "message": text}}),
        }
    }
}

/// `requests` requests of `kind` from `concurrency` closed-loop clients: every request's
/// latency, ms.
async fn latencies(
    http: &reqwest::Client,
    url: &str,
    kind: Request,
    concurrency: usize,
    requests: usize,
) -> Result<Vec<f64>> {
    let all = texts(requests);
    let clients = (0..concurrency).map(|c| {
        let mine: Vec<String> = all.iter().skip(c).step_by(concurrency).cloned().collect();
        let (http, url) = (http.clone(), url.to_owned());
        tokio::spawn(async move {
            let mut took = Vec::with_capacity(mine.len());
            for text in mine {
                let sent = Instant::now();
                let reply = http
                    .post(&url)
                    .header("Authorization", format!("Bearer {KEY}"))
                    .json(&kind.body(&text))
                    .send()
                    .await?;
                if !reply.status().is_success() {
                    bail!("{url}: HTTP {}", reply.status());
                }
                reply.bytes().await?;
                took.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(took)
        })
    });
    let mut took = Vec::new();
    for client in futures::future::join_all(clients).await {
        took.extend(client??);
    }
    Ok(took)
}

/// Cold starts measured for the 204 → 200 figure.
const COLD_STARTS: usize = 3;

/// One cold start as the platform's balancer sees it: (process start → first 204, first 204 →
/// first 200), from `/ping` polled every 2 ms.
async fn ping_transition(http: &reqwest::Client, binary: &Path) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let (_balanced, base) = start_load_balancing(binary)?;
    let url = format!("{base}/ping");
    let mut first_204 = None;
    while started.elapsed() < Duration::from_secs(120) {
        let status = http.get(&url).send().await.map(|r| r.status().as_u16());
        match status {
            Ok(204) => {
                first_204.get_or_insert_with(Instant::now);
            }
            Ok(200) => {
                let first_204 = first_204.context("the ping answered 200 without a 204 first")?;
                return Ok((first_204 - started, first_204.elapsed()));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bail!("{url} never answered 200")
}

/// Runs both paths at each level, alternating, and renders the table.
pub async fn run(binary: &Path) -> Result<String> {
    let http = reqwest::Client::new();
    let mut starts = Vec::with_capacity(COLD_STARTS);
    for _ in 0..COLD_STARTS {
        starts.push(ping_transition(&http, binary).await?);
    }
    starts.sort_by_key(|(_, transition)| *transition);
    let (to_204, transition) = starts[COLD_STARTS / 2];
    let (_local, queue_base) = start_local(binary, None)?;
    let (_balanced, balanced_base) = start_load_balancing(binary)?;
    let limit = Duration::from_secs(120);
    wait_ready(
        &http,
        &format!("{queue_base}/v2/local/openai/v1/models"),
        limit,
    )
    .await?;
    wait_ready(&http, &format!("{balanced_base}/ping"), limit).await?;
    let routes = [
        (
            Request::Embedding,
            "embedding",
            format!("{queue_base}/v2/local/openai/v1/embeddings"),
            format!("{balanced_base}/v1/embeddings"),
        ),
        (
            Request::Echo,
            "echo (the path alone)",
            format!("{queue_base}/v2/local/runsync"),
            format!("{balanced_base}/runsync"),
        ),
    ];
    let mut table = String::from(
        "| request | clients | through the queue p50 / p99 (ms) | load-balancing p50 / p99 (ms) | p50 ratio | p99 ratio |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for (kind, name, queue_url, balanced_url) in &routes {
        for concurrency in LEVELS {
            for url in [queue_url, balanced_url] {
                latencies(&http, url, *kind, concurrency, REQUESTS).await?;
            }
            let queued = p50_p99(&latencies(&http, queue_url, *kind, concurrency, REQUESTS).await?);
            let balanced =
                p50_p99(&latencies(&http, balanced_url, *kind, concurrency, REQUESTS).await?);
            table.push_str(&format!(
                "| {name} | {concurrency} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2}x | {:.2}x |\n",
                queued.0,
                queued.1,
                balanced.0,
                balanced.1,
                balanced.0 / queued.0,
                balanced.1 / queued.1,
            ));
        }
    }
    table.push_str(&format!(
        "\nCold start as the balancer sees it (median of {COLD_STARTS}): the ping answers 204 \
         {} ms after the process starts, and 200 {} ms after the first 204.\n",
        to_204.as_millis(),
        transition.as_millis()
    ));
    table.push_str(&format!(
        "\n{REQUESTS} requests per row and path (as many again first, to warm up), one text \
         each; a ratio under 1 is load-balancing mode's gain. The echo rows time the path \
         alone (no model).\n"
    ));
    Ok(table)
}
