//! The processes of a side-by-side run and the client that feeds them: one `mock-queue` child,
//! workers (ours: `serve`; the SDK's: `bench/sdk_worker.py`) pointed at it by the same
//! `RUNPOD_*` environment, each on its own endpoint id, and the harness's own HTTP calls with its
//! own timestamps (the mock's delayTime/executionTime are whole milliseconds).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// The key of the benchmark's mock queue.
pub const KEY: &str = "bench-key";

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    /// The child.
    pub child: Child,
}

impl Proc {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        super::procs::signal(&super::procs::tree(self.pid()), "CONT");
        super::procs::signal(&[self.pid()], "TERM");
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // A worker that does not drain in 5 s is not measured any more: kill its tree.
        super::procs::signal(&super::procs::tree(self.pid()), "KILL");
        let _ = self.child.wait();
    }
}

/// Reads the `listening on http://...` line a child prints first.
fn listening_line(child: &mut Child) -> Result<String> {
    let stdout = child.stdout.take().context("child stdout")?;
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("the child exited before printing its address");
        }
        if let Some(url) = line.trim().strip_prefix("listening on ") {
            let url = url.to_owned();
            // Keep draining its stdout so it never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return Ok(url);
        }
    }
}

/// Starts `runpod-worker mock-queue` on a free port: no rate limits (they are off unless
/// `--rate-limit`), a 5 s long-poll (the SDK re-polls at once after an empty take).
pub fn start_mock(binary: &Path) -> Result<(Proc, String)> {
    let mut child = Command::new(binary)
        .args(["mock-queue", "--port", "0", "--long-poll", "5"])
        .env("RUNPOD_AI_API_KEY", KEY)
        .env("RUNPOD_LOG_LEVEL", "WARN")
        .env_remove("RUNPOD_ENDPOINT_ID")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mock-queue")?;
    let url = listening_line(&mut child)?;
    Ok((Proc { child }, url))
}

/// Which worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worker {
    /// runpod-worker `serve`.
    Ours,
    /// The official SDK worker, `runpod==1.12.0`.
    Sdk,
}

impl Worker {
    /// Its short name in tables and endpoint ids.
    pub fn name(self) -> &'static str {
        match self {
            Worker::Ours => "ours",
            Worker::Sdk => "sdk",
        }
    }
}

/// How to start the workers.
#[derive(Debug, Clone)]
pub struct Setup {
    /// This binary.
    pub binary: PathBuf,
    /// Python with runpod, torch and tokenizers.
    pub python: PathBuf,
    /// The exported models (minilm.pt, tokenizer.json).
    pub models: PathBuf,
    /// Scratch space (configs, HOME, spool).
    pub scratch: PathBuf,
}

/// Our worker's config at `concurrency`: every slot usable by every job kind, all on the CPU.
/// The leak guard is off: 16 extractions at once grow the RSS past 3× its level after warm-up,
/// and the worker would ask to be replaced (and exit) in the middle of a run.
pub fn our_config(models: &Path, spool: &Path, concurrency: usize) -> String {
    format!(
        "[handler]\nmax_concurrency = {concurrency}\nmodel_dir = {models:?}\n\
         recycle_memory_factor = 0.0\n\n\
         [queue]\nspool_dir = {spool:?}\n\n\
         [handlers.echo]\nmax_concurrency = {concurrency}\ndevice = \"cpu\"\n\n\
         [handlers.extract]\nmax_concurrency = {concurrency}\ndevice = \"cpu\"\n\n\
         [handlers.classify]\nmax_concurrency = {concurrency}\ndevice = \"cpu\"\n"
    )
}

/// Starts `worker` on endpoint `endpoint` of the mock at `base`, with `concurrency` slots. The
/// SDK skips its automatic system checks: one of them connects to 8.8.8.8:53 and exits the
/// process when that fails, as it does on this offline machine.
pub fn start_worker(
    setup: &Setup,
    worker: Worker,
    base: &str,
    endpoint: &str,
    concurrency: usize,
) -> Result<Proc> {
    let root = format!("{base}/v2/{endpoint}");
    let dir = setup.scratch.join(endpoint);
    std::fs::create_dir_all(&dir)?;
    let mut command = match worker {
        Worker::Ours => {
            let config = dir.join("runpod.toml");
            std::fs::write(
                &config,
                our_config(&setup.models, &dir.join("spool"), concurrency),
            )?;
            let mut command = Command::new(&setup.binary);
            command.arg("serve").arg("--config").arg(config);
            command.args(["--http-port", "0"]);
            // Its disk check refuses to start under 10 % free, which a shared build machine
            // can reach; the disk is not what is measured (the SDK's checks are skipped too).
            command.env("RUNPOD_MIN_DISK_PERCENT", "0");
            command
        }
        Worker::Sdk => {
            let mut command = Command::new(&setup.python);
            command.arg(Path::new("bench").join("sdk_worker.py"));
            command
                .env("BENCH_MODELS", &setup.models)
                .env("BENCH_CONCURRENCY", concurrency.to_string())
                .env("RUNPOD_SKIP_GPU_CHECK", "true")
                .env("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true");
            command
        }
    };
    command
        .env(
            "RUNPOD_WEBHOOK_GET_JOB",
            format!("{root}/job-take/$ID?gpu=bench"),
        )
        .env(
            "RUNPOD_WEBHOOK_POST_OUTPUT",
            format!("{root}/job-done/$RUNPOD_POD_ID/$ID?gpu=bench"),
        )
        .env(
            "RUNPOD_WEBHOOK_POST_STREAM",
            format!("{root}/job-stream/$RUNPOD_POD_ID/$ID?gpu=bench"),
        )
        .env(
            "RUNPOD_WEBHOOK_PING",
            format!("{root}/ping/$RUNPOD_POD_ID?gpu=bench"),
        )
        .env("RUNPOD_AI_API_KEY", KEY)
        .env("RUNPOD_POD_ID", format!("{endpoint}-worker"))
        .env("RUNPOD_PING_INTERVAL", "1000")
        // Both quiet: the SDK logs every job at DEBUG by default, ours at INFO.
        .env("RUNPOD_LOG_LEVEL", "WARN")
        .env("HOME", &dir) // a ~/.runpod/config.toml would override the key
        .env_remove("RUNPOD_ENDPOINT_ID")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", worker.name()))?;
    Ok(Proc { child })
}

