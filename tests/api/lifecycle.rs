//! Stop signals, execution timeouts, panics and the drain.

use std::time::Duration;

use mock_queue::Route;
use serde_json::json;

use crate::helpers::{test_config, TestWorker, EP, WAIT, WORKER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_signal_cancels_a_running_job_and_posts_nothing() {
    let worker = TestWorker::start(test_config(), |h| h, 100).await;
    worker.enqueue("long", json!({"task": "echo", "sleep_ms": 60000}));
    let mock = worker.mock.clone();
    let seen = mock
        .state()
        .wait_for(WAIT, |i| {
            i.endpoints
                .get(EP)?
                .pings
                .iter()
                .any(|p| p.job_ids.contains(&"long".into()))
                .then_some(())
        })
        .await;
    assert!(seen.is_some(), "the job was taken and pinged");

    worker.mock.stop_job(EP, WORKER, "long");
    let gone = mock
        .state()
        .wait_for(WAIT, |i| {
            let q = i.endpoints.get(EP)?;
            let last = q.pings.last()?;
            (!last.job_ids.contains(&"long".into()) && q.stops.is_empty()).then_some(())
        })
        .await;
    assert!(gone.is_some(), "the stopped job left the heartbeat");
    assert_eq!(worker.health().await["jobs"]["cancelled"], 1);

    worker.enqueue("after", json!({"task": "echo"}));
    worker.done("after").await;
    assert_eq!(
        worker.results_for("long"),
        0,
        "nothing posted for a stopped job"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_timeout_and_policy_timeout_end_the_job_with_timeout() {
    let mut config = test_config();
    config.handler.execution_timeout = 1;
    let worker = TestWorker::start(config, |h| h, 1000).await;
    worker.enqueue("cfg", json!({"task": "echo", "sleep_ms": 30000}));
    worker.mock.enqueue(EP, json!({"id": "pol", "input": {"task": "echo", "sleep_ms": 30000}, "policy": {"executionTimeout": 300}}));

    let done = worker.done("cfg").await;
    assert_eq!(done.body["output"]["error_type"], "Timeout");
    assert!(
        done.body["output"]["error"]
            .as_str()
            .unwrap()
            .contains("1 s"),
        "{}",
        done.body
    );
    let done = worker.done("pol").await;
    assert!(
        done.body["output"]["error"]
            .as_str()
            .unwrap()
            .contains("policy.executionTimeout of 300 ms"),
        "{}",
        done.body
    );
    assert!(done.body["output"].get("retry_after").is_none());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_only_its_own_job() {
    let mut config = test_config();
    config.gpu.simulate = Some("24GB".parse().unwrap());
    let worker = TestWorker::start(config, |h| h, 1000).await;
    worker.enqueue("boom", json!({"task": "echo", "fail": "panic"}));
    worker.enqueue("fine", json!({"task": "echo"}));
    let done = worker.done("boom").await;
    assert_eq!(done.body["output"]["error_type"], "Internal");
    assert!(
        !done.body["output"]["error"]
            .as_str()
            .unwrap()
            .contains("asked to panic"),
        "no internals in results"
    );
    assert_eq!(worker.done("fine").await.body["output"]["task"], "echo");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_taking_at_once_and_answers_every_taken_job() {
    let worker = TestWorker::start(test_config(), |h| h, 100).await;
    worker.enqueue("d1", json!({"task": "echo", "sleep_ms": 800}));
    worker.enqueue("d2", json!({"task": "echo", "sleep_ms": 800}));
    let mock = worker.mock.clone();
    worker.wait_held(&["d1", "d2"]).await;
    let takes_before = mock.requests(Route::Take);

    let started = std::time::Instant::now();
    // The pending long-poll is abandoned: the worker needs only the jobs' remaining time.
    worker.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        started.elapsed()
    );
    let pings_while_draining = mock
        .endpoint(EP)
        .pings
        .into_iter()
        .filter(|p| p.at > started && p.job_ids.contains(&"d1".to_owned()))
        .count();
    assert!(
        pings_while_draining >= 2,
        "the heartbeat goes on during the drain: {pings_while_draining}"
    );
    assert_eq!(
        mock.requests(Route::Take),
        takes_before,
        "no take after the signal"
    );
    let done: Vec<_> = mock
        .endpoint(EP)
        .done
        .into_iter()
        .map(|d| d.job_id)
        .collect();
    assert!(
        done.contains(&"d1".into()) && done.contains(&"d2".into()),
        "{done:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_still_running_after_the_grace_period_are_answered_interrupted() {
    let mut config = test_config();
    config.handler.drain_grace_s = 0;
    let worker = TestWorker::start(config, |h| h, 100).await;
    worker.enqueue("slow", json!({"task": "echo", "sleep_ms": 60000}));
    let mock = worker.mock.clone();
    worker.wait_held(&["slow"]).await;
    worker.stop().await;
    let done = mock.wait_done(EP, "slow", WAIT).await.unwrap();
    assert_eq!(done.body["output"]["error_type"], "Interrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_models_load_health_answers_and_ready_says_starting() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let slot = worker::observed::WorkerSlot::default();
    let server = tokio::spawn(worker::health::serve(
        listener,
        slot,
        axum::Router::new(),
        stop.clone(),
    ));

    let ready = reqwest::get(format!("{base}/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.text().await.unwrap(), "starting");
    let ping = reqwest::get(format!("{base}/ping")).await.unwrap();
    assert_eq!(ping.status(), 204, "the load balancer's 'initializing'");
    let health = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(health.status(), 200, "alive while loading");
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(
        (body["ready"].as_bool(), body["phase"].as_str()),
        (Some(false), Some("starting"))
    );
    assert_eq!(
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .status(),
        503
    );
    stop.cancel();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_can_step_the_worker_one_batch_at_a_time() {
    use worker::runner::{start_worker, WorkerExit};

    let mock = crate::helpers::spawn_mock(std::time::Duration::from_secs(1));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let setup = crate::helpers::setup_against(&mock.base_url(), "stepped", &shutdown).await;
    let started = start_worker(setup).await.unwrap().expect("started");
    mock.enqueue_all(
        EP,
        (1..=3).map(|i| json!({"id": format!("s{i}"), "input": {"task": "echo", "i": i}})),
    );
    assert_eq!(
        started.run_next_batch().await,
        3,
        "one take brought all three"
    );
    // Answered when the call returns, and nothing else was taken: the loop is not running.
    let answered: Vec<String> = mock
        .endpoint(EP)
        .done
        .iter()
        .map(|d| d.job_id.clone())
        .collect();
    assert_eq!(answered.len(), 3, "{answered:?}");
    mock.enqueue(EP, json!({"id": "s4", "input": {"task": "echo"}}));
    mock.enqueue(EP, json!({"id": "s5", "input": {"task": "echo"}}));
    let taken = started.run_next_batch().await;
    assert!((1..=2).contains(&taken), "{taken}");
    assert_eq!(
        started.health()["jobs"]["completed"].as_u64(),
        Some(3 + taken as u64)
    );
    shutdown.cancel();
    assert_eq!(started.run().await, WorkerExit::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_answers_as_a_load_balancer_expects_ready_then_draining() {
    let worker = TestWorker::start(test_config(), |h| h, 100).await;
    let ping = reqwest::get(format!("{}/ping", worker.http)).await.unwrap();
    assert_eq!(ping.status(), 200);
    let body: serde_json::Value = ping.json().await.unwrap();
    assert_eq!(body, json!({"status": "healthy"}));

    worker.enqueue("d1", json!({"task": "echo", "sleep_ms": 1500}));
    worker.wait_held(&["d1"]).await;
    worker.shutdown.cancel();
    // The drain begins when the run loop sees the signal; the job keeps it going meanwhile.
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        let status = reqwest::get(format!("{}/ping", worker.http))
            .await
            .unwrap()
            .status();
        if status != 200 || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        status, 503,
        "a draining worker is not healthy to a load balancer"
    );
    worker.finished().await;
}

/// A handler that notes when it was warmed.
#[derive(Default)]
struct Warmed(std::sync::Mutex<Vec<std::time::Instant>>);

#[async_trait::async_trait]
impl worker::handlers::Handler for Warmed {
    async fn run(
        &self,
        _ctx: worker::handlers::JobContext,
        _prepared: worker::handlers::Prepared,
    ) -> Result<serde_json::Value, worker::outcome::JobError> {
        Ok(json!({"warmed": self.0.lock().unwrap().len()}))
    }

    fn warm_up(&self) -> Result<(), String> {
        self.0.lock().unwrap().push(std::time::Instant::now());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_model_is_warmed_once_before_the_first_take() {
    let warmed = std::sync::Arc::new(Warmed::default());
    let handler = warmed.clone();
    let worker = TestWorker::start(test_config(), |h| h.with_handler("echo", handler), 100).await;
    let first_take = worker
        .mock
        .wait_for_requests(Route::Take, 1, WAIT)
        .await
        .expect("the worker takes")[0];
    worker.enqueue("w", json!({"task": "echo"}));
    assert_eq!(worker.done("w").await.body["output"]["warmed"], 1);
    let warmed_at = warmed.0.lock().unwrap().clone();
    assert_eq!(warmed_at.len(), 1, "warmed once, not per job");
    assert!(warmed_at[0] < first_take, "warmed before the first take");
    worker.stop().await;
}
