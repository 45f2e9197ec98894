//! Documents as jobs give them: `{text}`, `{markdown}`, `{html}`, `{pdf_base64}` or `{url}`,
//! turned into plain text (and a page count) by well-kept crates. Every bad document is an
//! `InvalidInput` error naming the problem; parsers that may panic on hostile input run under
//! `catch_unwind`, on the blocking thread the caller provides.

use std::panic::AssertUnwindSafe;

use base64::Engine as _;
use serde_json::{Map, Value};

use super::fetch::{fetch, FetchPolicy, Fetched};
use crate::outcome::JobError;

/// A document reduced to text.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The text.
    pub text: String,
    /// Pages (PDF), or 1.
    pub pages: usize,
}

/// The raw material of a document, before parsing (parsing may block: do it on a thread).
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
        "url" => match fetch(value, policy).await? {
            Fetched { bytes, kind: "pdf" } => Ok(Source::Pdf(bytes)),
            Fetched { bytes, kind: "html" } => Ok(Source::Html(bytes)),
            Fetched { bytes, .. } => Ok(Source::Text(String::from_utf8_lossy(&bytes).into_owned())),
        },
        other => Err(JobError::invalid_input(format!(
            "input.document.{other} is not a document source: use text, markdown, html, pdf_base64 or url"
        ))),
    }
}

/// Parses a source into text. Blocking (PDF parsing can take a while): call it on a thread.
pub fn parse(source: Source) -> Result<Document, JobError> {
    let document = match source {
        Source::Text(text) => Document { text, pages: 1 },
        Source::Markdown(markdown) => Document {
            text: markdown_text(&markdown),
            pages: 1,
        },
        Source::Html(html) => {
            let text = std::panic::catch_unwind(AssertUnwindSafe(|| {
                html2text::config::plain_no_decorate().string_from_read(html.as_slice(), 100_000)
            }))
            .map_err(|_| JobError::invalid_input("the HTML could not be read"))?
            .map_err(|e| JobError::invalid_input(format!("the HTML could not be read ({e})")))?;
            Document { text, pages: 1 }
        }
        Source::Pdf(bytes) => {
            if !bytes.starts_with(b"%PDF") {
                return Err(JobError::invalid_input(
                    "the document is not a PDF (it does not start with %PDF)",
                ));
            }
            check_decompressed_size(&bytes)?;
            // Malformed PDFs can make the parser panic: that fails this document only.
            let pages = std::panic::catch_unwind(AssertUnwindSafe(|| {
                pdf_extract::extract_text_from_mem_by_pages(&bytes)
            }))
            .map_err(|_| JobError::invalid_input("the PDF is malformed and could not be read"))?
            .map_err(|e| JobError::invalid_input(format!("the PDF could not be read ({e})")))?;
            Document {
                pages: pages.len(),
                text: pages.join("\n\n"),
            }
        }
    };
    let text = normalise(&document.text);
    if text.is_empty() {
        return Err(JobError::invalid_input("the document has no text"));
    }
    Ok(Document { text, ..document })
}

/// Most bytes a PDF's compressed streams may inflate to, all together.
const MAX_DECOMPRESSED: u64 = 256 * 1024 * 1024;

