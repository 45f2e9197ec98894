//! Untrusted documents against the real binary: every hostile class gets a clear error or a
//! bounded result within its deadline + 2 s, the worker's memory stays put (its peak RSS, from
//! `/proc`, with the models loaded), its CPU falls idle once the answer is given (CPU time
//! from `/proc`, not wall-clock timing), and the next job runs at once. Documents are made
//! here: bombs behind filter chains, text-operator bombs, 20,000 pages, deep nesting, a gzip
//! bomb and a stalling body served by URL.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::helpers::{pdf_of, spawn_mock, worker_command, EP, PARSER, WAIT};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The bound on the worker's peak RSS, with MiniLM loaded, over the whole run.
const MAX_WORKER_RSS: u64 = 1_500_000_000;
/// `max_parse_cpu_s` in this test's config.
const PARSE_CPU_S: u64 = 4;

fn deflate(data: impl Fn(&mut dyn Write)) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    data(&mut encoder);
    encoder.finish().unwrap()
}

fn gzip(data: &[u8], times: usize) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for _ in 0..times {
        encoder.write_all(data).unwrap();
    }
    encoder.finish().unwrap()
}

/// A one-page PDF whose page content is `stream` (already encoded) under `filters`.
fn pdf_with_content(filters: &str, stream: &[u8]) -> Vec<u8> {
    let mut content =
        format!("<< /Length {} /Filter {filters} >>\nstream\n", stream.len()).into_bytes();
    content.extend_from_slice(stream);
    content.extend_from_slice(b"\nendstream");
    pdf_of(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
          /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_vec(),
        content,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
    ])
}

/// `mb` megabytes of spaces, deflated.
fn deflated_spaces(mb: usize) -> Vec<u8> {
    let spaces = vec![b' '; 1 << 20];
    deflate(|w| {
        for _ in 0..mb {
            w.write_all(&spaces).unwrap();
        }
    })
}

/// ASCII85, as PDF's `ASCII85Decode` reads it.
fn ascii85(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() * 5 / 4 + 2);
    for group in bytes.chunks(4) {
        let mut word = [0u8; 4];
        word[..group.len()].copy_from_slice(group);
        let mut n = u32::from_be_bytes(word);
        if n == 0 && group.len() == 4 {
            out.push(b'z');
            continue;
        }
        let mut digits = [0u8; 5];
        for digit in digits.iter_mut().rev() {
            *digit = (n % 85) as u8 + b'!';
            n /= 85;
        }
        out.extend_from_slice(&digits[..group.len() + 1]);
    }
    out.extend_from_slice(b"~>");
    out
}

/// A bomb behind `ASCII85Decode` then `FlateDecode`: the plain-zlib check before parsing
/// cannot see through the ASCII85.
fn ascii85_flate_bomb(mb: usize) -> Vec<u8> {
    pdf_with_content(
        "[/ASCII85Decode /FlateDecode]",
        &ascii85(&deflated_spaces(mb)),
    )
}

/// A bomb deflated twice: the check sees only the outer layer, which is small.
fn double_flate_bomb(mb: usize) -> Vec<u8> {
    let inner = deflated_spaces(mb);
    pdf_with_content(
        "[/FlateDecode /FlateDecode]",
        &deflate(|w| w.write_all(&inner).unwrap()),
    )
}

/// ~100 MB of text-showing operators in a ~100 KB stream.
fn text_operator_bomb() -> Vec<u8> {
    let line = b"(aaaaaaa) Tj ".repeat(1000);
    let stream = deflate(|w| {
        w.write_all(b"BT /F1 12 Tf 72 700 Td ").unwrap();
        for _ in 0..8_000 {
            w.write_all(&line).unwrap();
        }
        w.write_all(b" ET").unwrap();
    });
    pdf_with_content("/FlateDecode", &stream)
}

