//! The real binary as a process: `runpod-worker local` started on free ports with its banner
//! read ([`LocalProcess`]), the address a `serve` worker prints first ([`listening_address`]),
//! and a child's output read line by line without blocking the test ([`lines_of`],
//! [`lines_until`]). One fixture for every process test, so the banner is parsed in one place.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use crate::helpers::{BIN, WAIT};

/// Reads `stream` line by line on a thread, sending each line; ends with the stream.
pub fn lines_of(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end even when nobody listens any more: a child writing to a pipe nobody
        // drains would block or die of SIGPIPE.
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Receives lines until one contains `needle` (or `WAIT` passes); returns every line seen.
pub fn lines_until(lines: &mpsc::Receiver<String>, needle: &str) -> (Option<String>, String) {
    let deadline = Instant::now() + WAIT;
    let mut seen = String::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = lines.recv_timeout(left) else {
            break;
        };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(needle) {
            return (Some(line), seen);
        }
    }
    (None, seen)
}

/// The address in the `listening on http://...` line `serve` and `local` print first.
pub fn listening_address(lines: &mpsc::Receiver<String>) -> String {
    let (line, seen) = lines_until(lines, "listening on ");
    let line = line.unwrap_or_else(|| panic!("no \"listening on\" line in:\n{seen}"));
    line.trim()
        .strip_prefix("listening on ")
        .expect("the address follows")
        .to_owned()
}

/// `runpod-worker local` on free ports, its banner read; killed when dropped.
pub struct LocalProcess {
    /// The process (`None` once [`LocalProcess::into_child`] took it).
    child: Option<Child>,
    /// The first line it printed.
    pub first_line: String,
    /// The console's URL.
    pub console: String,
    /// The local endpoint's base URL (`listening on`).
    pub base: String,
    /// The worker's `/health` URL (`worker:`).
    pub worker_health: String,
    /// Its stderr (the log), line by line.
    pub stderr: mpsc::Receiver<String>,
}

impl LocalProcess {
    /// Starts `local` with `config`, the API key `key` and `env` on top of a clean
    /// environment for the worker's own variables, and reads its banner up to the `curl` line.
    pub fn start(config: &Path, key: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(config, key, env, &[])
    }

    /// [`LocalProcess::start`], with `args` after `local`'s own.
    pub fn start_with(config: &Path, key: &str, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["local", "--port", "0", "--http-port", "0", "--config"])
            .arg(config)
            .args(args)
            .env("RUNPOD_AI_API_KEY", key)
            .env_remove("RUNPOD_ENDPOINT_ID")
            .env_remove("RUNPOD_LOG_LEVEL")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        let (curl, banner) = lines_until(&stdout, "curl ");
        assert!(curl.is_some(), "local printed no banner:\n{banner}");
        let field = |prefix: &str| {
            banner
                .lines()
                .find_map(|line| line.trim().strip_prefix(prefix))
                .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
                .unwrap_or_else(|| panic!("no {prefix:?} in the banner:\n{banner}"))
        };
        Self {
            first_line: banner.lines().next().unwrap_or_default().to_owned(),
            console: field("console:"),
            base: field("listening on "),
            worker_health: field("worker:"),
            child: Some(child),
            // Its stdout goes on being drained (and dropped) by the reader thread.
            stderr,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the process is here").id()
    }

    /// The process itself, for a test that ends it and reads its exit (not killed on drop).
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("the process is here")
    }

    /// The worker's port (`/health` stripped from its URL).
    pub fn worker(&self) -> &str {
        self.worker_health
            .strip_suffix("/health")
            .expect("the worker's URL ends in /health")
    }
}

impl Drop for LocalProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