/// Refuses decompression bombs before the parser sees them: every `stream ... endstream` body
/// that inflates as zlib (FlateDecode, object streams included) is inflated with a cap, and the
/// total must stay under [`MAX_DECOMPRESSED`]. The parser itself has no such limit.
fn check_decompressed_size(pdf: &[u8]) -> Result<(), JobError> {
    use std::io::Read;
    let mut total = 0u64;
    let mut rest = pdf;
    while let Some(start) = find(rest, b"stream") {
        let after = &rest[start + b"stream".len()..];
        let body = after
            .strip_prefix(b"\r\n")
            .or_else(|| after.strip_prefix(b"\n"));
        let Some(body) = body else {
            rest = after;
            continue;
        };
        let end = find(body, b"endstream").unwrap_or(body.len());
        let budget = MAX_DECOMPRESSED - total;
        let mut decoder = flate2::read::ZlibDecoder::new(&body[..end]).take(budget + 1);
        let inflated = std::io::copy(&mut decoder, &mut std::io::sink()).unwrap_or(0);
        total += inflated;
        if total > MAX_DECOMPRESSED {
            return Err(JobError::invalid_input(format!(
                "the PDF inflates to more than {} MB (a decompression bomb?)",
                MAX_DECOMPRESSED / (1024 * 1024)
            )));
        }
        rest = &body[end..];
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Markdown without its markup: text, code and line structure.
fn markdown_text(markdown: &str) -> String {
    use pulldown_cmark::{Event, Parser, TagEnd};
    let mut out = String::new();
    for event in Parser::new(markdown) {
        match event {
            Event::Text(text) | Event::Code(text) => out.push_str(&text),
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::End(
                TagEnd::Paragraph | TagEnd::Heading(_) | TagEnd::Item | TagEnd::CodeBlock,
            ) => out.push('\n'),
            _ => {}
        }
    }
    out
}

/// Trims trailing spaces, collapses runs of blank lines, and drops control characters.
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let line: String = line
            .chars()
            .filter(|c| !c.is_control() || *c == '\t')
            .collect();
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_html_lose_their_markup() {
        let md = parse(Source::Markdown(
            "# Title\n\nSome *bold* text.\n\n- item".into(),
        ))
        .unwrap();
        assert_eq!(md.text, "Title\nSome bold text.\nitem");
        let html = parse(Source::Html(
            b"<html><body><h1>Hi</h1><p>there <b>you</b></p><script>x()</script></body></html>"
                .to_vec(),
        ))
        .unwrap();
        assert!(
            html.text.contains("Hi") && html.text.contains("there you"),
            "{}",
            html.text
        );
    }

    #[test]
    fn a_pdf_that_inflates_to_gigabytes_is_refused_before_parsing() {
        use std::io::Write;
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..300 {
            encoder.write_all(&zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        assert!(
            bomb.len() < 1_000_000,
            "300 MB of zeros compress to {} bytes",
            bomb.len()
        );
        let mut pdf = b"%PDF-1.7\n1 0 obj << /Filter /FlateDecode /Length 1 >>\nstream\n".to_vec();
        pdf.extend_from_slice(&bomb);
        pdf.extend_from_slice(b"\nendstream\nendobj\n%%EOF");
        let error = parse(Source::Pdf(pdf)).unwrap_err();
        assert!(
            error.message.contains("decompression bomb"),
            "{}",
            error.message
        );
    }

    #[test]
    fn empty_and_non_pdf_documents_are_invalid_input() {
        assert!(parse(Source::Text(" \n\t\n ".into()))
            .unwrap_err()
            .message
            .contains("no text"));
        assert!(parse(Source::Html(
            b"<html><body><img src=x></body></html>".to_vec()
        ))
        .unwrap_err()
        .message
        .contains("no text"));
        assert!(parse(Source::Pdf(b"hello".to_vec()))
            .unwrap_err()
            .message
            .contains("not a PDF"));
        let broken = parse(Source::Pdf(
            b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage".to_vec(),
        ))
        .unwrap_err();
        assert!(broken.message.contains("PDF"), "{}", broken.message);
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// Arbitrary bytes as any document kind: a document or an InvalidInput, never a panic.
            #[test]
            fn arbitrary_documents_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), kind in 0u8..4) {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let source = match kind {
                    0 => Source::Text(text),
                    1 => Source::Markdown(text),
                    2 => Source::Html(bytes),
                    _ => Source::Pdf([b"%PDF-1.4\n".as_slice(), &bytes].concat()),
                };
                if let Err(error) = parse(source) {
                    prop_assert_eq!(error.error_type, crate::outcome::ErrorType::InvalidInput);
                }
            }
        }
    }
}
