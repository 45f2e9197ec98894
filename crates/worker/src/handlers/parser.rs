//! Documents are parsed in `runpod-parse` child processes, never in the worker: a hostile PDF
//! or HTML can then use at most the child's memory limit (its own `RLIMIT_AS`), the CPU time
//! this side allows it (read from `/proc`, the child killed past it), and the job's time (the
//! child is killed when the job's prepare stage is dropped at its deadline or stop). A few warm
//! children are kept per handler, so a document costs a pipe round trip, not a process start;
//! one that has worked a lot or grown is replaced.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use docparse::wire::{self, Encoding, Kind, Limits, Reply, Request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::config::Size;
use crate::outcome::JobError;

/// A document reduced to text: what a parse gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The text.
    pub text: String,
    /// Pages (PDF), or 1.
    pub pages: usize,
}

/// The parser executable's file name, looked for beside the worker's.
pub const PARSER_EXE: &str = "runpod-parse";

/// How often a parse's CPU time is read.
const CPU_POLL: Duration = Duration::from_millis(50);
/// Documents one child parses before it is replaced (a fresh heap now and then).
const DOCUMENTS_PER_CHILD: u32 = 1000;
/// A child whose address space grew past this (or a quarter of its limit) is replaced rather
/// than kept warm.
const MAX_IDLE_MAPPED: u64 = 256 << 20;
/// What is kept of a child's stderr, to say why it died.
const STDERR_TAIL: usize = 4096;

/// The limits documents of one handler are parsed under (`[handlers.<name>]` keys).
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// `max_parse_memory`: the child's address space beyond what it maps at start.
    pub max_memory: Size,
    /// `max_parse_cpu_s`: CPU time one document may take.
    pub max_cpu: Duration,
    /// `max_text_chars`, `max_pages`, and `max_document_size` for what a body inflates to.
    pub document: Limits,
}

/// The parser executable: `[handler] parser`, else `runpod-parse` beside this executable (or
/// one directory up, where cargo puts binaries when this is a test).
pub fn locate(configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = configured {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!(
                "[handler] parser = {:?} is not a file (the document parser, `{PARSER_EXE}`)",
                path.display().to_string()
            ))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable ({e})"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    [dir.join(PARSER_EXE), dir.join("..").join(PARSER_EXE)]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "the document parser `{PARSER_EXE}` is not beside {} (install it there, or set \
                 [handler] parser to its path)",
                exe.display()
            )
        })
}

/// What the start-up handshake asks the parser to read.
const HANDSHAKE_TEXT: &str = "runpod-parse handshake";
/// How long the parser has to answer the handshake (it answers in milliseconds).
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
/// The memory limit the handshake's child runs under.
const HANDSHAKE_MEMORY: u64 = 1 << 30;

/// Checks that `exe` is the document parser: a short text document goes in over the parser's
/// protocol and the same text must come back. A wrong `[handler] parser` (another program, a
/// broken build) is then a start-up error that names it, not the first document job's
/// `Internal` error.
pub fn handshake(exe: &Path) -> Result<(), String> {
    let mut child = std::process::Command::new(exe)
        .arg(docparse::child::MAX_MEMORY_ARG)
        .arg(HANDSHAKE_MEMORY.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_clear()
        .spawn()
        .map_err(|e| format!("it cannot be started ({e})"))?;
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("it has no pipes".to_owned());
    };
    let (answered, answer) = std::sync::mpsc::channel();
    // On a thread of its own: a program that never answers must not hold the start-up.
    std::thread::spawn(move || {
        let request = Request {
            kind: Kind::Text,
            encoding: Encoding::Identity,
            limits: Limits {
                max_text_chars: HANDSHAKE_TEXT.len(),
                max_pages: 1,
                max_decoded_bytes: HANDSHAKE_TEXT.len(),
            },
        };
        let reply = wire::write(&mut stdin, &request, HANDSHAKE_TEXT.as_bytes()).and_then(|()| {
            drop(stdin);
            wire::read::<Reply>(&mut stdout, HANDSHAKE_TEXT.len() as u64 * 4)
        });
        let _ = answered.send(reply);
    });
    let reply = answer.recv_timeout(HANDSHAKE_WAIT);
    let _ = child.kill();
    let _ = child.wait();
    match reply {
        Ok(Ok(Some((Reply::Parsed { .. }, text)))) if text == HANDSHAKE_TEXT.as_bytes() => Ok(()),
        Ok(Ok(Some(_))) => Err("it did not give back the text it was sent".to_owned()),
        Ok(Ok(None)) => Err("it exited without answering".to_owned()),
        Ok(Err(e)) => Err(format!("it does not speak the parser's protocol ({e})")),
        Err(_) => Err(format!("it did not answer within {HANDSHAKE_WAIT:?}")),
    }
}