/// A PDF of `pages` empty pages.
fn many_pages(pages: usize) -> Vec<u8> {
    let kids: String = (0..pages).map(|i| format!("{} 0 R ", i + 3)).collect();
    let mut objects = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        format!("<< /Type /Pages /Kids [{kids}] /Count {pages} >>").into_bytes(),
    ];
    objects.extend(
        (0..pages).map(|_| b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>".to_vec()),
    );
    pdf_of(&objects)
}

fn pdf_input(pdf: &[u8]) -> Value {
    json!({"task": "extract", "embed": false,
           "document": {"pdf_base64": base64::engine::general_purpose::STANDARD.encode(pdf)}})
}

/// Serves `GET /bomb` (a gzip bomb, `Content-Encoding: gzip`) and `GET /stall` (headers and a
/// little of the body, then nothing) on 127.0.0.1.
async fn hostile_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let bomb = gzip(&[b'a'; 1 << 20], 200);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let bomb = bomb.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 2048];
                let n = tokio::io::AsyncReadExt::read(&mut socket, &mut request)
                    .await
                    .unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..n]).into_owned();
                if request.starts_with("GET /bomb") {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Encoding: gzip\r\n\
                         Content-Length: {}\r\n\r\n",
                        bomb.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&bomb).await;
                } else {
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 100000\r\n\r\n<p>";
                    let _ = socket.write_all(head.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(600)).await;
                }
            });
        }
    });
    base
}

/// Resident-memory peak (`VmHWM`) of `pid`, bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// User + system CPU time of `pid` (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// How long after now `pid` takes to fall idle: the first 500 ms window in which it uses
/// under 60 ms of CPU (its heartbeat and take loop use a few). `None` if not within 10 s.
async fn time_to_idle(pid: u32) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let before = cpu_time(pid);
        tokio::time::sleep(Duration::from_millis(500)).await;
        if cpu_time(pid).saturating_sub(before) < Duration::from_millis(60) {
            return Some(start.elapsed().saturating_sub(Duration::from_millis(500)));
        }
    }
    None
}

