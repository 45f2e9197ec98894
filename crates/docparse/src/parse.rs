//! Bytes to text under [`Limits`]: decompression capped, PDF pages counted before any is read,
//! the text capped while it is produced. Parsers that may panic on hostile input run under
//! `catch_unwind`: a panic is a failed document, never a dead process (memory and CPU are
//! bounded by the process the caller runs this in).

use std::fmt;
use std::io::Read;
use std::panic::AssertUnwindSafe;

use crate::wire::{Encoding, Kind, Limits};

/// A document reduced to text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The text: normalised, never empty.
    pub text: String,
    /// Pages (PDF), or 1.
    pub pages: usize,
}

/// Why a document could not be read (the job's `InvalidInput` message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed(pub String);

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn failed(message: impl Into<String>) -> Failed {
    Failed(message.into())
}

/// Most bytes a PDF's plain zlib streams may inflate to, all together: refused with a clear
/// message before the parser sees them. (Filter chains are bounded by the process's memory.)
const MAX_PDF_INFLATED: u64 = 256 * 1024 * 1024;

/// Parses `bytes` of `kind`, compressed with `encoding`, under `limits`.
pub fn parse(
    kind: Kind,
    encoding: Encoding,
    bytes: Vec<u8>,
    limits: &Limits,
) -> Result<Parsed, Failed> {
    let bytes = decode(encoding, bytes, limits.max_decoded_bytes)?;
    let kind = match kind {
        Kind::Fetched { .. } if bytes.starts_with(b"%PDF") => Kind::Pdf,
        Kind::Fetched { html: true } => Kind::Html,
        Kind::Fetched { html: false } => Kind::Text,
        known => known,
    };
    let (text, pages) = match kind {
        Kind::Text => (String::from_utf8_lossy(&bytes).into_owned(), 1),
        Kind::Markdown => (markdown_text(&String::from_utf8_lossy(&bytes), limits)?, 1),
        Kind::Html => (html_text(&bytes)?, 1),
        Kind::Pdf => pdf_text(&bytes, limits)?,
        Kind::Fetched { .. } => unreachable!("resolved above"),
    };
    let text = normalise(&text);
    if text.is_empty() {
        return Err(failed("the document has no text"));
    }
    let chars = text.chars().count();
    if chars > limits.max_text_chars {
        return Err(text_over(limits, Some(chars)));
    }
    Ok(Parsed { text, pages })
}

fn text_over(limits: &Limits, chars: Option<usize>) -> Failed {
    let has = chars.map_or_else(|| "more".to_owned(), |n| n.to_string());
    failed(format!(
        "the document's text has {has} characters, over the limit of {} (max_text_chars)",
        limits.max_text_chars
    ))
}

/// Inflates a compressed body, at most `max` bytes of it.
fn decode(encoding: Encoding, bytes: Vec<u8>, max: usize) -> Result<Vec<u8>, Failed> {
    let inflate = |reader: &mut dyn Read, name: &str| {
        let mut out = Vec::new();
        reader
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| failed(format!("the {name} body could not be decompressed ({e})")))?;
        if out.len() > max {
            return Err(failed(format!(
                "the {name} body inflates to more than {max} bytes (max_document_size)"
            )));
        }
        Ok(out)
    };
    match encoding {
        Encoding::Identity => Ok(bytes),
        Encoding::Gzip => inflate(
            &mut flate2::read::MultiGzDecoder::new(bytes.as_slice()),
            "gzip",
        ),
        Encoding::Deflate => inflate(
            &mut flate2::read::ZlibDecoder::new(bytes.as_slice()),
            "deflate",
        ),
    }
}

fn html_text(html: &[u8]) -> Result<String, Failed> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        html2text::config::plain_no_decorate().string_from_read(html, 100_000)
    }))
    .map_err(|_| failed("the HTML could not be read"))?
    .map_err(|e| failed(format!("the HTML could not be read ({e})")))
}

