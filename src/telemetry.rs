//! Log output: the seed's human lines (`[RunPod] Extraction started (concurrent: 3/4)`) by
//! default, and the SDK's JSON lines (`{"requestId", "message", "level"}`) when
//! `RUNPOD_ENDPOINT_ID` is set, i.e. on the platform.
//!
//! A `job_id` field on an event becomes `requestId` in JSON and a `| job_id=..` suffix in human
//! lines. Logs go to stderr; stdout is kept for what commands print (banners, results). Secrets
//! in URLs are redacted from every line ([`crate::redact`]); events bridged from the `log` crate
//! keep their target, not their source file.

use std::fmt;

use serde_json::{json, Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

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

/// Installs the global subscriber (level from `RUNPOD_LOG_LEVEL`, else `RUST_LOG`, else info).
/// Calling it twice is harmless (tests).
pub fn init(format: LogFormat) {
    let level =
        std::env::var("RUNPOD_LOG_LEVEL")
            .ok()
            .map(|l| match l.to_ascii_uppercase().as_str() {
                "TRACE" => "trace",
                "DEBUG" => "debug",
                "WARN" => "warn",
                "ERROR" => "error",
                _ => "info",
            });
    let filter = match level {
        Some(level) => EnvFilter::new(directives(Some(level))),
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives(None)))
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(LineFormat(format))
        .try_init();
}

/// The event formatter for both formats.
struct LineFormat(LogFormat);

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
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let level = level_name(event.metadata().level());
        match self.0 {
            LogFormat::Json => {
                let mut message = fields.message;
                for (key, value) in &fields.rest {
                    message.push_str(&format!(" {key}={}", value.as_str().unwrap_or_default()));
                }
                let line =
                    json!({ "requestId": fields.job_id, "message": message, "level": level });
                writeln!(writer, "{line}")
            }
            LogFormat::Human => {
                write!(writer, "[RunPod] ")?;
                if level != "INFO" {
                    write!(writer, "{level}: ")?;
                }
                write!(writer, "{}", fields.message)?;
                let mut extras = Vec::new();
                if let Some(id) = fields.job_id {
                    extras.push(format!("job_id={id}"));
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
