//! The real binary: start-up refusals, the unhealthy ping, SIGTERM drain, test-input.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::helpers::{send_signal, spawn_mock, worker_command, BIN, EP, WAIT};

#[test]
fn version_is_printed() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("runpod-worker {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn serve_refuses_to_start_without_a_job_queue() {
    let out = Command::new(BIN)
        .arg("serve")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RUNPOD_WEBHOOK_GET_JOB is not set"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_sends_the_unhealthy_ping_and_exits_1() {
    let mock = spawn_mock(Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runpod.toml");
    std::fs::write(&config, "[handler]\nmax_concurrency = 0\n").unwrap();
    let out = worker_command(&mock.base_url(), "bad")
        .env("RUNPOD_WORKER_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("handler.max_concurrency"), "{stderr}");
    assert!(
        !stderr.contains("test-key"),
        "the key never reaches a log line"
    );
    let ping = mock
        .endpoint(EP)
        .pings
        .into_iter()
        .find(|p| p.worker == "bad")
        .expect("unhealthy ping");
    assert_eq!(
        ping.query.get("status").map(String::as_str),
        Some("unhealthy")
    );
    assert_eq!(ping.query.get("check").map(String::as_str), Some("config"));
    assert!(ping.query["reason"].contains("max_concurrency"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_job_in_hand_delivers_it_and_exits_0() {
    let mock = spawn_mock(Duration::from_secs(20));
    let mut child = worker_command(&mock.base_url(), "proc")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    mock.enqueue(
        EP,
        json!({"id": "term", "input": {"task": "echo", "sleep_ms": 1500}}),
    );
    // Held by the worker (its heartbeat lists it), not just handed out by the queue.
    mock.state()
        .wait_for(WAIT, |i| {
            let pings = &i.endpoints.get(EP)?.pings;
            pings
                .iter()
                .any(|p| p.worker == "proc" && p.job_ids.contains(&"term".to_owned()))
                .then_some(())
        })
        .await
        .expect("the worker holds the job");
    send_signal(child.id(), "TERM");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let done = mock
        .wait_done(EP, "term", Duration::from_secs(1))
        .await
        .expect("result delivered before exit");
    assert_eq!(done.body["output"]["sleep_ms"], 1500);
}

#[test]
fn test_input_runs_one_job_and_exits_non_zero_on_an_error_result() {
    let ok = Command::new(BIN)
        .args([
            "test-input",
            "--json",
            r#"{"input": {"task": "echo", "n": 1}}"#,
        ])
        .env(
            "RUNPOD_WORKER_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/runpod.toml"),
        )
        .output()
        .unwrap();
    assert!(ok.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(printed, json!({"output": {"task": "echo", "n": 1}}));

    let bad = Command::new(BIN)
        .args(["test-input", "--json", r#"{"input": {"task": "nope"}}"#])
        .env(
            "RUNPOD_WORKER_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/runpod.toml"),
        )
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).contains("InvalidInput"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_is_killed_is_requeued_after_the_lease_and_completed_by_another() {
    let mock =
        crate::helpers::spawn_mock_with_lease(Duration::from_secs(2), Duration::from_secs(2));
    let mut first = worker_command(&mock.base_url(), "doomed")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    mock.enqueue(
        EP,
        json!({"id": "orphan", "input": {"task": "echo", "sleep_ms": 1000}}),
    );
    mock.state()
        .wait_for(WAIT, |i| {
            (i.endpoints.get(EP)?.holder_of("orphan")? == "doomed").then_some(())
        })
        .await
        .expect("the first worker took the job");
    first.kill().unwrap(); // SIGKILL: no drain, no result
    first.wait().unwrap();

    let mut second = worker_command(&mock.base_url(), "rescuer")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let done = mock.wait_done(EP, "orphan", Duration::from_secs(30)).await;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(second.id().to_string())
        .status();
    let exit = tokio::task::spawn_blocking(move || second.wait())
        .await
        .unwrap()
        .unwrap();
    let done = done.expect("the requeued job was completed");
    assert_eq!(done.worker, "rescuer");
    assert_eq!(done.body["output"]["sleep_ms"], 1000);
    let queue = mock.endpoint(EP);
    assert_eq!(queue.retried, 1);
    assert_eq!(queue.jobs["orphan"].retries, 1);
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn every_handler_test_input_runs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("handler");
    let config = tempfile::NamedTempFile::new().unwrap();
    let mut text = std::fs::read_to_string(dir.parent().unwrap().join("runpod.toml")).unwrap();
    text.push_str("\n[handlers.example]\nkind = \"torchscript\"\nmodel = \"example_linear.pt\"\ninputs = [\"x\"]\nmax_concurrency = 1\ndevice = \"cpu\"\n");
    text = text.replace(
        "model_dir = \"handler/models\"",
        &format!("model_dir = \"{}\"", dir.join("models").display()),
    );
    std::fs::write(config.path(), text).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(dir.join("test_inputs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.push(dir.join("test_input.json"));
    for file in files {
        let out = Command::new(BIN)
            .args(["test-input", "--file"])
            .arg(&file)
            .arg("--config")
            .arg(config.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {stdout}{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert!(
            last.get("output").is_some() && last.get("error").is_none(),
            "{}: {last}",
            file.display()
        );
    }
}

#[test]
fn serve_refuses_a_job_queue_that_is_not_a_url_instead_of_looping_on_it() {
    let out = Command::new(BIN)
        .arg("serve")
        .env("RUNPOD_WEBHOOK_GET_JOB", "job-take/$ID")
        .env_remove("RUNPOD_WEBHOOK_PING")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RUNPOD_WEBHOOK_GET_JOB must be an http:// or https:// URL"),
        "{stderr}"
    );
}

/// A config file with echo only and the given `[queue]` lines.
fn echo_config(dir: &std::path::Path, queue: &str) -> std::path::PathBuf {
    let file = dir.join("runpod.toml");
    let text =
        format!("[queue]\n{queue}\n[handlers.echo]\nmax_concurrency = 1\ndevice = \"cpu\"\n");
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn test_input_applies_the_job_and_result_size_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = echo_config(
        dir.path(),
        "max_job_size = \"100KB\"\nmax_result_size = \"20KB\"",
    );
    let run = |padding: usize| {
        let job = json!({"input": {"task": "echo", "pad": "x".repeat(padding)}});
        let file = dir.path().join("job.json");
        std::fs::write(&file, job.to_string()).unwrap();
        let out = Command::new(BIN)
            .args(["test-input", "--file"])
            .arg(&file)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), printed["output"]["error_type"].clone())
    };
    assert_eq!(run(1_000), (Some(0), serde_json::Value::Null));
    assert_eq!(run(50_000), (Some(1), json!("OutputTooLarge")));
    assert_eq!(run(200_000), (Some(1), json!("InvalidInput")));
}

#[test]
fn check_config_refuses_what_serve_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let run = |text: &str| {
        let file = dir.path().join("check.toml");
        std::fs::write(&file, text).unwrap();
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&file)
            .output()
            .unwrap()
    };
    let missing_model = run(&format!(
        "[handler]\nmodel_dir = {:?}\n[handlers.mine]\nkind = \"torchscript\"\nmodel = \"absent.pt\"\ninputs = [\"x\"]\nmax_concurrency = 1\ndevice = \"cpu\"\n",
        dir.path()
    ));
    assert_eq!(missing_model.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing_model.stderr);
    assert!(
        stderr.contains("absent.pt") && stderr.contains("not found"),
        "{stderr}"
    );

    std::fs::write(dir.path().join("garbage.pt"), b"not a model").unwrap();
    let unloadable = run(&format!(
        "[handler]\nmodel_dir = {:?}\n[handlers.mine]\nkind = \"torchscript\"\nmodel = \"garbage.pt\"\ninputs = [\"x\"]\nmax_concurrency = 1\ndevice = \"cpu\"\n",
        dir.path()
    ));
    assert_eq!(unloadable.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unloadable.stderr).contains("cannot load"));

    let bad_host = run(
        "[server]\nhost = \"my laptop\"\n[handlers.echo]\nmax_concurrency = 1\ndevice = \"cpu\"\n",
    );
    assert_eq!(bad_host.status.code(), Some(1));
    let overflow = run("[handler]\ngpu_memory_per_request = \"99999999999999999999TB\"\n[handlers.echo]\nmax_concurrency = 1\ndevice = \"cpu\"\n");
    assert_eq!(overflow.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&overflow.stderr).contains("over"));

    let fine = run("[handlers.echo]\nmax_concurrency = 1\ndevice = \"cpu\"\n");
    assert!(
        fine.status.success(),
        "{}",
        String::from_utf8_lossy(&fine.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_probe_exits_0_on_a_ready_worker_and_1_otherwise() {
    let worker = crate::helpers::TestWorker::start(crate::helpers::test_config(), |h| h, 200).await;
    let probe = |url: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["health", "--url", &url])
                .output()
                .unwrap()
        })
    };
    let ready = probe(format!("{}/ready", worker.http)).await.unwrap();
    assert_eq!(ready.status.code(), Some(0), "{ready:?}");
    // The port from the config, overridden by the environment as in the image.
    let port = worker.http.rsplit(':').next().unwrap().to_owned();
    let from_env = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("health")
            .env_remove("RUNPOD_WORKER_CONFIG")
            .env("RUNPOD_WORKER_HOST", "0.0.0.0")
            .env("RUNPOD_WORKER_PORT", port)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(from_env.status.code(), Some(0), "{from_env:?}");
    worker.stop().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}/ready", listener.local_addr().unwrap());
    drop(listener);
    let down = probe(closed).await.unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("no answer"));
}

/// The unhealthy ping the worker `worker` sent, as `(check, reason)`.
fn unhealthy_ping(mock: &mock_queue::MockQueue, worker: &str) -> (String, String) {
    let ping = mock
        .endpoint(EP)
        .pings
        .into_iter()
        .find(|p| {
            p.worker == worker && p.query.get("status").map(String::as_str) == Some("unhealthy")
        })
        .expect("an unhealthy ping");
    (ping.query["check"].clone(), ping.query["reason"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_below_the_sdks_minimums_sends_the_unhealthy_ping_with_its_check_and_exits_1() {
    let mock = spawn_mock(Duration::from_secs(2));
    for (worker, variable, value, check) in [
        ("low-memory", "RUNPOD_MIN_MEMORY_GB", "1000000", "memory"),
        ("low-disk", "RUNPOD_MIN_DISK_PERCENT", "100.5", "disk"),
    ] {
        let out = worker_command(&mock.base_url(), worker)
            .env_remove("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS")
            .env(variable, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let (sent_check, reason) = unhealthy_ping(&mock, worker);
        assert_eq!(sent_check, check, "{reason}");
        assert!(reason.contains(variable), "{reason}");
        assert!(!stderr.contains("ready:"), "it never took a job: {stderr}");
    }
    let out = worker_command(&mock.base_url(), "bad-variable")
        .env("RUNPOD_MIN_CUDA_VERSION", "newest")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(unhealthy_ping(&mock, "bad-variable").0, "config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_checks_show_their_timings_before_the_worker_is_ready() {
    use std::io::BufRead;
    let mock = spawn_mock(Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runpod.toml");
    std::fs::write(
        &config,
        "[handlers.echo]\nmax_concurrency = 1\ndevice = \"cpu\"\n",
    )
    .unwrap();
    let mut child = worker_command(&mock.base_url(), "fit")
        .env("RUNPOD_WORKER_CONFIG", &config)
        .env_remove("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS")
        .env("RUNPOD_MIN_MEMORY_GB", "0")
        .env("RUNPOD_MIN_DISK_PERCENT", "0")
        .env_remove("RUNPOD_LOG_LEVEL")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let ready = line.contains(" ready: ");
            seen.push(line);
            if ready {
                break;
            }
        }
        seen
    });
    let lines = tokio::time::timeout(WAIT, lines).await.unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let checks = lines
        .iter()
        .position(|l| l.contains("start-up checks passed in"))
        .unwrap_or_else(|| panic!("the checks are logged: {lines:?}"));
    let ready = lines.iter().position(|l| l.contains(" ready: ")).unwrap();
    assert!(checks < ready, "before the first take: {lines:?}");
    let line = &lines[checks];
    assert!(
        line.contains("memory ") && line.contains("disk / ") && line.contains(" ms)"),
        "each check with its timing: {line}"
    );
}