/// Whether a `/status` state is final.
pub fn is_final(status: &str) -> bool {
    matches!(status, "COMPLETED" | "FAILED" | "CANCELLED" | "TIMED_OUT")
}

/// The harness's client of the mock.
#[derive(Clone)]
pub struct Queue {
    http: reqwest::Client,
    base: String,
}

impl Queue {
    /// A client of the mock at `base`.
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("a client"),
            base: base.to_owned(),
        }
    }

    /// The mock's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let reply = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {KEY}"))
            .json(body)
            .send()
            .await?;
        let status = reply.status();
        if !status.is_success() {
            bail!("{path}: HTTP {status}");
        }
        Ok(reply.json().await?)
    }

    /// Queues a job; its id.
    pub async fn submit(&self, endpoint: &str, input: &Value) -> Result<String> {
        let reply = self
            .post(&format!("/v2/{endpoint}/run"), &json!({ "input": input }))
            .await?;
        reply["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("/run answered without an id: {reply}"))
    }

    /// The job's `/status` body once it has ended (`/status-sync` holds the request: no polling).
    pub async fn settle(&self, endpoint: &str, id: &str) -> Result<Value> {
        loop {
            let reply = self
                .http
                .get(format!(
                    "{}/v2/{endpoint}/status-sync/{id}?wait=300000",
                    self.base
                ))
                .header("Authorization", format!("Bearer {KEY}"))
                .send()
                .await?;
            let body: Value = reply.json().await?;
            if is_final(body["status"].as_str().unwrap_or_default()) {
                return completed(body);
            }
        }
    }

    /// How many of the endpoint's jobs are queued or running (its `/health`): 0 once every
    /// job submitted so far has ended. (The completed count is no clock: finished jobs leave
    /// it as their retention runs out.)
    pub async fn unfinished(&self, endpoint: &str) -> Result<u64> {
        let body: Value = self
            .http
            .get(format!("{}/v2/{endpoint}/health", self.base))
            .header("Authorization", format!("Bearer {KEY}"))
            .send()
            .await?
            .json()
            .await?;
        let count = |key: &str| {
            body["jobs"][key]
                .as_u64()
                .ok_or_else(|| anyhow!("/health without jobs.{key}: {body}"))
        };
        Ok(count("inQueue")? + count("inProgress")?)
    }

    /// Submits a job and waits for its result in one request (`/runsync?wait=`).
    pub async fn run_sync(&self, endpoint: &str, input: &Value) -> Result<Value> {
        let body = self
            .post(
                &format!("/v2/{endpoint}/runsync?wait=300000"),
                &json!({ "input": input }),
            )
            .await?;
        let status = body["status"].as_str().unwrap_or_default();
        if is_final(status) {
            return completed(body);
        }
        let id = body["id"].as_str().unwrap_or_default().to_owned();
        self.settle(endpoint, &id).await
    }
}

/// The body of a completed job, or an error naming how it ended.
fn completed(body: Value) -> Result<Value> {
    if body["status"] == "COMPLETED" {
        Ok(body)
    } else {
        bail!("job ended {}: {}", body["status"], body["error"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_config_gives_every_kind_all_slots() {
        let text = our_config(Path::new("/m"), Path::new("/s"), 16);
        let config: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(config["handler"]["max_concurrency"].as_integer(), Some(16));
        for kind in ["echo", "extract", "classify"] {
            assert_eq!(
                config["handlers"][kind]["max_concurrency"].as_integer(),
                Some(16)
            );
            assert_eq!(config["handlers"][kind]["device"].as_str(), Some("cpu"));
        }
        assert!(is_final("FAILED") && !is_final("IN_PROGRESS"));
    }
}
