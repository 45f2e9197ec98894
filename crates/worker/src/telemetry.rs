//! Log output: the seed's human lines (`[RunPod] Extraction started (concurrent: 3/4)`) by
//! default, and the SDK's JSON lines (`{"requestId", "message", "level"}`) when
//! `RUNPOD_ENDPOINT_ID` is set, i.e. on the platform.
//!
//! A `job_id` field on an event (or on the job's span, [`job_span`]) becomes `requestId` in JSON
//! and a `| job_id=..` suffix in human lines; a job's `batchId` prefixes its JSON messages as
//! `[batchId=..] `, as the SDK writes them. Messages over 4,096 characters are cut in the middle
//! (the SDK's limit: a platform log line is no place for a whole document). Logs go to stderr; stdout is kept for what commands print (banners, results). Secrets
//! in URLs are redacted from every line ([`crate::redact`]); events bridged from the `log` crate
//! keep their target, not their source file.

use std::fmt;

use serde_json::{json, Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Span, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The longest message written; longer ones keep their start and end (the SDK's 4,096).
pub const MAX_MESSAGE_CHARS: usize = 4096;

/// The span a job's work runs in: every line logged inside it names the job (and its batch,
/// for jobs of the platform's batch API), whether or not the event says so itself.
///
/// At ERROR level so that no log level disables it: a span prints nothing by itself.
pub fn job_span(job_id: &str, batch_id: Option<&str>) -> Span {
    // The batch id comes from the job: bounded like an id before it reaches every line.
    // Escaped: a newline in it must not forge a log line.
    let batch_id: Option<String> = batch_id.map(|b| {
        b.chars()
            .take(MAX_BATCH_ID_CHARS)
            .flat_map(char::escape_debug)
            .collect()
    });
    tracing::error_span!("job", job_id, batch_id)
}

/// The longest batch id written (job ids are bounded by the protocol's own limit).
const MAX_BATCH_ID_CHARS: usize = 128;

/// Which line format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `[RunPod] message | key=value`.
    Human,
    /// `{"requestId": .., "message": .., "level": ..}` (the SDK's keys).
    Json,
}

impl LogFormat {
    /// JSON when `RUNPOD_ENDPOINT_ID` is set, as the SDK decides.
    pub fn from_env() -> Self {
        if std::env::var_os("RUNPOD_ENDPOINT_ID").is_some_and(|v| !v.is_empty()) {
            Self::Json
        } else {
            Self::Human
        }
    }
}

/// Quiet third-party targets, added to the level from `RUNPOD_LOG_LEVEL` or the default: HTTP
/// internals, and document parsers whose warnings are about the input (a corrupt stream, an
/// unknown glyph) rather than the worker; the job's result already says when a document cannot
/// be read. `RUST_LOG` replaces all of this, so `RUST_LOG=info` shows them again.
const QUIET_TARGETS: &str =
    "hyper=warn,reqwest=warn,lopdf=error,pdf_extract=error,html2text=error,html5ever=error";

/// The filter directives for `RUNPOD_LOG_LEVEL` (`level`, when set) or the default.
fn directives(level: Option<&str>) -> String {
    format!("{},{QUIET_TARGETS}", level.unwrap_or("info"))
}

/// The level named by `RUNPOD_LOG_LEVEL`, or by `RUNPOD_DEBUG_LEVEL` (the SDK's older name).
fn level_from_env() -> Option<&'static str> {
    let named = std::env::var("RUNPOD_LOG_LEVEL")
        .or_else(|_| std::env::var("RUNPOD_DEBUG_LEVEL"))
        .ok()?;
    Some(match named.to_ascii_uppercase().as_str() {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "WARN" => "warn",
        "ERROR" => "error",
        _ => "info",
    })
}

/// Installs the global subscriber (level from `RUNPOD_LOG_LEVEL` or `RUNPOD_DEBUG_LEVEL`, else
/// `RUST_LOG`, else info). Calling it twice is harmless (tests).
pub fn init(format: LogFormat) {
    let filter = match level_from_env() {
        Some(level) => EnvFilter::new(directives(Some(level))),
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives(None)))
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(LineFormat(format))
        .finish()
        .with(JobSpanLayer)
        .try_init();
}

/// Keeps the job fields of [`job_span`] where the line formatter finds them.
struct JobSpanLayer;

/// What a job span carries.
#[derive(Debug, Clone, Default)]
struct JobSpanFields {
    job_id: Option<String>,
    batch_id: Option<String>,
}

impl<S> Layer<S> for JobSpanLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let batch_id = fields
            .rest
            .remove("batch_id")
            .and_then(|v| v.as_str().map(str::to_owned));
        if fields.job_id.is_none() && batch_id.is_none() {
            return;
        }
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(JobSpanFields {
                job_id: fields.job_id,
                batch_id,
            });
        }
    }
}

/// `message` cut to [`MAX_MESSAGE_CHARS`], keeping its start and its end.
pub fn truncate_middle(message: &str) -> std::borrow::Cow<'_, str> {
    let chars = message.chars().count();
    if chars <= MAX_MESSAGE_CHARS {
        return std::borrow::Cow::Borrowed(message);
    }
    let cut = chars - MAX_MESSAGE_CHARS;
    let marker = format!(" …[{cut} characters cut]… ");
    let keep = MAX_MESSAGE_CHARS.saturating_sub(marker.chars().count()) / 2;
    let head: String = message.chars().take(keep).collect();
    let tail: String = message.chars().skip(chars - keep).collect();
    std::borrow::Cow::Owned(format!("{head}{marker}{tail}"))
}