/// Warm parser children for one handler, parsing at most one document per core at once.
pub struct ParserPool {
    exe: PathBuf,
    limits: ParseLimits,
    idle: Mutex<Vec<Parser>>,
    keep: usize,
    started: AtomicU64,
    /// Parsing is CPU-bound: more children at once than cores only share the cores (and add
    /// their memory). A handler may hold many more jobs (OpenAI embedding requests, which
    /// parse nothing, share extract's limit); its documents wait here for a core.
    running: tokio::sync::Semaphore,
}

impl ParserPool {
    /// A pool that keeps up to `keep` children of `exe` warm, and runs at most one per core
    /// (and at most `keep`) at once.
    pub fn new(exe: PathBuf, limits: ParseLimits, keep: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let at_once = keep.clamp(1, cores.max(2));
        Self {
            exe,
            limits,
            idle: Mutex::new(Vec::new()),
            keep: at_once,
            started: AtomicU64::new(0),
            running: tokio::sync::Semaphore::new(at_once),
        }
    }

    /// Children started so far (a warm pool starts few).
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// The limits documents are parsed under.
    pub fn limits(&self) -> &ParseLimits {
        &self.limits
    }

    /// Parses `bytes` in a child. Dropping the future kills the child mid-parse.
    pub async fn parse(
        &self,
        kind: Kind,
        encoding: Encoding,
        bytes: Vec<u8>,
    ) -> Result<Document, JobError> {
        let request = Request {
            kind,
            encoding,
            limits: self.limits.document,
        };
        let frame = wire::encode(&request, &bytes);
        drop(bytes);
        // Never closed; dropping the future (the job ended) gives the place up.
        let _core = self.running.acquire().await;
        if let Some(parser) = self.take_idle() {
            match self.exchange(parser, &frame).await {
                Exchange::Answered(result) => return result,
                // A warm child that died is not the document's fault by itself (the kernel's
                // OOM killer, or what an earlier document left in its heap): a fresh one decides.
                Exchange::Died(death) => {
                    tracing::debug!("a warm document parser stopped ({death:?}); retrying fresh")
                }
            }
        }
        let parser = self.spawn()?;
        match self.exchange(parser, &frame).await {
            Exchange::Answered(result) => result,
            Exchange::Died(death) => Err(death.into_error(&self.limits)),
        }
    }

    /// Sends one frame to `parser` and reads its reply, within the CPU limit.
    async fn exchange(&self, mut parser: Parser, frame: &[u8]) -> Exchange {
        let cpu_before = parser.cpu_time();
        // Characters are at most 4 bytes: a longer reply is a broken child.
        let max_reply = self.limits.document.max_text_chars as u64 * 4;
        let over_cpu = cpu_over(parser.pid, cpu_before, self.limits.max_cpu);
        let exchange = parser.exchange(frame, max_reply);
        let reply = tokio::select! {
            reply = exchange => reply,
            () = over_cpu => {
                return Exchange::Answered(Err(JobError::invalid_input(format!(
                    "parsing the document took more than {} s of CPU time (max_parse_cpu_s); \
                     the parser was stopped",
                    self.limits.max_cpu.as_secs()
                ))));
            }
        };
        Exchange::Answered(match reply {
            Ok((Reply::Parsed { pages }, text)) => match String::from_utf8(text) {
                Ok(text) => {
                    self.put_back(parser, cpu_before);
                    Ok(Document { text, pages })
                }
                Err(_) => Err(JobError::internal("the document parser sent invalid UTF-8")),
            },
            Ok((Reply::Failed { message }, _)) => {
                self.put_back(parser, cpu_before);
                Err(JobError::invalid_input(message))
            }
            Err(error) => return Exchange::Died(parser.death(&error).await),
        })
    }

