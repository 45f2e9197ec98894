//! Load-balancing mode, black-box: the real binary as `serve --load-balancing`, its routes
//! (`/runsync`, `/stream`, OpenAI's `/v1/*`, the ping), the 204 → 200 start, the 429 of a full
//! GPU, the API key, a separate health port, and the drain on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{send_signal, BIN, ECHO_CONFIG, WAIT};
use crate::local_process::{lines_of, lines_until, listening_address};

/// The repository's `runpod.toml`: the real MiniLM models.
const MODELS_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/runpod.toml");

/// A `serve --load-balancing` process on a free port; killed when dropped.
struct LbWorker {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    base: String,
    stderr: mpsc::Receiver<String>,
}

impl LbWorker {
    /// Starts it with `config`, both ports on one free port unless `env` says otherwise.
    fn spawn(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--load-balancing", "--config"])
            .arg(config)
            .env_remove("RUNPOD_WEBHOOK_GET_JOB")
            .env_remove("RUNPOD_AI_API_KEY")
            .env_remove("RUNPOD_ENDPOINT_ID")
            .env_remove("HEALTH_CHECK_PATH")
            .env("PORT", "0")
            .env("PORT_HEALTH", "0")
            .env("RUNPOD_WORKER_HOST", "127.0.0.1")
            .env("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        let base = listening_address(&stdout);
        Self {
            child,
            base,
            stderr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Waits for the ping's 200.
    async fn ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = reqwest::get(self.url("/ping")).await.map(|r| r.status());
            if matches!(status, Ok(StatusCode::OK)) {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/health` satisfies `holds` (saying `what` otherwise); that `/health`.
    async fn wait_health(&self, what: &str, holds: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let health: Value = reqwest::get(self.url("/health"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if holds(&health) {
                return health;
            }
            assert!(Instant::now() < deadline, "{what}: {health}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn sigterm(&self) {
        send_signal(self.child.id(), "TERM");
    }

    async fn exit_code(mut self) -> Option<i32> {
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        tokio::task::spawn_blocking(move || child.wait().unwrap().code())
            .await
            .unwrap()
    }
}

impl Drop for LbWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn post(url: &str, body: Value) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

fn config_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("runpod.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ping_answers_204_while_the_models_load_then_200() {
    let worker = LbWorker::spawn(Path::new(MODELS_CONFIG), &[]);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    let (mut first_204, mut first_200) = (None, None);
    while first_200.is_none() {
        assert!(Instant::now() < deadline, "never ready");
        let Ok(response) = client.get(worker.url("/ping")).send().await else {
            continue;
        };
        match response.status() {
            StatusCode::NO_CONTENT => {
                first_204.get_or_insert_with(Instant::now);
                // Nothing runs before the models are loaded.
                let (status, _, body) =
                    post(&worker.url("/runsync"), json!({"input": {"task": "echo"}})).await;
                if first_200.is_none() && status == StatusCode::SERVICE_UNAVAILABLE {
                    assert_eq!(body["error_type"], "Starting", "{body}");
                }
            }
            StatusCode::OK => first_200 = Some(Instant::now()),
            other => panic!("the ping answered {other} while starting"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_204 = first_204.expect("a 204 while the MiniLM models load");
    eprintln!(
        "load-balancing cold start: 204 -> 200 in {} ms",
        first_200.unwrap().duration_since(first_204).as_millis()
    );
    let (status, _, body) = post(
        &worker.url("/runsync"),
        json!({"input": {"task": "classify", "text": "I love it", "labels": ["positive", "negative"]}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["output"]["label"], "positive", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_answers_in_the_shape_of_its_queue_counterpart() {
    let worker = LbWorker::spawn(Path::new(MODELS_CONFIG), &[]);
    worker.ready().await;
    let client = reqwest::Client::new();

    // /runsync: the queue API's body.
    let (status, _, body) = post(
        &worker.url("/runsync"),
        json!({"input": {"task": "echo", "message": "hi"}, "policy": {"executionTimeout": 5000}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "COMPLETED", "{body}");
    assert_eq!(body["output"]["message"], "hi");
    assert!(body["id"].as_str().unwrap().starts_with("lb-"), "{body}");
    for field in ["delayTime", "executionTime"] {
        assert!(body[field].is_u64(), "{field}: {body}");
    }
    assert!(body["workerId"].is_string(), "{body}");

    // A job's own error: FAILED, as the queue shows it (the error object as output and text).
    let (status, _, body) = post(&worker.url("/runsync"), json!({"input": {"task": "nope"}})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "FAILED", "{body}");
    assert_eq!(body["output"]["error_type"], "InvalidInput", "{body}");
    let error: Value = serde_json::from_str(body["error"].as_str().unwrap()).unwrap();
    assert_eq!(error, body["output"]);

    // A malformed body: 400, naming the field.
    for (request, field) in [
        (json!({"inputs": {}}), "input: required"),
        (json!({"input": "text"}), "input: must be an object"),
        (
            json!({"input": {}, "policy": {"executionTimeout": "soon"}}),
            "policy.executionTimeout",
        ),
    ] {
        let (status, _, body) = post(&worker.url("/runsync"), request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error_type"], "InvalidInput");
        assert!(body["error"].as_str().unwrap().contains(field), "{body}");
    }
    let not_json = client
        .post(worker.url("/runsync"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);

    // Over 30 MB: a JSON 413.
    let big = client
        .post(worker.url("/runsync"))
        .body(vec![b' '; 31_000_000])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = big.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("30 MB"), "{body}");

    // /stream: each chunk as an event, then `done` with the /runsync body.
    let text = client
        .post(worker.url("/stream"))
        .json(&json!({"input": {"task": "echo", "stream": 3}}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(data.len(), 4, "{text}");
    for (i, chunk) in data[..3].iter().enumerate() {
        assert_eq!(chunk["output"]["chunk"], i, "{text}");
    }
    assert!(text.contains("event: done"), "{text}");
    assert_eq!(data[3]["status"], "COMPLETED", "{text}");

    // OpenAI's routes.
    let (status, _, body) = post(
        &worker.url("/v1/embeddings"),
        json!({"model": "all-MiniLM-L6-v2", "input": ["hello", "world"], "encoding_format": "float"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 384);
    let models: Value = reqwest::get(worker.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "all-MiniLM-L6-v2");
    let (status, _, body) = post(
        &worker.url("/v1/embeddings"),
        json!({"input": "x", "model": "gpt"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let unknown = reqwest::get(worker.url("/v1/chat/completions"))
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    // The worker's own routes, and a 404 that lists the routes.
    let health: Value = reqwest::get(worker.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Degraded on a machine without a GPU (classify asks for CUDA): still serving.
    assert!(
        ["healthy", "degraded"].contains(&health["status"].as_str().unwrap()),
        "{health}"
    );
    assert!(
        health["jobs"]["completed"].as_u64().unwrap() >= 4,
        "{health}"
    );
    let metrics = reqwest::get(worker.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("runpod_worker_jobs_total"), "{metrics}");
    let nowhere = reqwest::get(worker.url("/run")).await.unwrap();
    assert_eq!(nowhere.status(), StatusCode::NOT_FOUND);
    let body: Value = nowhere.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("POST /runsync"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_gpu_answers_429_with_retry_after_and_a_full_waiting_room_refuses_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let load = dir.path().join("gpu-load");
    std::fs::write(&load, "20GB").unwrap();
    let config = config_file(
        dir.path(),
        &format!(
            r#"
            [handler]
            max_concurrency = 1
            local_queue_max_wait_s = 1
            [server]
            max_waiting = 0
            [gpu]
            simulate = "24GB"
            sample_interval_ms = 50
            external_load_file = "{}"
            [handlers.gpu]
            kind = "echo"
            max_concurrency = 1
            device = "cuda"
            gpu_memory = "6GB"
            "#,
            load.display()
        ),
    );
    let worker = LbWorker::spawn(&config, &[]);
    worker.ready().await;

    // 20 GB of the simulated 24 GB used by others: the job cannot get its 6 GB in 1 s.
    let (status, headers, body) =
        post(&worker.url("/runsync"), json!({"input": {"task": "gpu"}})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        body["output"]["error_type"], "InsufficientGPUMemory",
        "{body}"
    );
    assert_eq!(body["output"]["retry_after"], retry_after);
    // A streaming request refused before any chunk: the same 429, not an event stream.
    let (status, headers, body) = post(
        &worker.url("/stream"),
        json!({"input": {"task": "gpu", "stream": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(headers.contains_key("retry-after"));
    std::fs::write(&load, "0GB").unwrap();
    worker
        .wait_health("the relief was never sampled", |h| {
            h["gpus"][0]["others_used_gb"] == 0.0
        })
        .await;

    // One job runs; with no waiting room, the next is refused at once, not after the wait.
    let running = tokio::spawn({
        let url = worker.url("/runsync");
        async move { post(&url, json!({"input": {"task": "gpu", "sleep_ms": 1500}})).await }
    });
    worker
        .wait_health("the first job never started", |h| {
            h["handlers"]["gpu"]["active"] == 1
        })
        .await;
    let asked = Instant::now();
    let (status, headers, body) =
        post(&worker.url("/runsync"), json!({"input": {"task": "gpu"}})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "refused at once, not after the local wait: {:?}",
        asked.elapsed()
    );
    let (status, _, body) = running.await.unwrap();
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &json!("COMPLETED")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_requests_in_flight_and_refuses_new_ones() {
    let worker = LbWorker::spawn(Path::new(ECHO_CONFIG), &[]);
    worker.ready().await;
    let running = tokio::spawn({
        let url = worker.url("/runsync");
        async move { post(&url, json!({"input": {"task": "echo", "sleep_ms": 2000}})).await }
    });
    worker
        .wait_health("the job never started", |h| {
            h["handlers"]["echo"]["active"] == 1
        })
        .await;
    worker.sigterm();
    let deadline = Instant::now() + WAIT;
    loop {
        let ping = reqwest::get(worker.url("/ping")).await.unwrap();
        if ping.status() == StatusCode::SERVICE_UNAVAILABLE {
            let body: Value = ping.json().await.unwrap();
            assert_eq!(body["status"], "draining", "{body}");
            assert!(body["reason"].is_string(), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "the ping never said draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, body) = post(&worker.url("/runsync"), json!({"input": {"task": "echo"}})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error_type"], "Draining");
    let (status, _, body) = running.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["status"], "COMPLETED",
        "the request in flight finished: {body}"
    );
    assert_eq!(worker.exit_code().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_the_job_routes_but_not_the_ping() {
    let worker = LbWorker::spawn(Path::new(ECHO_CONFIG), &[("RUNPOD_AI_API_KEY", "lb-key")]);
    worker.ready().await;
    let client = reqwest::Client::new();
    let job = json!({"input": {"task": "echo"}});
    let without = client
        .post(worker.url("/runsync"))
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), StatusCode::UNAUTHORIZED);
    let wrong = client
        .post(worker.url("/runsync"))
        .header("Authorization", "Bearer other")
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let openai = client.get(worker.url("/v1/models")).send().await.unwrap();
    assert_eq!(openai.status(), StatusCode::UNAUTHORIZED);
    let body: Value = openai.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    let with = client
        .post(worker.url("/runsync"))
        .header("Authorization", "bearer lb-key")
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), StatusCode::OK);
    for open in ["/ping", "/health"] {
        let status = client.get(worker.url(open)).send().await.unwrap().status();
        assert_eq!(status, StatusCode::OK, "{open}");
    }
    let log: Vec<String> = worker.stderr.try_iter().collect();
    assert!(
        !log.join("\n").contains("lb-key"),
        "the key never reaches the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_health_port_serves_the_ping_at_health_check_path() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let health_port = free.local_addr().unwrap().port();
    drop(free);
    let health_port = health_port.to_string();
    let worker = LbWorker::spawn(
        Path::new(ECHO_CONFIG),
        &[
            ("PORT_HEALTH", &health_port),
            ("HEALTH_CHECK_PATH", "/healthz"),
        ],
    );
    let ping = format!("http://127.0.0.1:{health_port}/healthz");
    let deadline = Instant::now() + WAIT;
    while reqwest::get(&ping).await.map(|r| r.status()).ok() != Some(StatusCode::OK) {
        assert!(
            Instant::now() < deadline,
            "the health port never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The requests stay on PORT; the health port serves no job.
    let on_health = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{health_port}/runsync"))
        .json(&json!({"input": {"task": "echo"}}))
        .send()
        .await
        .unwrap();
    assert_ne!(on_health.status(), StatusCode::OK);
    let (status, _, _) = post(&worker.url("/runsync"), json!({"input": {"task": "echo"}})).await;
    assert_eq!(status, StatusCode::OK);
    let (line, seen) = lines_until(&worker.stderr, "load-balancing mode");
    let line = line.unwrap_or_else(|| panic!("no mode line in:\n{seen}"));
    assert!(line.contains("/healthz"), "{line}");
}

#[test]
fn serve_with_port_and_no_queue_chooses_load_balancing_mode() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port().to_string();
    drop(free);
    let mut child = Command::new(BIN)
        .args(["serve", "--config", ECHO_CONFIG])
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env("PORT", &port)
        .env("PORT_HEALTH", &port)
        .env("RUNPOD_WORKER_HOST", "127.0.0.1")
        .env("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = lines_of(child.stderr.take().unwrap());
    let (line, seen) = lines_until(&stderr, "load-balancing mode");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.is_some_and(|l| l.contains(&port)), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_stops_its_job_and_frees_its_slot() {
    let worker = LbWorker::spawn(Path::new(ECHO_CONFIG), &[]);
    worker.ready().await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let gone = impatient
        .post(worker.url("/runsync"))
        .json(&json!({"input": {"task": "echo", "sleep_ms": 10_000}}))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up first");
    let health = worker
        .wait_health("the job ran on after its client left", |h| {
            h["jobs"]["cancelled"] == 1
        })
        .await;
    assert_eq!(health["handlers"]["echo"]["active"], 0, "{health}");
}