struct Worker {
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_documents_get_clear_errors_in_time_and_leave_the_worker_idle_and_small() {
    let mock = spawn_mock(Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runpod.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[handler]
max_concurrency = 2
execution_timeout = 30
model_dir = {models:?}
parser = {PARSER:?}
[queue]
max_job_size = "24MB"
max_result_size = "400MB"
spool_dir = {spool:?}
[handlers.extract]
max_concurrency = 2
device = "cpu"
allow_private_urls = true
url_timeout_s = 3
max_parse_memory = "512MB"
max_parse_cpu_s = {PARSE_CPU_S}
max_text_chars = 20000000
"#,
            models = Path::new(ROOT).join("handler/models"),
            spool = dir.path().join("spool"),
        ),
    )
    .unwrap();
    let child = worker_command(&mock.base_url(), "hostile")
        .env("RUNPOD_WORKER_CONFIG", &config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let worker = Worker { child };
    let pid = worker.child.id();
    let server = hostile_server().await;
    let big_text = "All work and no play makes a dull document. ".repeat(15_000_000 / 45);
    let cases: Vec<(&str, Value, Option<u64>, &str)> = vec![
        (
            "bomb behind ASCII85+Flate (700 MB)",
            pdf_input(&ascii85_flate_bomb(700)),
            None,
            "max_parse_memory",
        ),
        (
            "bomb behind Flate+Flate (1 GB)",
            pdf_input(&double_flate_bomb(1024)),
            None,
            "max_parse_memory",
        ),
        (
            "text-operator bomb (~100 MB of Tj)",
            pdf_input(&text_operator_bomb()),
            None,
            "max_",
        ),
        (
            "20,000 pages",
            pdf_input(&many_pages(20_000)),
            None,
            "max_pages",
        ),
        (
            "HTML nested 100,000 deep",
            json!({"task": "extract", "embed": false, "document": {"html": "<div>".repeat(100_000) + "deep"}}),
            None,
            "",
        ),
        (
            "markdown nested 100,000 deep",
            json!({"task": "extract", "embed": false, "document": {"markdown": "> ".repeat(100_000) + "deep"}}),
            None,
            "",
        ),
        (
            "gzip bomb by URL (200 MB)",
            json!({"task": "extract", "document": {"url": format!("{server}/bomb")}}),
            None,
            "max_document_size",
        ),
        (
            "URL that stalls mid-body",
            json!({"task": "extract", "document": {"url": format!("{server}/stall")}}),
            None,
            // Named as what it is: the server was too slow, not the body unreadable.
            "did not send its document within 3 s (url_timeout_s)",
        ),
        (
            "15 MB of text, embedded, 5 s deadline",
            json!({"task": "extract", "document": {"text": big_text}}),
            Some(5_000),
            "executionTimeout",
        ),
    ];
    let mut table = vec![format!(
        "{:<46} {:>8} {:>8} {:>10}  answer",
        "document", "answer", "idle", "peak RSS"
    )];
    for (i, (name, input, policy_ms, expect)) in cases.into_iter().enumerate() {
        let id = format!("hostile-{i}");
        let mut job = json!({"id": id, "input": input});
        if let Some(ms) = policy_ms {
            job["policy"] = json!({"executionTimeout": ms});
        }
        let deadline = Duration::from_millis(policy_ms.unwrap_or(30_000));
        mock.enqueue(EP, job);
        // The job's time counts from the take, as the queue counts `executionTimeout`.
        let taken = mock
            .state()
            .wait_for(WAIT, |inner| {
                let queue = inner.endpoints.get(EP)?;
                let answered = queue.done.iter().any(|d| d.job_id == id);
                (queue.holder_of(&id).is_some() || answered).then(Instant::now)
            })
            .await
            .unwrap_or_else(|| panic!("{name}: never taken"));
        let done = mock
            .wait_done(EP, &id, deadline + Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("{name}: no answer"));
        let answered = taken.elapsed();
        let idle = time_to_idle(pid).await;
        let rss = peak_rss(pid);
        let output = &done.body["output"];
        let shown = output
            .get("error")
            .and_then(Value::as_str)
            .map(|e| format!("{}: {e}", output["error_type"].as_str().unwrap_or("?")))
            .unwrap_or_else(|| {
                format!("ok, {} chars", output["text"].as_str().map_or(0, str::len))
            });
        table.push(format!(
            "{name:<46} {:>7.1}s {:>7} {:>8.0}MB  {}",
            answered.as_secs_f64(),
            idle.map_or("never".to_owned(), |d| format!("{:.1}s", d.as_secs_f64())),
            rss as f64 / 1e6,
            shown.chars().take(110).collect::<String>()
        ));
        assert!(
            output.get("error").is_some() || output.get("text").is_some(),
            "{name}: {output}"
        );
        assert!(
            shown.contains(expect),
            "{name}: expected an answer naming {expect:?}, got {shown}"
        );
        // Within the deadline, plus the 2 s the issue allows, from the take.
        let bound = if policy_ms.is_some() {
            deadline
        } else {
            Duration::from_secs(PARSE_CPU_S + 4)
        } + Duration::from_secs(2);
        assert!(answered < bound, "{name}: answered after {answered:?}");
        assert!(
            idle.is_some(),
            "{name}: the worker kept a core busy after answering"
        );
        assert!(
            rss < MAX_WORKER_RSS,
            "{name}: the worker's RSS peaked at {rss} bytes"
        );
        // And the next job runs at once.
        let next = format!("next-{i}");
        let started = Instant::now();
        mock.enqueue(
            EP,
            json!({"id": next, "input": {"task": "extract", "document": {"text": "a small, ordinary text"}}}),
        );
        let done = mock.wait_done(EP, &next, Duration::from_secs(10)).await;
        let output = &done.expect("the next job is answered").body["output"];
        assert_eq!(
            output["chunks"].as_array().map(Vec::len),
            Some(1),
            "{output}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    eprintln!("{}", table.join("\n"));
}