    fn take_idle(&self) -> Option<Parser> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    /// Keeps `parser` warm unless it has done its share, grown, or the pool is full.
    fn put_back(&self, mut parser: Parser, cpu_before: Duration) {
        parser.documents += 1;
        let worked = parser.cpu_time().saturating_sub(cpu_before);
        // RLIMIT_AS counts what is mapped, not what is resident: a child whose heap stays
        // large would fail the next document early.
        let spent = parser.documents >= DOCUMENTS_PER_CHILD
            || worked > self.limits.max_cpu / 2
            || parser.mapped_bytes() > MAX_IDLE_MAPPED.min(self.limits.max_memory.bytes() / 4);
        if spent {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.keep {
            idle.push(parser);
        }
    }

    fn spawn(&self) -> Result<Parser, JobError> {
        let mut child = Command::new(&self.exe)
            .arg(docparse::child::MAX_MEMORY_ARG)
            .arg(self.limits.max_memory.bytes().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Nothing of the worker's environment (its API key least of all); no backtraces.
            .env_clear()
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                tracing::error!(
                    "cannot start the document parser {}: {e}",
                    self.exe.display()
                );
                if crate::outcome::is_out_of_file_descriptors(&e) {
                    JobError::out_of_file_descriptors("the document parser could not be started")
                } else {
                    JobError::internal("the document parser could not be started")
                }
            })?;
        self.started.fetch_add(1, Ordering::Relaxed);
        let (Some(stdin), Some(stdout), Some(stderr), Some(pid)) = (
            child.stdin.take(),
            child.stdout.take(),
            child.stderr.take(),
            child.id(),
        ) else {
            return Err(JobError::internal("the document parser has no pipes"));
        };
        // Drained all the time (a full pipe would stall the child); it says why a child died.
        let tail = Arc::new(Mutex::new(StderrTail::default()));
        let keep = tail.clone();
        let stderr_done = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "runpod_worker::document_parser", "{line}");
                keep.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(&line);
            }
        });
        Ok(Parser {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            pid,
            documents: 0,
            stderr_tail: tail,
            stderr_done,
        })
    }
}

/// What a child wrote to stderr: its last lines, and whether it said it ran out of memory
/// or stack (Rust's own messages before it aborts).
#[derive(Debug, Default)]
struct StderrTail {
    text: String,
    out_of_memory: bool,
    stack_overflow: bool,
}

impl StderrTail {
    fn push(&mut self, line: &str) {
        self.out_of_memory |= line.contains("memory allocation of");
        self.stack_overflow |= line.contains("overflowed its stack");
        self.text.push_str(line);
        self.text.push('\n');
        if self.text.len() > STDERR_TAIL {
            let cut = self.text.len() - STDERR_TAIL;
            let cut = (cut..self.text.len())
                .find(|i| self.text.is_char_boundary(*i))
                .unwrap_or(0);
            self.text.drain(..cut);
        }
    }
}

/// One child (killed when dropped).
struct Parser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
    documents: u32,
    stderr_tail: Arc<Mutex<StderrTail>>,
    stderr_done: tokio::task::JoinHandle<()>,
}

