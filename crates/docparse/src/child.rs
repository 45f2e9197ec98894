//! The parser child's main loop: limit this process's address space, then answer one request
//! frame after another on stdin/stdout until stdin closes. What cannot be parsed is a `Failed`
//! reply; what exceeds the memory limit aborts the process, which the parent reports.

use std::io::{self, BufReader, BufWriter};
use std::process::ExitCode;

use crate::parse::parse;
use crate::wire::{self, Reply, Request};

/// The argument that carries the memory limit, in bytes: `--max-memory BYTES`.
pub const MAX_MEMORY_ARG: &str = "--max-memory";

/// Longest failure message sent back.
const MAX_MESSAGE_CHARS: usize = 2000;

/// Largest document a request may carry (the worker's job size limit is far below).
const MAX_REQUEST_BODY: u64 = 4 << 30;

/// Runs the child: `runpod-parse --max-memory BYTES`.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let max_memory = match args.as_slice() {
        [flag, bytes] if flag == MAX_MEMORY_ARG => bytes.parse::<u64>().ok(),
        _ => None,
    };
    let Some(max_memory) = max_memory else {
        eprintln!(
            "usage: runpod-parse {MAX_MEMORY_ARG} BYTES (started by runpod-worker, which talks \
             to it over stdin and stdout)"
        );
        return ExitCode::from(2);
    };
    if let Err(e) = limit_memory(max_memory) {
        eprintln!("runpod-parse: cannot limit its memory ({e})");
        return ExitCode::FAILURE;
    }
    // Panics are answered as failed documents; their messages are not the worker's log.
    std::panic::set_hook(Box::new(|_| {}));
    // The parsers' own warnings go to stderr, which the worker logs at debug level.
    if log::set_logger(&STDERR_LOG).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    match serve(
        &mut BufReader::new(io::stdin().lock()),
        &mut BufWriter::new(io::stdout().lock()),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runpod-parse: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the parsers' `log` warnings to stderr, one line each: `WARN target: message`.
struct StderrLog;

static STDERR_LOG: StderrLog = StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{} {}: {}", record.level(), record.target(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Answers requests until the input ends.
pub fn serve(input: &mut impl io::Read, output: &mut impl io::Write) -> io::Result<()> {
    while let Some((request, body)) = wire::read::<Request>(input, MAX_REQUEST_BODY)? {
        match parse(request.kind, request.encoding, body, &request.limits) {
            Ok(parsed) => wire::write(
                output,
                &Reply::Parsed {
                    pages: parsed.pages,
                },
                parsed.text.as_bytes(),
            )?,
            Err(failed) => {
                // Messages quote the document's own words at times: keep the header small.
                let message = failed.0.chars().take(MAX_MESSAGE_CHARS).collect();
                wire::write(output, &Reply::Failed { message }, b"")?
            }
        }
    }
    Ok(())
}

/// Caps the address space at what the process maps now (its executable and libraries) plus
/// `bytes`, and turns core dumps off (an aborted parse must not write gigabytes to disk).
fn limit_memory(bytes: u64) -> io::Result<()> {
    let mapped = mapped_now().unwrap_or(0);
    let limit = mapped.saturating_add(bytes);
    rlimit::setrlimit(rlimit::Resource::AS, limit, limit)?;
    rlimit::setrlimit(rlimit::Resource::CORE, 0, 0)
}

/// `VmSize` from `/proc/self/status`, in bytes.
fn mapped_now() -> Option<u64> {
    mapped_bytes("self")
}

/// The address space process `pid` (or `"self"`) maps now: `VmSize` from its
/// `/proc/<pid>/status`, in bytes. The worker reads its children's with it too.
pub fn mapped_bytes(pid: &str) -> Option<u64> {
    status_bytes(pid, "VmSize")
}

/// A memory field (`VmSize`, `VmRSS`, ...) of process `pid` (or `"self"`) from its
/// `/proc/<pid>/status`, in bytes.
pub fn status_bytes(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Encoding, Kind, Limits};

    #[test]
    fn requests_are_answered_in_order_until_the_input_ends() {
        let limits = Limits {
            max_text_chars: 100,
            max_pages: 1,
            max_decoded_bytes: 100,
        };
        let request = |kind| Request {
            kind,
            encoding: Encoding::Identity,
            limits,
        };
        let mut input = wire::encode(&request(Kind::Markdown), b"# one");
        input.extend(wire::encode(&request(Kind::Pdf), b"two"));
        let mut output = Vec::new();
        serve(&mut input.as_slice(), &mut output).unwrap();
        let mut replies = output.as_slice();
        let (first, text) = wire::read::<Reply>(&mut replies, 100).unwrap().unwrap();
        assert_eq!(
            (first, text.as_slice()),
            (Reply::Parsed { pages: 1 }, b"one".as_slice())
        );
        let (second, _) = wire::read::<Reply>(&mut replies, 100).unwrap().unwrap();
        assert!(matches!(second, Reply::Failed { message } if message.contains("not a PDF")));
        assert!(wire::read::<Reply>(&mut replies, 100).unwrap().is_none());
    }
}
