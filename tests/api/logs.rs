//! What reaches the real binary's log (stderr): no secret carried by a URL (a webhook's, the
//! queue's), and no document parser's warnings (with the build's source paths) at the default
//! level.

use std::path::Path;
use std::process::{Command, Stdio};

use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine as _;
use serde_json::json;

use crate::helpers::{client_with_key, worker_command, BIN, ECHO_CONFIG, EP};
use crate::local_process::{lines_of, lines_until, LocalProcess};

const SECRET: &str = "s3cr3t-queue-token";

/// `local` with echo only, the default log level and `env` on top.
fn start_local(env: &[(&str, &str)]) -> LocalProcess {
    LocalProcess::start(Path::new(ECHO_CONFIG), "test-key", env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_a_webhook_url_is_redacted_in_the_log_line_that_names_it() {
    let local = LocalProcess::start_with(
        Path::new(ECHO_CONFIG),
        "test-key",
        &[],
        &["--allow-private-webhooks"],
    );
    let base = &local.base;
    // Nothing listens on port 1: delivery fails and the queue logs the webhook's URL.
    let webhook = format!("http://hook:{SECRET}@127.0.0.1:1/hook?token={SECRET}&job=1");
    let submitted = client_with_key()
        .post(format!("{base}/v2/local/run"))
        .json(&json!({"input": {"task": "echo"}, "webhook": webhook}))
        .send()
        .await
        .unwrap();
    assert!(submitted.status().is_success());
    let (line, seen) = tokio::task::block_in_place(|| lines_until(&local.stderr, "webhook"));
    drop(local);
    let line = line.unwrap_or_else(|| panic!("the failed webhook is logged: {seen}"));
    assert!(
        line.contains("http://REDACTED@127.0.0.1:1/hook?token=REDACTED&job=1"),
        "{line}"
    );
    assert!(!seen.contains(SECRET), "{seen}");
}

/// A queue whose job-stop answers 200 with a body that is not JSON (so the stop channel logs an
/// error about the request), job-take nothing, and everything else 200.
async fn broken_stop_queue() -> String {
    let app = axum::Router::new().fallback(|uri: Uri| async move {
        let path = uri.path();
        if path.contains("/job-stop/") {
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                "{not json",
            )
                .into_response()
        } else if path.contains("/job-take") {
            StatusCode::NO_CONTENT.into_response()
        } else {
            StatusCode::OK.into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_a_queue_url_never_reaches_a_log_line() {
    let base = broken_stop_queue().await;
    let mut child = worker_command(&base, "w")
        .env(
            "RUNPOD_WEBHOOK_GET_JOB",
            format!("{base}/v2/{EP}/job-take/$ID?gpu=x&token={SECRET}"),
        )
        .env_remove("RUST_LOG")
        .env_remove("RUNPOD_LOG_LEVEL")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = lines_of(child.stderr.take().unwrap());
    let (line, seen) = tokio::task::spawn_blocking(move || {
        lines_until(&stderr, "job-stop answered with a body that is not JSON")
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.is_some(), "the stop channel's error is logged: {seen}");
    assert!(!seen.contains(SECRET), "{seen}");
}

/// A one-page PDF saying "Hello warn" whose second content stream is corrupt deflate data, so
/// the PDF parser logs warnings while the text still comes out.
fn pdf_that_makes_the_parser_warn() -> Vec<u8> {
    let content = "BT /F1 24 Tf 72 720 Td (Hello warn) Tj ET";
    let corrupt: &[u8] = b"\x78\x9c\xff\xff\xff\xff garbage";
    let objects: Vec<Vec<u8>> = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents [4 0 R 6 0 R] /Resources << /Font << /F1 5 0 R >> >> >>".to_vec(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()).into_bytes(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
        [
            format!("<< /Length {} /Filter /FlateDecode >>\nstream\n", corrupt.len()).as_bytes(),
            corrupt,
            b"\nendstream",
        ]
        .concat(),
    ];
    crate::helpers::pdf_of(&objects)
}

/// Runs the PDF through `test-input` with `RUST_LOG` set to `rust_log` (or unset).
fn extract_pdf(rust_log: Option<&str>) -> (serde_json::Value, String) {
    let pdf = base64::engine::general_purpose::STANDARD.encode(pdf_that_makes_the_parser_warn());
    let job =
        json!({"input": {"task": "extract", "embed": false, "document": {"pdf_base64": pdf}}});
    let mut command = Command::new(BIN);
    command
        .args(["test-input", "--json", &job.to_string()])
        .env(
            "RUNPOD_WORKER_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/runpod.toml"),
        )
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUNPOD_LOG_LEVEL")
        .env_remove("RUNPOD_ENDPOINT_ID")
        .env_remove("RUST_LOG");
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

#[test]
fn pdf_parser_warnings_stay_out_of_the_log_at_the_default_level_but_rust_log_shows_them() {
    // The parser runs in a child process; its warnings come back through its stderr, logged
    // under the target `runpod_worker::document_parser` at debug level.
    let (result, quiet) = extract_pdf(None);
    assert_eq!(result["output"]["text"], "Hello warn", "{result}");
    assert!(
        !quiet.contains("deflate") && !quiet.contains("WARN"),
        "no parser warnings by default: {quiet}"
    );

    let (_, info) = extract_pdf(Some("info"));
    assert!(!info.contains("deflate"), "not at info either: {info}");
    let (_, verbose) = extract_pdf(Some("info,runpod_worker::document_parser=debug"));
    let warning = verbose
        .lines()
        .find(|l| l.contains("corrupt deflate stream"))
        .unwrap_or_else(|| panic!("the document parser's debug log shows them: {verbose}"));
    assert!(warning.contains("WARN lopdf"), "{warning}");
    assert!(
        !verbose.contains("log.file") && !verbose.contains("/src/"),
        "never the build's source paths: {verbose}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runpod_debug_level_is_read_as_the_sdks_older_name_for_the_log_level() {
    let local = start_local(&[("RUNPOD_DEBUG_LEVEL", "DEBUG")]);
    let base = &local.base;
    let answer = client_with_key()
        .post(format!("{base}/v2/local/runsync"))
        .json(&json!({"input": {"task": "echo"}}))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    let (line, seen) =
        tokio::task::block_in_place(|| lines_until(&local.stderr, "result delivered"));
    drop(local);
    let line = line.unwrap_or_else(|| panic!("debug lines are on: {seen}"));
    assert!(
        line.starts_with("[RunPod] DEBUG: result delivered | job_id="),
        "{line}"
    );
}
