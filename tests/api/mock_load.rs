//! The mock under hostile load: what it costs does not grow with the jobs it keeps. The lease
//! ticker visits only what expires, a waiting request is woken only by its own job, a
//! submitted body is stored at about its size, a full endpoint refuses jobs with a 429
//! (`--max-jobs`), and in `local` the queue's memory never makes the worker ask to be replaced.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use mock_queue::{JobState, MockOptions, MockQueue};
use serde_json::{json, Value};

use crate::helpers::{
    client_with_key, send_signal, spawn_mock_with, test_mock_options, BIN, EP, WAIT,
};
use crate::local_process::{lines_of, listening_address, LocalProcess};

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until the mock's ticker has run `ticks` more times.
async fn ticks_pass(mock: &MockQueue, ticks: u64) {
    let start = mock.state().read(|i| i.ticker.ticks);
    let passed = mock
        .state()
        .wait_for(WAIT, |i| (i.ticker.ticks >= start + ticks).then_some(()))
        .await;
    assert!(passed.is_some(), "the ticker stopped ticking");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ticker_visits_only_what_expires_not_every_job_kept() {
    const KEPT: usize = 100_000;
    const EXPIRING: usize = 10;
    let mock = spawn_mock_with(MockOptions {
        timeout_grace: Duration::ZERO,
        run_retention: Duration::from_secs(3600),
        ..test_mock_options()
    });
    let base = format!("{}/v2/{EP}", mock.base_url());
    // Jobs that time out as soon as they are taken: 100k finished jobs, kept for an hour.
    mock.enqueue_all(
        EP,
        (0..KEPT).map(
            |n| json!({"id": format!("kept-{n}"), "input": {}, "policy": {"executionTimeout": 1}}),
        ),
    );
    let client = client_with_key();
    let (status, taken) =
        send(client.get(format!("{base}/job-take-batch/w?batch_size={KEPT}"))).await;
    assert_eq!(status, 200);
    assert_eq!(taken.as_array().map(Vec::len), Some(KEPT));
    let finished = mock
        .state()
        .wait_for(WAIT, |i| {
            let queue = i.endpoints.get(EP)?;
            let timed_out = queue
                .jobs
                .values()
                .filter(|j| j.state == JobState::TimedOut);
            (timed_out.count() == KEPT).then_some(())
        })
        .await;
    assert!(finished.is_some(), "the jobs never timed out");

    // Among them, a few queued jobs whose ttl runs out: the ticker still deletes those.
    let before = mock.state().read(|i| i.ticker);
    mock.enqueue_all(
        EP,
        (0..EXPIRING)
            .map(|n| json!({"id": format!("brief-{n}"), "input": {}, "policy": {"ttl": 200}})),
    );
    let deleted = mock
        .state()
        .wait_for(WAIT, |i| {
            let queue = i.endpoints.get(EP)?;
            (queue.jobs.len() == KEPT && queue.pending.is_empty()).then_some(())
        })
        .await;
    assert!(
        deleted.is_some(),
        "the jobs past their ttl were not deleted"
    );
    ticks_pass(&mock, 3).await;
    let after = mock.state().read(|i| i.ticker);
    let ticks = after.ticks - before.ticks;
    let visited = after.visited - before.visited;
    assert!(
        visited <= 2 * EXPIRING as u64,
        "over {ticks} ticks the ticker visited {visited} records: only the {EXPIRING} that \
         expired should cost anything, not the {KEPT} kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_wakes_only_its_own_waiter_and_idle_waiters_sleep() {
    const WAITERS: usize = 200;
    let mock = spawn_mock_with(test_mock_options());
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    mock.enqueue_all(
        EP,
        (0..WAITERS).map(|n| json!({"id": format!("job-{n}"), "input": {}})),
    );
    // A worker holds job-0 (the first queued); the others stay queued.
    let (_, taken) = send(client.get(format!("{base}/job-take/w"))).await;
    assert_eq!(taken["id"], "job-0");

    let mut waiters = mock.state().waiters();
    let requests: Vec<_> = (0..WAITERS)
        .map(|n| {
            let request = client.get(format!("{base}/status-sync/job-{n}?wait=60000"));
            tokio::spawn(send(request))
        })
        .collect();
    let all_waiting = tokio::time::timeout(WAIT, waiters.wait_for(|s| s.waiting == WAITERS));
    assert!(all_waiting.await.is_ok(), "{:?}", *waiters.borrow());
    let start = waiters.borrow().woken;

    ticks_pass(&mock, 3).await;
    let idle = waiters.borrow().woken - start;
    assert_eq!(
        idle, 0,
        "{WAITERS} idle waiters were woken {idle} times while nothing happened to their jobs"
    );

    let (status, _) = send(
        client
            .post(format!("{base}/job-done/w/job-0"))
            .json(&json!({"output": "ok"})),
    )
    .await;
    assert_eq!(status, 200);
    let mut requests = requests.into_iter();
    let (status, body) = requests.next().unwrap().await.unwrap();
    assert_eq!((status, body["status"].as_str()), (200, Some("COMPLETED")));
    let one_left = tokio::time::timeout(WAIT, waiters.wait_for(|s| s.waiting == WAITERS - 1));
    assert!(one_left.await.is_ok(), "{:?}", *waiters.borrow());
    let woken = waiters.borrow().woken - start;
    assert_eq!(
        woken, 1,
        "finishing one job woke {woken} waiters: only its own should look again"
    );
    for request in requests {
        request.abort();
    }
}

/// `{"input": {"task": "echo", "numbers": [1,1,...]}}` of about `bytes`: the body whose
/// parsed tree is the largest for its size (one 32-byte node per two bytes of text).
fn numeric_body(bytes: usize) -> String {
    let mut numbers = "1,".repeat(bytes / 2);
    numbers.push('1');
    format!(r#"{{"input": {{"task": "echo", "numbers": [{numbers}]}}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_numeric_body_and_its_result_are_stored_at_about_their_size() {
    let mock = spawn_mock_with(MockOptions {
        // As in `local` and `mock-queue`: no test history, only the jobs.
        record_history: false,
        ..test_mock_options()
    });
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    let body = numeric_body(9_000_000);
    let (status, queued) = send(
        client
            .post(format!("{base}/run"))
            .header("content-type", "application/json")
            .body(body.clone()),
    )
    .await;
    assert_eq!(status, 200, "{queued}");
    let id = queued["id"].as_str().unwrap().to_owned();
    let stored = mock.state().read(|i| i.endpoints[EP].stored_bytes());
    assert!(
        stored <= 2 * body.len(),
        "a {} byte body is stored in {stored} bytes",
        body.len()
    );

    // The worker gets the input whole, and its result of the same size is stored as compactly.
    let (_, job) = send(client.get(format!("{base}/job-take/w"))).await;
    let numbers = job["input"]["numbers"].as_array().map(Vec::len);
    assert_eq!(numbers, Some(4_500_001));
    let output = format!(
        r#"{{"output": {}}}"#,
        &body[r#"{"input": "#.len()..body.len() - 1]
    );
    let (status, _) = send(
        client
            .post(format!("{base}/job-done/w/{id}"))
            .header("content-type", "application/json")
            .body(output.clone()),
    )
    .await;
    assert_eq!(status, 200);
    let stored = mock.state().read(|i| i.endpoints[EP].stored_bytes());
    assert!(
        stored <= 2 * (body.len() + output.len()),
        "a {} byte body and a {} byte result are stored in {stored} bytes",
        body.len(),
        output.len()
    );
    let (status, done) = send(client.get(format!("{base}/status/{id}"))).await;
    assert_eq!((status, done["status"].as_str()), (200, Some("COMPLETED")));
    assert_eq!(
        done["output"]["numbers"].as_array().map(Vec::len),
        Some(4_500_001)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_queue_refuses_jobs_past_max_jobs_with_a_429_that_says_why() {
    let mut mock = Command::new(BIN)
        .args(["mock-queue", "--port", "0", "--api-key", "test-key"])
        .args(["--max-jobs", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = lines_of(mock.stdout.take().unwrap());
    let address = listening_address(&stdout);
    let base = format!("{address}/v2/{EP}");
    let client = client_with_key();
    let job = json!({"input": {"task": "echo"}});
    for _ in 0..2 {
        let (status, body) = send(client.post(format!("{base}/run")).json(&job)).await;
        assert_eq!(status, 200, "{body}");
    }
    // One of them ends: a finished job is still kept (its result can be read), so still full.
    let (_, taken) = send(client.get(format!("{base}/job-take/w"))).await;
    let id = taken["id"].as_str().unwrap().to_owned();
    let done = client
        .post(format!("{base}/job-done/w/{id}"))
        .json(&json!({"output": "ok"}));
    assert_eq!(send(done).await.0, 200);

    let (status, body) = send(client.post(format!("{base}/run")).json(&job)).await;
    assert_eq!(status, 429, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("2 jobs") && message.contains("--max-jobs"),
        "the refusal says what is full and what to do: {message}"
    );
    let (status, _) = send(client.post(format!("{base}/runsync?wait=1000")).json(&job)).await;
    assert_eq!(status, 429, "/runsync is refused as /run is");
    // The cap is per endpoint id, as the platform's limits are.
    let other = format!("{address}/v2/other/run");
    assert_eq!(send(client.post(other).json(&job)).await.0, 200);

    // Room again once a job is gone.
    let (_, purged) = send(client.post(format!("{base}/purge-queue"))).await;
    assert_eq!(purged["removed"], 1);
    let (status, body) = send(client.post(format!("{base}/run")).json(&job)).await;
    assert_eq!(status, 200, "{body}");
    let _ = mock.kill();
    let _ = mock.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_keeping_big_jobs_does_not_ask_for_a_fresh_worker() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runpod.toml");
    // The lowest factor allowed: the memory rule at its most eager.
    let mut file = std::fs::File::create(&config).unwrap();
    writeln!(
        file,
        "[handler]\nrecycle_memory_factor = 1.5\n[handlers.echo]\nmax_concurrency = 4\ndevice = \"cpu\""
    )
    .unwrap();
    let local = LocalProcess::start(&config, "key-big-jobs", &[]);
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", "Bearer key-big-jobs".parse().unwrap());
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let runsync = format!("{}/v2/local/runsync", local.base);
    let big = numeric_body(9_000_000);
    let mut workers = Vec::new();
    for body in [
        big.clone(),
        big,
        r#"{"input": {"task": "echo"}}"#.to_owned(),
    ] {
        let (status, done) = send(
            client
                .post(&runsync)
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        assert_eq!(
            (status, done["status"].as_str()),
            (200, Some("COMPLETED")),
            "{}",
            done["error"]
        );
        workers.push(done["workerId"].as_str().unwrap_or_default().to_owned());
    }
    // The worker checks its memory after the first big job: a fresh worker would have taken
    // the next ones.
    let log: Vec<String> = local.stderr.try_iter().collect();
    assert_eq!(
        workers,
        ["local-worker"; 3],
        "the worker asked to be replaced:\n{}",
        log.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_lease_ran_out_is_accepted_while_no_one_took_the_job_again() {
    let mock = spawn_mock_with(MockOptions {
        lease_timeout: Duration::from_secs(1),
        ..test_mock_options()
    });
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    mock.enqueue(EP, json!({"id": "slept", "input": {"task": "echo"}}));
    let (status, _) = send(client.get(format!("{base}/job-take/stopped-worker"))).await;
    assert_eq!(status, 200);
    // The worker was stopped (SIGSTOP) past its lease: the job went back to the queue.
    let requeued = mock
        .state()
        .wait_for(WAIT, |i| {
            let job = i.endpoints.get(EP)?.jobs.get("slept")?;
            (job.state == JobState::InQueue).then_some(())
        })
        .await;
    assert!(requeued.is_some(), "the lease ran out");
    // It resumes: its next chunk takes the job back (no one else holds it), then its result
    // is the answer.
    let chunk = client
        .post(format!("{base}/job-stream/stopped-worker/slept"))
        .json(&json!({"output": {"part": 1}}));
    assert_eq!(send(chunk).await.0, 200, "the chunk is not refused");
    let (_, status) = send(client.get(format!("{base}/status/slept"))).await;
    assert_eq!(status["status"], "IN_PROGRESS", "held again: {status}");
    let done = client
        .post(format!("{base}/job-done/stopped-worker/slept"))
        .json(&json!({"output": {"ran": "once"}}));
    assert_eq!(send(done).await.0, 200, "the result is not refused");
    let (_, status) = send(client.get(format!("{base}/status/slept"))).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    assert_eq!(status["output"]["ran"], "once");
    // And it is not handed out again.
    let (status, _) = send(client.get(format!("{base}/job-take/another?wait=0"))).await;
    assert_ne!(status, 200, "the job left the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mock_queue_stopped_past_its_leases_renews_them_on_resume_instead_of_expiring_them() {
    let mut mock = Command::new(BIN)
        .args(["mock-queue", "--port", "0", "--api-key", "test-key"])
        .args(["--lease-timeout", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = lines_of(mock.stdout.take().unwrap());
    let base = format!("{}/v2/{EP}", listening_address(&stdout));
    let client = client_with_key();
    let (status, body) = send(
        client
            .post(format!("{base}/run"))
            .json(&json!({"input": {}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let (status, _) = send(client.get(format!("{base}/job-take/w"))).await;
    assert_eq!(status, 200);
    // The whole queue stopped for 3 s, three leases long: its worker could not ping it.
    send_signal(mock.id(), "STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    send_signal(mock.id(), "CONT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, status) = send(client.get(format!("{base}/status/{id}"))).await;
    let _ = mock.kill();
    let _ = mock.wait();
    assert_eq!(
        status["status"], "IN_PROGRESS",
        "not requeued on resume: {status}"
    );
    assert!(status.get("retries").is_none(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_is_not_the_answer_of_a_job_the_client_sent_again() {
    let mock = spawn_mock_with(test_mock_options());
    let base = format!("{}/v2/{EP}", mock.base_url());
    let client = client_with_key();
    mock.enqueue(EP, json!({"id": "again", "input": {"task": "echo"}}));
    assert_eq!(
        send(client.get(format!("{base}/job-take/old"))).await.0,
        200
    );
    let failed = client
        .post(format!("{base}/job-done/old/again"))
        .json(&json!({"error": "boom", "output": {"error": "boom"}}));
    assert_eq!(send(failed).await.0, 200);
    let (status, body) = send(client.post(format!("{base}/retry/again"))).await;
    assert_eq!(status, 200, "{body}");
    // The old worker posts a result again (a spooled one, re-sent): not the retry's answer.
    let late = client
        .post(format!("{base}/job-done/old/again"))
        .json(&json!({"output": "stale"}));
    assert_eq!(send(late).await.0, 404);
    let (_, status) = send(client.get(format!("{base}/status/again"))).await;
    assert_eq!(status["status"], "IN_QUEUE", "{status}");
}
