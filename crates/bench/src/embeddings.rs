//! Part 3: our `local` endpoint's OpenAI `/v1/embeddings` route against infinity-emb (a
//! batching embedding server) serving the same all-MiniLM-L6-v2 weights on the CPU, as a user
//! would run each: one text per request, `concurrency` clients in a closed loop, texts/s and
//! p50/p99; and a check that both return the same embeddings.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::queue::{Proc, KEY};
use super::stats::{cosine, p50_p99, Spread};
use super::workers::REPS;

/// Concurrency levels of the embeddings comparison (a batching server's figures need 64 too).
pub const LEVELS: [usize; 4] = [1, 4, 16, 64];

/// Texts one client sends per run.
pub const TEXTS_PER_CLIENT: usize = 12;

/// One server's figures at one concurrency.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbedFigures {
    /// Texts per second.
    pub texts_s: Spread,
    /// p50 request latency, ms.
    pub p50_ms: Spread,
    /// p99 request latency, ms.
    pub p99_ms: Spread,
}

/// The comparison, or why infinity could not be run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embeddings {
    /// (concurrency, ours, infinity's) per level; infinity's is `None` when it did not run.
    pub rows: Vec<(usize, EmbedFigures, Option<EmbedFigures>)>,
    /// Ours again with batching off (`[batching] max_batch_rows = 1`, the shipped file
    /// otherwise), per level: each text its own forward pass, as before batching.
    pub unbatched: Vec<EmbedFigures>,
    /// The lowest cosine between the two servers' embeddings of the same texts.
    pub min_cosine: Option<f64>,
    /// Why infinity-emb did not run, if it did not.
    pub infinity_error: Option<String>,
}

/// Texts of everyday lengths (5 to 40 words), all different.
pub fn texts(count: usize) -> Vec<String> {
    let words = [
        "the",
        "invoice",
        "for",
        "march",
        "was",
        "paid",
        "late",
        "because",
        "our",
        "bank",
        "changed",
        "its",
        "transfer",
        "rules",
        "and",
        "nobody",
        "told",
        "accounting",
        "about",
        "it",
    ];
    (0..count)
        .map(|i| {
            let len = 5 + (i * 7) % 36;
            let mut text: Vec<&str> = (0..len).map(|j| words[(i + j * 3) % words.len()]).collect();
            text.push(if i % 2 == 0 { "today" } else { "yesterday" });
            format!("{} (note {i})", text.join(" "))
        })
        .collect()
}

/// An OpenAI-shaped embeddings server.
#[derive(Clone)]
struct Server {
    http: reqwest::Client,
    url: String,
    model: String,
}

impl Server {
    async fn embed(&self, text: &str) -> Result<Vec<f64>> {
        let reply = self
            .http
            .post(&self.url)
            .header("Authorization", format!("Bearer {KEY}"))
            .json(&json!({"model": self.model, "input": [text]}))
            .send()
            .await?;
        if !reply.status().is_success() {
            bail!("{}: HTTP {}", self.url, reply.status());
        }
        let body: Value = reply.json().await?;
        body["data"][0]["embedding"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_f64).collect())
            .ok_or_else(|| anyhow!("no embedding in {}", self.url))
    }

    /// One closed-loop run: (texts/s, p50 ms, p99 ms).
    async fn run(&self, concurrency: usize, texts: &[String]) -> Result<(f64, f64, f64)> {
        let start = Instant::now();
        let clients = (0..concurrency).map(|c| {
            let server = self.clone();
            let mine: Vec<String> = texts.iter().skip(c).step_by(concurrency).cloned().collect();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for text in mine {
                    let sent = Instant::now();
                    server.embed(&text).await?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        });
        let mut latencies = Vec::new();
        for client in futures::future::join_all(clients).await {
            latencies.extend(client??);
        }
        let wall = start.elapsed().as_secs_f64();
        let (p50, p99) = p50_p99(&latencies);
        Ok((latencies.len() as f64 / wall, p50, p99))
    }

    async fn measure(&self, concurrency: usize) -> Result<EmbedFigures> {
        let all = texts(TEXTS_PER_CLIENT * concurrency * (REPS + 1));
        let mut chunks = all.chunks(TEXTS_PER_CLIENT * concurrency);
        // Warm-up: one run's worth, excluded.
        self.run(concurrency, chunks.next().unwrap_or_default())
            .await?;
        let (mut per_s, mut p50, mut p99) = (vec![], vec![], vec![]);
        for chunk in chunks {
            let (t, a, b) = self.run(concurrency, chunk).await?;
            per_s.push(t);
            p50.push(a);
            p99.push(b);
        }
        Ok(EmbedFigures {
            texts_s: Spread::of(&per_s),
            p50_ms: Spread::of(&p50),
            p99_ms: Spread::of(&p99),
        })
    }
}