/// Markdown without its markup: text, code and line structure.
fn markdown_text(markdown: &str, limits: &Limits) -> Result<String, Failed> {
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
        // Bytes bound characters from above: a cheap early stop for runaway input.
        if out.len() > limits.max_text_chars.saturating_mul(4) {
            return Err(text_over(limits, None));
        }
    }
    Ok(out)
}

fn pdf_text(bytes: &[u8], limits: &Limits) -> Result<(String, usize), Failed> {
    if !bytes.starts_with(b"%PDF") {
        return Err(failed(
            "the document is not a PDF (it does not start with %PDF)",
        ));
    }
    check_inflated_size(bytes)?;
    // Malformed PDFs can make the parser panic: that fails this document only.
    std::panic::catch_unwind(AssertUnwindSafe(|| pdf_pages(bytes, limits)))
        .map_err(|_| failed("the PDF is malformed and could not be read"))?
}

fn pdf_pages(bytes: &[u8], limits: &Limits) -> Result<(String, usize), Failed> {
    let mut document = pdf_extract::Document::load_mem(bytes)
        .map_err(|e| failed(format!("the PDF could not be read ({e})")))?;
    if document.is_encrypted() {
        // Most "encrypted" PDFs only restrict printing and open with the empty password.
        document
            .decrypt("")
            .map_err(|_| failed("the PDF is encrypted with a password"))?;
    }
    let pages = document.get_pages();
    if pages.len() > limits.max_pages {
        return Err(failed(format!(
            "the PDF has {} pages, over the limit of {} (max_pages)",
            pages.len(),
            limits.max_pages
        )));
    }
    let mut text = CappedText::new(limits.max_text_chars.saturating_mul(4));
    let mut read = 0;
    for &number in pages.keys() {
        if read > 0 {
            text.push_str("\n\n");
        }
        let mut output = pdf_extract::PlainTextOutput::new(&mut text);
        if pdf_extract::output_doc_page(&document, &mut output, number).is_err() {
            if text.over {
                return Err(text_over(limits, None));
            }
            // As the crate's own page loop does: the pages that could be read.
            break;
        }
        read += 1;
    }
    Ok((text.text, read))
}

/// A string that refuses to grow past a byte cap (the PDF's text is written into it).
struct CappedText {
    text: String,
    cap: usize,
    over: bool,
}

impl CappedText {
    fn new(cap: usize) -> Self {
        Self {
            text: String::new(),
            cap,
            over: false,
        }
    }

    fn push_str(&mut self, s: &str) {
        let _ = fmt::Write::write_str(self, s);
    }
}

impl fmt::Write for CappedText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.text.len() + s.len() > self.cap {
            self.over = true;
            return Err(fmt::Error);
        }
        self.text.push_str(s);
        Ok(())
    }
}

impl<'a> pdf_extract::ConvertToFmt for &'a mut CappedText {
    type Writer = &'a mut CappedText;
    fn convert(self) -> Self::Writer {
        self
    }
}

