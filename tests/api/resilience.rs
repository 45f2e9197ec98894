//! Results are never lost: oversize results, undeliverable results, model threads that outlive
//! their job, a GPU that keeps failing, and a queue that answers garbage.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mock_queue::{Fault, Route};
use serde_json::{json, Value};
use worker::handlers::{Handler, JobContext, Prepared};
use worker::outcome::JobError;
use worker::runner::WorkerExit;

use crate::helpers::{spawn_mock, test_config, TestWorker, EP, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_size_limit_becomes_output_too_large_instead_of_being_lost() {
    let mut config = test_config();
    config.queue.max_result_size = "1000B".parse().unwrap();
    let worker = TestWorker::start(config, |h| h, 1000).await;
    worker.enqueue("big", json!({"task": "echo", "blob": "x".repeat(5000)}));
    let done = worker.done("big").await;
    assert_eq!(
        done.body["output"]["error_type"], "OutputTooLarge",
        "{}",
        done.body
    );
    assert!(done.body["output"]["error"]
        .as_str()
        .unwrap()
        .contains("over the limit of 1000 bytes"));
    worker.stop().await;
}

/// A mock whose job-done always answers 503, and a config that gives up delivering after 1 s:
/// every result goes to the spool (at `config.queue.spool_dir`).
fn queue_that_takes_no_result() -> (Arc<mock_queue::MockQueue>, worker::config::Config) {
    let mock = spawn_mock(Duration::from_secs(1));
    let mut config = test_config();
    config.queue.delivery_retry_s = 1;
    mock.set_fault(
        Route::Done,
        Some(Fault {
            status: 503,
            rate: 1.0,
        }),
    );
    (mock, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_result_is_spooled_and_delivered_at_the_next_start() {
    let (mock, config) = queue_that_takes_no_result();
    let spool = config.queue.spool_dir.clone();
    let first = TestWorker::start_on(mock.clone(), config.clone(), |h| h, 1000).await;
    first.enqueue("kept", json!({"task": "echo", "n": 7}));
    let spooled = mock
        .state()
        .wait_for(WAIT, |_| {
            std::fs::read_dir(&spool)
                .ok()
                .map(|d| d.count())
                .filter(|n| *n > 0)
        })
        .await;
    assert_eq!(spooled, Some(1), "the result was spooled");
    // Counted once the file is in place (a moment after it appears).
    let counted = r#"runpod_worker_undelivered_results_total{fate="spooled"} 1"#;
    let metrics = first.metrics_once(|m| m.contains(counted)).await;
    assert!(metrics.contains(counted), "{metrics}");
    first.stop().await;

    mock.set_fault(Route::Done, None);
    let second = TestWorker::start_on(mock.clone(), config, |h| h, 1000).await;
    let done = second.done("kept").await;
    assert_eq!(done.body, json!({"output": {"task": "echo", "n": 7}}));
    let emptied = mock
        .state()
        .wait_for(WAIT, |_| {
            (std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0) == 0).then_some(())
        })
        .await;
    assert!(emptied.is_some(), "delivered results leave the spool");
    second.stop().await;
}

/// Runs a blocking "model call" that waits for the test to release it.
struct BlockingModel {
    release: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    calls: AtomicUsize,
}

#[async_trait]
impl Handler for BlockingModel {
    async fn run(&self, ctx: JobContext, _prepared: Prepared) -> Result<Value, JobError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let release = self.release.clone();
        ctx.run_blocking(move || {
            if call == 0 {
                let _ = release.lock().unwrap().recv();
            }
        })
        .await?;
        Ok(json!({"call": call}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_model_call_keeps_its_slot_until_its_thread_returns() {
    let mut config = test_config();
    config.handlers.get_mut("echo").unwrap().max_concurrency = 1;
    let (tx, rx) = std::sync::mpsc::channel();
    let model = Arc::new(BlockingModel {
        release: Arc::new(Mutex::new(rx)),
        calls: AtomicUsize::new(0),
    });
    let worker = TestWorker::start(config, |h| h.with_handler("echo", model.clone()), 100).await;

    worker.mock.enqueue(
        EP,
        json!({"id": "slow", "input": {"task": "echo"}, "policy": {"executionTimeout": 200}}),
    );
    let done = worker.done("slow").await;
    assert_eq!(done.body["output"]["error_type"], "Timeout");
    // The thread is still inside its "model call": the only echo slot stays taken, so the
    // next job stays in the queue (capacity is reserved before work is taken).
    worker.enqueue("next", json!({"task": "echo"}));
    let health = worker.health().await;
    assert_eq!(health["handlers"]["echo"]["active"], 1, "{health}");
    assert_eq!(health["jobs"]["in_worker"], 1, "{health}");
    assert_eq!(
        model.calls.load(Ordering::SeqCst),
        1,
        "the next job has not started"
    );

    tx.send(()).unwrap();
    let next = worker.done("next").await;
    assert_eq!(next.body["output"]["call"], 1);
    assert_eq!(
        worker.results_for("slow"),
        1,
        "the late result is discarded"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_ooms_make_the_worker_unhealthy_drain_and_ask_to_be_replaced_last() {
    let mut config = test_config();
    config.gpu.simulate = Some("24GB".parse().unwrap());
    config.handler.max_consecutive_ooms = 2;
    let worker = TestWorker::start(config, |h| h, 100).await;
    let mock = worker.mock.clone();
    worker.enqueue("oom1", json!({"task": "echo", "fail": "oom"}));
    let first = worker.done("oom1").await;
    assert_eq!(first.body["output"]["retry_after"], 10);
    assert!(first.body.get("stopPod").is_none());

    // A slow job is in hand when the second OOM trips the worker: it is still answered, and
    // it is the one that asks for a replacement, once nothing else is left.
    worker.enqueue("slow", json!({"task": "echo", "sleep_ms": 500}));
    worker.wait_held(&["slow"]).await;
    worker.enqueue("oom2", json!({"task": "echo", "fail": "oom"}));
    let second = worker.done("oom2").await;
    assert!(
        second.body.get("stopPod").is_none(),
        "not while another job is in hand"
    );
    assert_eq!(worker.health().await["status"], "unhealthy");
    let slow = worker.done("slow").await;
    assert_eq!(
        slow.body["stopPod"], true,
        "the last result asks for a new worker"
    );

    let exit = worker.finished().await;
    assert_eq!(exit, WorkerExit::Replaced, "it drains and ends by itself");
    let unhealthy = mock
        .endpoint(EP)
        .pings
        .iter()
        .any(|p| p.query.get("status").map(String::as_str) == Some("unhealthy"));
    assert!(unhealthy, "and says so through the heartbeat URL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_answering_garbage_is_survived_with_backoff() {
    let mock = spawn_mock(Duration::from_secs(1));
    for route in [Route::Take, Route::Stop, Route::Ping] {
        mock.set_fault(
            route,
            Some(Fault {
                status: 200,
                rate: 1.0,
            }),
        );
    }
    let worker = TestWorker::start_on(mock.clone(), test_config(), |h| h, 200).await;
    // Garbage is a failure like any other: the takes back off (100 ms doubling to 1 s in the
    // test config, each wait at least half its ceiling), measured as the requests arrive.
    let times = mock
        .wait_for_requests(Route::Take, 5, Duration::from_secs(20))
        .await
        .expect("it keeps trying");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        let ceiling = Duration::from_millis(100 << i).min(Duration::from_secs(1));
        assert!(
            *gap >= ceiling / 2 - Duration::from_millis(20),
            "gap {i} against garbage: {gaps:?}"
        );
    }
    for route in [Route::Take, Route::Stop, Route::Ping] {
        mock.set_fault(route, None);
    }
    worker.enqueue("after-garbage", json!({"task": "echo"}));
    worker.done("after-garbage").await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_waiting_for_delivery_are_bounded_so_the_take_loop_waits() {
    // A result in delivery holds no job slot, but the results in delivery have a budget of
    // their own: with room for one, a result the queue keeps refusing (503, retried) holds it,
    // and no take is asked meanwhile (a long-poll already parked at the queue may still bring
    // a job; its result then waits for room).
    let mut config = test_config();
    config.handler.max_concurrency = 4;
    config.queue.max_results_in_delivery = 1;
    config.queue.delivery_retry_s = 30;
    let worker = TestWorker::start(config, |h| h, 200).await;
    worker.mock.set_fault(
        Route::Done,
        Some(Fault {
            status: 503,
            rate: 1.0,
        }),
    );
    worker.enqueue("first", json!({"task": "echo"}));
    // The first result has been refused three times: its delivery is being retried.
    worker
        .mock
        .wait_for_requests(Route::Done, 3, WAIT)
        .await
        .expect("the result is retried");
    let takes = worker.mock.requests(Route::Take);
    // 15 heartbeats (200 ms apart) outlast the mock's 2 s long-poll: a take parked before the
    // budget was spent has come back empty, and none may follow it.
    let pings = worker.mock.endpoint(EP).pings.len();
    let pinged = worker
        .mock
        .state()
        .wait_for(WAIT, |i| {
            (i.endpoints.get(EP)?.pings.len() >= pings + 15).then_some(())
        })
        .await;
    assert!(pinged.is_some(), "the worker stopped pinging");
    assert_eq!(
        worker.mock.requests(Route::Take),
        takes,
        "a take was asked while the delivery budget was spent"
    );
    worker.mock.set_fault(Route::Done, None);
    worker.done("first").await;
    worker.enqueue("second", json!({"task": "echo"}));
    worker.done("second").await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_neither_delivered_nor_spooled_is_counted_lost_not_spooled() {
    let (mock, config) = queue_that_takes_no_result();
    let spool = config.queue.spool_dir.clone();
    let worker = TestWorker::start_on(mock.clone(), config, |h| h, 1000).await;
    // The spool was fine at start; now a file stands where its directory was.
    std::fs::remove_dir_all(&spool).unwrap();
    std::fs::write(&spool, b"not a directory").unwrap();
    worker.enqueue("doomed", json!({"task": "echo"}));
    let lost = r#"runpod_worker_undelivered_results_total{fate="lost"} 1"#;
    let metrics = worker.metrics_once(|m| m.contains(lost)).await;
    assert!(metrics.contains(lost), "{metrics}");
    assert!(!metrics.contains(r#"fate="spooled""#), "{metrics}");
    worker.stop().await;
    std::fs::remove_file(&spool).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_that_can_never_be_written_is_refused_at_start_and_by_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let spool = file.join("spool");
    let config = dir.path().join("runpod.toml");
    std::fs::write(
        &config,
        format!(
            "[queue]\nspool_dir = {:?}\n[handlers.echo]\nmax_concurrency = 1\ndevice = \"cpu\"\n",
            spool.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(crate::helpers::BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot hold results"), "{stderr}");

    let mock = spawn_mock(Duration::from_secs(1));
    let out = crate::helpers::worker_command(&mock.base_url(), "no-spool")
        .env("RUNPOD_WORKER_CONFIG", &config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("spool_dir"), "{stderr}");
}
