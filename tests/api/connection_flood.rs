//! Connection abuse on the worker's port (the port a load-balancing endpoint exposes): a flood
//! of keep-alive connections, each kept busy so no idle timer fires, must not spend the
//! descriptors the worker's jobs need, and `/health` and `/ping` keep answering within a second.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::helpers::{pdf_of, BIN, WAIT};
use crate::local_process::{lines_of, listening_address};

/// Descriptors the flooded worker may open (its hard limit too: it cannot raise it).
const OPEN_FILES: u32 = 256;
/// Keep-alive connections in the flood: more than the worker could hold open.
const FLOOD: usize = 400;

/// A one-page PDF that says `text`: read by a parser child, which needs descriptors.
fn pdf_saying(text: &str) -> Vec<u8> {
    let stream = format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET");
    pdf_of(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
          /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_vec(),
        format!(
            "<< /Length {} >>\nstream\n{stream}\nendstream",
            stream.len()
        )
        .into_bytes(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
    ])
}

/// The flood: `FLOOD` connections, each sending a `/ping` every `every` (so no idle timer closes
/// it), as a client that wants to hold the port would, until `stop`. A connection the server
/// closed is opened again.
fn flood(address: String, every: Duration, stop: Arc<AtomicBool>) {
    let ping = |stream: &mut TcpStream| {
        stream
            .write_all(b"GET /ping HTTP/1.1\r\nHost: flood\r\n\r\n")
            .is_ok()
    };
    let open = || {
        let stream = TcpStream::connect(&address).ok()?;
        stream.set_nonblocking(true).ok()?;
        Some(stream)
    };
    let mut connections: Vec<Option<TcpStream>> = (0..FLOOD).map(|_| open()).collect();
    let mut buffer = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        for slot in &mut connections {
            let alive = match slot {
                Some(stream) => {
                    // Drain the answers (non-blocking); a closed connection reads 0 bytes.
                    let closed = matches!(stream.read(&mut buffer), Ok(0));
                    !closed && ping(stream)
                }
                None => false,
            };
            if !alive {
                *slot = open();
                if let Some(stream) = slot {
                    ping(stream);
                }
            }
        }
        std::thread::sleep(every);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_keep_alive_connections_leaves_health_and_document_jobs_working() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/runpod.toml");
    let mut child: Child = Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -n {OPEN_FILES} && exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(["serve", "--load-balancing", "--config", config])
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env_remove("RUNPOD_AI_API_KEY")
        .env("PORT", "0")
        .env("PORT_HEALTH", "0")
        .env("RUNPOD_WORKER_HOST", "127.0.0.1")
        .env("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = lines_of(child.stdout.take().unwrap());
    let base = listening_address(&stdout);
    let address = base.trim_start_matches("http://").to_owned();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while client
        .get(format!("{base}/ping"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let flooding = std::thread::spawn({
        let stop = stop.clone();
        move || flood(address, Duration::from_secs(1), stop)
    });
    // Let it take hold: a few rounds of pings.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Under it: the probes answer within a second, and a document job (a parser child, its
    // pipes) succeeds.
    for probe in ["/health", "/ping"] {
        let started = Instant::now();
        let response = client.get(format!("{base}{probe}")).send().await;
        let status = response.map(|r| r.status().as_u16());
        assert!(
            matches!(status, Ok(200)),
            "{probe} under the flood: {status:?} after {:?}",
            started.elapsed()
        );
    }
    let pdf = base64::engine::general_purpose::STANDARD.encode(pdf_saying("Hello flood"));
    let answer: Value = reqwest::Client::new()
        .post(format!("{base}/runsync"))
        .json(&json!({"input": {"task": "extract", "document": {"pdf_base64": pdf}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "COMPLETED", "{answer}");
    assert!(
        answer["output"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("Hello flood"),
        "{answer}"
    );
    stop.store(true, Ordering::Relaxed);
    flooding.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
}
