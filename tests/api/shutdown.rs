//! Shutdown is bounded and prompt: jobs still waiting for a slot when the grace ends are
//! answered, a second signal ends the drain at once, and a take answer that stalls in its body
//! does not hold the worker up.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use worker::config::{DeviceChoice, HandlerConfig};
use worker::runner::run_worker;

use crate::helpers::{
    send_signal, spawn_mock, test_config, worker_command, GateHandler, TestWorker, EP, WAIT,
};
use crate::local_process::{lines_of, listening_address};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_their_handler_when_the_grace_ends_are_answered_interrupted() {
    let mut config = test_config();
    config.handler.drain_grace_s = 1;
    config.handler.local_queue_max_wait_s = 600;
    config.handlers.insert(
        "hold".into(),
        HandlerConfig {
            kind: Some("echo".into()),
            max_concurrency: 1,
            device: DeviceChoice::Cpu,
            ..HandlerConfig::default()
        },
    );
    let gate = GateHandler::new();
    let worker = TestWorker::start(config, |h| h.with_handler("hold", gate.clone()), 100).await;
    // Four free slots, and echo could start four: one batch brings all three; one runs, two
    // wait in the local queue for `hold`'s single slot.
    worker.mock.enqueue_all(
        EP,
        (1..=3).map(|i| json!({"id": format!("h{i}"), "input": {"task": "hold"}})),
    );
    worker.wait_held(&["h1", "h2", "h3"]).await;
    gate.wait_started(1).await;
    let mock = worker.mock.clone();
    worker.shutdown.cancel();
    for id in ["h1", "h2", "h3"] {
        let done = mock.wait_done(EP, id, WAIT).await;
        let done = done.unwrap_or_else(|| panic!("{id} was left unanswered"));
        assert_eq!(done.body["output"]["error_type"], "Interrupted", "{id}");
    }
    worker.finished().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once_and_answers_the_job_interrupted() {
    let mock = spawn_mock(Duration::from_secs(2));
    let mut child = worker_command(&mock.base_url(), "twice")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = lines_of(child.stderr.take().unwrap());
    mock.enqueue(
        EP,
        json!({"id": "long", "input": {"task": "echo", "sleep_ms": 600000}}),
    );
    mock.state()
        .wait_for(WAIT, |i| {
            let pings = &i.endpoints.get(EP)?.pings;
            pings
                .iter()
                .any(|p| p.job_ids.contains(&"long".to_owned()))
                .then_some(())
        })
        .await
        .expect("the worker holds the job");
    let kill = || {
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap()
    };
    kill();
    // The first signal has been taken in (the drain, with its 60 s grace, has begun).
    let started_draining = tokio::task::spawn_blocking(move || {
        seen.iter().any(|line| line.contains("SIGTERM received"))
    });
    assert!(started_draining.await.unwrap());
    let signalled = Instant::now();
    kill();
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exited {:?} after the second signal",
        signalled.elapsed()
    );
    assert!(
        exit.code().is_some(),
        "exited by itself, not killed: {exit:?}"
    );
    let done = mock.wait_done(EP, "long", WAIT).await.expect("answered");
    assert_eq!(done.body["output"]["error_type"], "Interrupted");
}

/// A queue whose job-take answers with headers and the start of a body, then nothing; every
/// other route answers 204 at once.
async fn stalling_queue() -> (String, Arc<tokio::sync::Notify>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let taken = Arc::new(tokio::sync::Notify::new());
    let notify = taken.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = vec![0u8; 4096];
            let n = socket.read(&mut request).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..n]).into_owned();
            if head.contains("/job-take") {
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n[")
                    .await;
                held.push(socket);
                notify.notify_one();
            } else {
                let _ = socket
                    .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        }
    });
    (base, taken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_answer_that_stalls_in_its_body_does_not_hold_up_the_shutdown() {
    let (base, taken) = stalling_queue().await;
    let shutdown = CancellationToken::new();
    let setup = crate::helpers::setup_against(&base, "stalled", &shutdown).await;
    let worker = tokio::spawn(run_worker(setup));
    tokio::time::timeout(WAIT, taken.notified())
        .await
        .expect("the worker asked for a job");
    let stopping = Instant::now();
    shutdown.cancel();
    let exit = tokio::time::timeout(Duration::from_secs(15), worker).await;
    assert!(exit.is_ok(), "still running 15 s after the shutdown");
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "took {:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_models_load_exits_at_once() {
    // Forty handlers that each load their own copy of MiniLM: loading takes many seconds.
    let dir = tempfile::tempdir().unwrap();
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("handler/models");
    let mut toml = format!("[handler]\nmax_concurrency = 1\nmodel_dir = {models:?}\n");
    for i in 0..40 {
        toml.push_str(&format!(
            "[handlers.m{i}]\nkind = \"torchscript\"\nmodel = \"minilm.pt\"\n\
             inputs = [\"input_ids\", \"attention_mask\"]\nmax_concurrency = 1\ndevice = \"cpu\"\n"
        ));
    }
    let config = dir.path().join("runpod.toml");
    std::fs::write(&config, toml).unwrap();
    let mock = spawn_mock(Duration::from_secs(2));
    let mut child = worker_command(&mock.base_url(), "loading")
        .env("RUNPOD_WORKER_CONFIG", &config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The HTTP server is up before the models load; /ready says so.
    let stdout = lines_of(child.stdout.take().unwrap());
    let base = listening_address(&stdout);
    let ready = reqwest::get(format!("{base}/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.text().await.unwrap(), "starting");
    let signalled = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let (status, mut child) = tokio::task::spawn_blocking(move || (child.wait().unwrap(), child))
        .await
        .unwrap();
    let took = signalled.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM: {stderr}"
    );
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("ready:"),
        "it never became ready: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_answer_on_its_way_at_sigterm_is_read_and_its_jobs_answered() {
    let mock = spawn_mock(Duration::from_secs(2));
    let mut child = worker_command(&mock.base_url(), "arriving")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pinged = mock
        .state()
        .wait_for(WAIT, |i| {
            i.endpoints
                .get(EP)?
                .workers
                .contains_key("arriving")
                .then_some(())
        })
        .await;
    assert!(pinged.is_some(), "the worker is ready");
    // The queue takes the jobs for the worker at once, but its answer (four 1 MB jobs) is
    // still on its way when SIGTERM comes: the worker must read it and answer them.
    mock.state()
        .set_answer_delay(mock_queue::Route::Take, Some(Duration::from_millis(300)));
    let pad = "x".repeat(1_000_000);
    let ids: Vec<String> = (0..4).map(|i| format!("arriving-{i}")).collect();
    // All at once, so the held take hands out all four in one answer (queued one by one, the
    // take may wake after the first and that job end before the others are taken).
    mock.enqueue_all(
        EP,
        ids.iter()
            .map(|id| json!({"id": id, "input": {"task": "echo", "pad": pad}})),
    );
    let taken = mock
        .state()
        .wait_for(WAIT, |i| {
            let jobs = &i.endpoints.get(EP)?.jobs;
            ids.iter()
                .all(|id| {
                    jobs.get(id)
                        .is_some_and(|j| j.state == mock_queue::JobState::InProgress)
                })
                .then_some(())
        })
        .await;
    assert!(taken.is_some(), "the queue handed the jobs out");
    send_signal(child.id(), "TERM");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    for id in &ids {
        let done = mock.wait_done(EP, id, Duration::from_secs(1)).await;
        assert!(done.is_some(), "{id} was taken and never answered");
    }
}