/// Waits until `url` answers 200 (at most `limit`).
pub(crate) async fn wait_ready(http: &reqwest::Client, url: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(reply) = http
            .get(url)
            .header("Authorization", format!("Bearer {KEY}"))
            .send()
            .await
        {
            if reply.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{url} not ready after {} s", limit.as_secs())
}

/// Starts `runpod-worker local` on free ports with `config` (default: the shipped runpod.toml).
pub(crate) fn start_local(binary: &Path, config: Option<&Path>) -> Result<(Proc, String)> {
    let mut command = Command::new(binary);
    command.args(["local", "--port", "0", "--http-port", "0"]);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command
        .env("RUNPOD_AI_API_KEY", KEY)
        .env("RUNPOD_LOG_LEVEL", "WARN")
        .env_remove("RUNPOD_ENDPOINT_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting local")?;
    let stdout = child.stdout.take().context("stdout")?;
    let proc = Proc { child };
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let base = loop {
        let line = lines.next().context("local exited before its banner")??;
        if let Some(url) = line.trim().strip_prefix("listening on ") {
            break url.to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok((proc, base))
}

/// Starts infinity-emb on `port` (its own venv's `infinity_emb`), offline, no telemetry.
fn start_infinity(infinity: &Path, model_dir: &Path, port: u16, log: &Path) -> Result<Proc> {
    let log = std::fs::File::create(log)?;
    let child = Command::new(infinity)
        .args(["v2", "--model-id"])
        .arg(model_dir)
        .args([
            "--served-model-name",
            "all-MiniLM-L6-v2",
            "--engine",
            "torch",
        ])
        .args([
            "--device",
            "cpu",
            "--no-bettertransformer",
            "--host",
            "127.0.0.1",
        ])
        .args(["--port", &port.to_string(), "--log-level", "warning"])
        .env("DO_NOT_TRACK", "1")
        .env("INFINITY_ANONYMOUS_USAGE_STATS", "0")
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting infinity_emb")?;
    Ok(Proc { child })
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The model name a server lists first at `/models`.
async fn model_name(http: &reqwest::Client, url: &str) -> Result<String> {
    let body: Value = http
        .get(url)
        .header("Authorization", format!("Bearer {KEY}"))
        .send()
        .await?
        .json()
        .await?;
    body["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{url} lists no model"))
}

async fn infinity_side(
    infinity: &Path,
    model_dir: &Path,
    scratch: &Path,
    http: &reqwest::Client,
) -> Result<(Proc, Server)> {
    if !infinity.exists() {
        bail!(
            "{} not found (make bench creates .venv-infinity)",
            infinity.display()
        );
    }
    let port = free_port()?;
    let log = scratch.join("infinity.log");
    let proc = start_infinity(infinity, model_dir, port, &log)?;
    let root = format!("http://127.0.0.1:{port}");
    if let Err(e) = wait_ready(http, &format!("{root}/health"), Duration::from_secs(240)).await {
        let tail: String = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        bail!("{e}; its log ends: {}", tail.join(" | "));
    }
    let model = model_name(http, &format!("{root}/models")).await?;
    Ok((
        proc,
        Server {
            http: http.clone(),
            url: format!("{root}/embeddings"),
            model,
        },
    ))
}

/// `local` started and ready, with its OpenAI embeddings route as a [`Server`].
async fn local_server(
    binary: &Path,
    config: Option<&Path>,
    http: &reqwest::Client,
) -> Result<(Proc, Server)> {
    let (local, base) = start_local(binary, config)?;
    let root = format!("{base}/v2/local/openai/v1");
    wait_ready(http, &format!("{root}/models"), Duration::from_secs(60)).await?;
    let server = Server {
        http: http.clone(),
        url: format!("{root}/embeddings"),
        model: model_name(http, &format!("{root}/models")).await?,
    };
    Ok((local, server))
}

/// Runs the comparison. `infinity` is the `infinity_emb` script; `model_dir` the
/// sentence-transformers directory of all-MiniLM-L6-v2.
pub async fn run(
    binary: &Path,
    infinity: &Path,
    model_dir: &Path,
    scratch: &Path,
) -> Result<Embeddings> {
    let http = reqwest::Client::new();
    let mut result = Embeddings::default();
    // What batching brings, measured: the shipped file with batching off.
    let shipped = std::fs::read_to_string("runpod.toml").unwrap_or_default();
    if shipped.contains("\nmax_batch_rows = 64 ") {
        // Written elsewhere, so its relative paths (resolved against the file's directory)
        // are made absolute: they still name the repository's models and spool.
        let here = std::env::current_dir()?;
        let absolute = |key: &str, path: &str| {
            (
                format!("\n{key} = {path:?}"),
                format!("\n{key} = {:?}", here.join(path).display().to_string()),
            )
        };
        let mut text = shipped.replace("\nmax_batch_rows = 64 ", "\nmax_batch_rows = 1  ");
        for (key, path) in [("model_dir", "handler/models"), ("spool_dir", "spool")] {
            let (from, to) = absolute(key, path);
            text = text.replace(&from, &to);
        }
        let config = scratch.join("runpod-unbatched.toml");
        std::fs::write(&config, text)?;
        let (local, ours) = local_server(binary, Some(&config), &http).await?;
        for concurrency in LEVELS {
            eprintln!("  embeddings ours, max_batch_rows = 1, c={concurrency}");
            result.unbatched.push(ours.measure(concurrency).await?);
        }
        drop(local);
    }
    let (local, ours) = local_server(binary, None, &http).await?;
    let mut our_rows = Vec::new();
    for concurrency in LEVELS {
        eprintln!("  embeddings ours c={concurrency}");
        our_rows.push((concurrency, ours.measure(concurrency).await?));
    }
    // One server at a time on the cores: ours is stopped before infinity starts... but the
    // cosine check needs both, so ours embeds the check texts first.
    let check = texts(8);
    let mut our_vectors = Vec::new();
    for text in &check {
        our_vectors.push(ours.embed(text).await?);
    }
    drop(local);
    match infinity_side(infinity, model_dir, scratch, &http).await {
        Ok((proc, theirs)) => {
            let mut lowest = f64::INFINITY;
            for (text, ours) in check.iter().zip(&our_vectors) {
                lowest = lowest.min(cosine(ours, &theirs.embed(text).await?));
            }
            result.min_cosine = Some(lowest);
            for (concurrency, ours) in our_rows {
                eprintln!("  embeddings infinity c={concurrency}");
                let figures = theirs.measure(concurrency).await?;
                result.rows.push((concurrency, ours, Some(figures)));
            }
            drop(proc);
        }
        Err(e) => {
            result.infinity_error = Some(format!("{e:#}"));
            result.rows = our_rows.into_iter().map(|(c, f)| (c, f, None)).collect();
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_all_different_and_of_varied_length() {
        let all = texts(100);
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), 100);
        let words = |t: &String| t.split_whitespace().count();
        assert!(all.iter().map(words).min() < all.iter().map(words).max());
    }
}
