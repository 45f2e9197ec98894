//! Documents as jobs give them: `{text}`, `{markdown}`, `{html}`, `{pdf_base64}` or `{url}`,
//! turned into plain text (and a page count). Parsing untrusted bytes happens in a bounded
//! child process (see [`super::parser`]); every bad document is an `InvalidInput` error naming
//! the problem or the limit it ran into.

use base64::Engine as _;
use docparse::wire::{Encoding, Kind};
use serde_json::{Map, Value};

use super::fetch::{fetch, FetchPolicy, Fetched};
pub use super::parser::Document;
use super::parser::ParserPool;
use crate::outcome::JobError;

/// The raw material of a document, before parsing.
#[derive(Debug)]
pub enum Source {
    /// Plain text.
    Text(String),
    /// Markdown.
    Markdown(String),
    /// HTML.
    Html(Vec<u8>),
    /// PDF bytes.
    Pdf(Vec<u8>),
    /// A body fetched from a URL, maybe compressed, its kind told by its bytes and headers.
    Fetched(Fetched),
}

/// Reads `input.document` (an object with exactly one of the source keys), or `input.text` as
/// plain text when `text_fallback` is set (classify). URLs are fetched here.
pub async fn source_of(
    input: &Map<String, Value>,
    text_fallback: bool,
    policy: &FetchPolicy,
) -> Result<Source, JobError> {
    let document = match (input.get("document"), input.get("text")) {
        (Some(_), Some(_)) if text_fallback => {
            return Err(JobError::invalid_input(
                "give input.text or input.document, not both",
            ))
        }
        // A text beside the document would be silently ignored: say where it goes instead.
        (Some(_), Some(_)) => {
            return Err(JobError::invalid_input(
                "input.text is not read here: give the text as input.document.text, not both",
            ))
        }
        (Some(Value::Object(document)), _) => document,
        (Some(_), _) => {
            return Err(JobError::invalid_input(
                "input.document must be an object such as {\"text\": \"...\"}",
            ))
        }
        (None, Some(Value::String(text))) if text_fallback => {
            return Ok(Source::Text(text.clone()))
        }
        (None, Some(_)) if text_fallback => {
            return Err(JobError::invalid_input("input.text must be a string"))
        }
        (None, _) => {
            let also = if text_fallback { "input.text or " } else { "" };
            return Err(JobError::invalid_input(format!(
                "{also}input.document is required: {{\"text\"|\"markdown\"|\"html\"|\"pdf_base64\"|\"url\": ...}}"
            )));
        }
    };
    let keys: Vec<&String> = document.keys().collect();
    let [key] = keys.as_slice() else {
        return Err(JobError::invalid_input(
            "input.document must have exactly one of text, markdown, html, pdf_base64 or url",
        ));
    };
    let Some(value) = document[key.as_str()].as_str() else {
        return Err(JobError::invalid_input(format!(
            "input.document.{key} must be a string"
        )));
    };
    let limit = policy.max_bytes;
    let too_large = |what: &str, size: usize| {
        JobError::invalid_input(format!(
            "input.document.{what} is {size} bytes, over the limit of {limit} bytes"
        ))
    };
    match key.as_str() {
        "text" | "markdown" | "html" if value.len() > limit => Err(too_large(key, value.len())),
        "text" => Ok(Source::Text(value.to_owned())),
        "markdown" => Ok(Source::Markdown(value.to_owned())),
        "html" => Ok(Source::Html(value.as_bytes().to_vec())),
        "pdf_base64" => {
            if value.len() / 4 * 3 > limit {
                return Err(too_large("pdf_base64 (decoded)", value.len() / 4 * 3));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .map_err(|e| JobError::invalid_input(format!("input.document.pdf_base64 is not valid base64 ({e})")))?;
            Ok(Source::Pdf(bytes))
        }
        "url" => Ok(Source::Fetched(fetch(value, policy).await?)),
        other => Err(JobError::invalid_input(format!(
            "input.document.{other} is not a document source: use text, markdown, html, pdf_base64 or url"
        ))),
    }
}

/// Turns a source into text in a child process of `parsers` (plain text too: normalising
/// megabytes is work that must stop at the job's deadline like any other).
pub async fn read(source: Source, parsers: &ParserPool) -> Result<Document, JobError> {
    let (kind, encoding, bytes) = match source {
        Source::Text(text) => (Kind::Text, Encoding::Identity, text.into_bytes()),
        Source::Markdown(text) => (Kind::Markdown, Encoding::Identity, text.into_bytes()),
        Source::Html(bytes) => (Kind::Html, Encoding::Identity, bytes),
        Source::Pdf(bytes) => (Kind::Pdf, Encoding::Identity, bytes),
        Source::Fetched(Fetched {
            bytes,
            html,
            encoding,
        }) => (Kind::Fetched { html }, encoding, bytes),
    };
    parsers.parse(kind, encoding, bytes).await
}