/// The event formatter for both formats.
struct LineFormat(LogFormat);

/// The job fields of the innermost job span around the current event.
fn enclosing_job<S, N>(ctx: &FmtContext<'_, S, N>) -> JobSpanFields
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    ctx.event_scope()
        .into_iter()
        .flatten()
        .find_map(|span| span.extensions().get::<JobSpanFields>().cloned())
        .unwrap_or_default()
}

#[derive(Default)]
struct Fields {
    message: String,
    job_id: Option<String>,
    rest: Map<String, Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl Fields {
    fn record(&mut self, field: &Field, value: String) {
        // URLs reach log lines from many places (queue errors, webhooks, fetches): their
        // secrets are removed here, once, for every line.
        let value = match crate::redact::urls_in(&value) {
            std::borrow::Cow::Borrowed(_) => value,
            std::borrow::Cow::Owned(redacted) => redacted,
        };
        match field.name() {
            "message" => self.message = value,
            "job_id" => self.job_id = Some(value),
            // Events bridged from the `log` crate carry the source file of the crate that
            // logged (a build path on the machine that compiled us): only its target is kept.
            "log.target" => {
                self.rest.insert("target".to_owned(), Value::String(value));
            }
            "log.file" | "log.line" | "log.module_path" => {}
            name => {
                self.rest.insert(name.to_owned(), Value::String(value));
            }
        }
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARN",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let job = enclosing_job(ctx);
        let job_id = fields.job_id.take().or(job.job_id);
        let level = level_name(event.metadata().level());
        match self.0 {
            LogFormat::Json => {
                let mut message = match &job.batch_id {
                    Some(batch) => format!("[batchId={batch}] {}", fields.message),
                    None => fields.message,
                };
                for (key, value) in &fields.rest {
                    message.push_str(&format!(" {key}={}", value.as_str().unwrap_or_default()));
                }
                let message = truncate_middle(&message);
                let line = json!({ "requestId": job_id, "message": message, "level": level });
                writeln!(writer, "{line}")
            }
            LogFormat::Human => {
                write!(writer, "[RunPod] ")?;
                if level != "INFO" {
                    write!(writer, "{level}: ")?;
                }
                write!(writer, "{}", truncate_middle(&fields.message))?;
                let mut extras = Vec::new();
                if let Some(id) = job_id {
                    extras.push(format!("job_id={id}"));
                }
                if let Some(batch) = job.batch_id {
                    extras.push(format!("batch_id={batch}"));
                }
                extras.extend(
                    fields
                        .rest
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())),
                );
                if !extras.is_empty() {
                    write!(writer, " | {}", extras.join(" "))?;
                }
                writeln!(writer)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// The lines `emit` logs through the worker's formatter and job span layer.
    fn lines_of(format: LogFormat, emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .event_format(LineFormat(format))
            .finish()
            .with(JobSpanLayer);
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_line_inside_a_job_span_carries_the_job_id_and_the_sdks_batch_prefix() {
        let out = lines_of(LogFormat::Json, || {
            let _job = job_span("job-1", Some("b-9")).entered();
            tracing::info!("Started.");
        });
        let line: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            line,
            json!({"requestId": "job-1", "message": "[batchId=b-9] Started.", "level": "INFO"})
        );

        let out = lines_of(LogFormat::Human, || {
            let _job = job_span("job-1", Some("b-9")).entered();
            tracing::warn!("slow");
        });
        assert_eq!(out, "[RunPod] WARN: slow | job_id=job-1 batch_id=b-9\n");
    }

    #[test]
    fn an_event_outside_a_job_has_no_request_id_and_its_own_job_id_wins_inside() {
        let out = lines_of(LogFormat::Json, || {
            tracing::info!("idle");
            let _job = job_span("job-1", None).entered();
            tracing::info!(job_id = "job-2", "named");
        });
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["requestId"], Value::Null);
        assert_eq!(lines[1]["requestId"], "job-2");
        assert_eq!(lines[1]["message"], "named", "no batch, no prefix");
    }

    #[test]
    fn a_long_message_keeps_its_start_and_end_within_the_sdks_limit() {
        let message = format!("{}{}", "a".repeat(5000), "z".repeat(5000));
        let cut = truncate_middle(&message);
        assert!(cut.chars().count() <= MAX_MESSAGE_CHARS, "{}", cut.len());
        assert!(cut.chars().count() > MAX_MESSAGE_CHARS - 10);
        assert!(cut.starts_with("aaaa") && cut.ends_with("zzzz"));
        assert!(cut.contains("characters cut"), "says that it was cut");
        let short = "é".repeat(MAX_MESSAGE_CHARS);
        assert_eq!(truncate_middle(&short), short, "exactly the limit is kept");

        let out = lines_of(LogFormat::Json, || tracing::info!("{message}"));
        let line: Value = serde_json::from_str(out.trim()).unwrap();
        assert!(line["message"].as_str().unwrap().chars().count() <= MAX_MESSAGE_CHARS);
    }
}