/// Refuses plain zlib bombs with a clear message: every `stream ... endstream` body that
/// inflates as zlib is inflated with a cap, and the total must stay under [`MAX_PDF_INFLATED`].
fn check_inflated_size(pdf: &[u8]) -> Result<(), Failed> {
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
        let budget = MAX_PDF_INFLATED - total;
        let mut decoder = flate2::read::ZlibDecoder::new(&body[..end]).take(budget + 1);
        total += std::io::copy(&mut decoder, &mut std::io::sink()).unwrap_or(0);
        if total > MAX_PDF_INFLATED {
            return Err(failed(format!(
                "the PDF inflates to more than {} MB (a decompression bomb?)",
                MAX_PDF_INFLATED / (1024 * 1024)
            )));
        }
        rest = &body[end..];
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Trims trailing spaces, collapses runs of blank lines, and drops control characters.
pub fn normalise(text: &str) -> String {
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
    use std::io::Write;

    const LIMITS: Limits = Limits {
        max_text_chars: 1_000_000,
        max_pages: 100,
        max_decoded_bytes: 1_000_000,
    };

    fn parse_as(kind: Kind, bytes: &[u8]) -> Result<Parsed, Failed> {
        parse(kind, Encoding::Identity, bytes.to_vec(), &LIMITS)
    }

    #[test]
    fn markdown_and_html_lose_their_markup() {
        let md = parse_as(Kind::Markdown, b"# Title\n\nSome *bold* text.\n\n- item").unwrap();
        assert_eq!(md.text, "Title\nSome bold text.\nitem");
        let html = parse_as(
            Kind::Html,
            b"<html><body><h1>Hi</h1><p>there <b>you</b></p><script>x()</script></body></html>",
        )
        .unwrap();
        assert!(
            html.text.contains("Hi") && html.text.contains("there you"),
            "{}",
            html.text
        );
    }

    #[test]
    fn a_pdf_that_inflates_to_hundreds_of_megabytes_is_refused_before_parsing() {
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..300 {
            encoder.write_all(&zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        let mut pdf = b"%PDF-1.7\n1 0 obj << /Filter /FlateDecode /Length 1 >>\nstream\n".to_vec();
        pdf.extend_from_slice(&bomb);
        pdf.extend_from_slice(b"\nendstream\nendobj\n%%EOF");
        let error = parse_as(Kind::Pdf, &pdf).unwrap_err();
        assert!(error.0.contains("decompression bomb"), "{error}");
    }

    #[test]
    fn compressed_bodies_inflate_within_their_limit_and_are_sniffed() {
        let gzip = |data: &[u8]| {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            encoder.write_all(data).unwrap();
            encoder.finish().unwrap()
        };
        let html = parse(
            Kind::Fetched { html: true },
            Encoding::Gzip,
            gzip(b"<p>hello <i>there</i></p>"),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(html.text, "hello there");
        let bomb = gzip(&vec![b'a'; 2_000_000]);
        let error =
            parse(Kind::Fetched { html: false }, Encoding::Gzip, bomb, &LIMITS).unwrap_err();
        assert!(
            error.0.contains("inflates to more than 1000000 bytes"),
            "{error}"
        );
        let garbage = parse(Kind::Text, Encoding::Deflate, b"not zlib".to_vec(), &LIMITS);
        assert!(garbage.unwrap_err().0.contains("could not be decompressed"));
    }

    #[test]
    fn text_over_its_cap_is_refused_naming_the_key() {
        let limits = Limits {
            max_text_chars: 10,
            ..LIMITS
        };
        let error = parse(
            Kind::Text,
            Encoding::Identity,
            b"eleven chars".to_vec(),
            &limits,
        )
        .unwrap_err();
        assert!(
            error
                .0
                .contains("12 characters, over the limit of 10 (max_text_chars)"),
            "{error}"
        );
        let markdown = "word ".repeat(100);
        let error = parse(
            Kind::Markdown,
            Encoding::Identity,
            markdown.into_bytes(),
            &limits,
        )
        .unwrap_err();
        assert!(error.0.contains("max_text_chars"), "{error}");
    }

    #[test]
    fn empty_and_non_pdf_documents_fail() {
        assert!(parse_as(Kind::Text, b" \n\t\n ")
            .unwrap_err()
            .0
            .contains("no text"));
        assert!(
            parse_as(Kind::Html, b"<html><body><img src=x></body></html>")
                .unwrap_err()
                .0
                .contains("no text")
        );
        assert!(parse_as(Kind::Pdf, b"hello")
            .unwrap_err()
            .0
            .contains("not a PDF"));
        let broken =
            parse_as(Kind::Pdf, b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage").unwrap_err();
        assert!(broken.0.contains("PDF"), "{broken}");
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// Arbitrary bytes as any document kind: a text or a failure, never a panic.
            #[test]
            fn arbitrary_documents_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), kind in 0u8..4) {
                let (kind, bytes) = match kind {
                    0 => (Kind::Text, bytes),
                    1 => (Kind::Markdown, bytes),
                    2 => (Kind::Html, bytes),
                    _ => (Kind::Pdf, [b"%PDF-1.4\n".as_slice(), &bytes].concat()),
                };
                if let Ok(parsed) = parse(kind, Encoding::Identity, bytes, &LIMITS) {
                    prop_assert!(!parsed.text.is_empty());
                }
            }
        }
    }
}