impl Parser {
    async fn exchange(
        &mut self,
        frame: &[u8],
        max_reply: u64,
    ) -> std::io::Result<(Reply, Vec<u8>)> {
        self.stdin.write_all(frame).await?;
        self.stdin.flush().await?;
        let len = self.stdout.read_u32_le().await?;
        if len > wire::MAX_HEADER {
            return Err(std::io::Error::other("oversized reply header"));
        }
        let mut json = vec![0u8; len as usize];
        self.stdout.read_exact(&mut json).await?;
        let (reply, body_len) = wire::decode_header::<Reply>(&json)?;
        if body_len > max_reply {
            return Err(std::io::Error::other("oversized reply"));
        }
        let mut body = vec![0u8; body_len as usize];
        self.stdout.read_exact(&mut body).await?;
        Ok((reply, body))
    }

    /// Its CPU time so far (user + system).
    fn cpu_time(&self) -> Duration {
        cpu_time(self.pid).unwrap_or_default()
    }

    fn mapped_bytes(&self) -> u64 {
        docparse::child::mapped_bytes(&self.pid.to_string()).unwrap_or(0)
    }

    /// Why the child stopped answering: its exit and what it said on stderr. A child that
    /// broke the protocol but still runs is killed first.
    async fn death(mut self, error: &std::io::Error) -> Death {
        let hung_up = matches!(
            error.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe
        );
        if !hung_up {
            let _ = self.child.start_kill();
        }
        let status = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut self.stderr_done).await;
        let tail = std::mem::take(
            &mut *self
                .stderr_tail
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if tail.out_of_memory {
            return Death::OutOfMemory;
        }
        if tail.stack_overflow {
            return Death::StackOverflow;
        }
        let how = match status {
            Ok(Ok(status)) => match status.signal() {
                Some(signal) => format!("signal {signal}"),
                None => format!("exit {}", status.code().unwrap_or(-1)),
            },
            _ => "no answer".to_owned(),
        };
        Death::Other(format!("{how}, {error}: {}", tail.text.trim()))
    }
}

/// How one exchange with a child ended.
enum Exchange {
    /// With the document's text or error.
    Answered(Result<Document, JobError>),
    /// The child stopped answering.
    Died(Death),
}

/// Why a child stopped answering.
#[derive(Debug)]
enum Death {
    /// It reached its memory limit (`max_parse_memory`).
    OutOfMemory,
    /// It overflowed its stack.
    StackOverflow,
    /// Anything else: its exit, the pipe error, its last words.
    Other(String),
}

impl Death {
    /// The job's error when a fresh child died on its document.
    fn into_error(self, limits: &ParseLimits) -> JobError {
        match self {
            Self::OutOfMemory => JobError::invalid_input(format!(
                "parsing the document needed more than {} of memory (max_parse_memory); the \
                 parser was stopped",
                limits.max_memory.approx()
            )),
            Self::StackOverflow => JobError::invalid_input(
                "the document is nested too deeply to parse; the parser was stopped",
            ),
            // Safe Rust under catch_unwind does not crash on a document: this is the
            // worker's fault (a missing or broken parser executable), not the job's.
            Self::Other(what) => {
                tracing::error!("the document parser stopped unexpectedly ({what})");
                JobError::internal("the document parser stopped unexpectedly")
            }
        }
    }
}

/// Resolves once `pid` has used more than `limit` of CPU time since `before`.
async fn cpu_over(pid: u32, before: Duration, limit: Duration) {
    let mut ticks = tokio::time::interval(CPU_POLL);
    loop {
        ticks.tick().await;
        if cpu_time(pid).is_some_and(|now| now.saturating_sub(before) > limit) {
            return;
        }
    }
}

/// User + system CPU time of `pid`, from `/proc/<pid>/stat` (clock ticks of 1/100 s, Linux's
/// fixed `USER_HZ`).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_cpu_time() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_time(std::process::id()).is_some_and(|t| t > Duration::ZERO));
        assert!(cpu_time(u32::MAX).is_none());
    }
}
