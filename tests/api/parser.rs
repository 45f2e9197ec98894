//! The document parser's child processes, driven through `ParserPool` as the handlers drive
//! them: warm reuse, a child killed by its memory or CPU limit failing only its own document,
//! a dropped parse killing its child, and arbitrary bytes fuzzed through the real child.

use std::io::Write;
use std::time::{Duration, Instant};

use docparse::wire::{Encoding, Kind, Limits};
use worker::config::Size;
use worker::handlers::{ParseLimits, ParserPool};
use worker::outcome::ErrorType;

use crate::helpers::PARSER;

fn pool(max_memory: &str, max_cpu_s: u64, keep: usize) -> ParserPool {
    let limits = ParseLimits {
        max_memory: max_memory.parse::<Size>().unwrap(),
        max_cpu: Duration::from_secs(max_cpu_s),
        document: Limits {
            max_text_chars: 1_000_000,
            max_pages: 100,
            max_decoded_bytes: 10_000_000,
        },
    };
    ParserPool::new(PARSER.into(), limits, keep)
}

/// Running parser processes started with this memory limit (each test uses its own, so
/// tests running beside it do not count).
fn live_parsers(max_memory: &str) -> usize {
    let bytes = max_memory.parse::<Size>().unwrap().bytes().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let dir = entry.ok()?.path();
            let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let running = stat.rsplit_once(") ")?.1.split_whitespace().next()? != "Z";
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let ours = args.first()?.ends_with(b"runpod-parse") && args.contains(&bytes.as_bytes());
            Some(ours && running)
        })
        .filter(|ours| *ours)
        .count()
}

/// A PDF whose page content is deflated twice and inflates to `mb` megabytes.
fn double_flate_pdf(mb: usize) -> Vec<u8> {
    let deflate = |data: &[u8], times: usize| {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        for _ in 0..times {
            e.write_all(data).unwrap();
        }
        e.finish().unwrap()
    };
    let inner = deflate(&[b' '; 1 << 20], mb);
    let stream = deflate(&inner, 1);
    let mut content = format!(
        "<< /Length {} /Filter [/FlateDecode /FlateDecode] >>\nstream\n",
        stream.len()
    )
    .into_bytes();
    content.extend_from_slice(&stream);
    content.extend_from_slice(b"\nendstream");
    crate::helpers::pdf_of(&[
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>".to_vec(),
        content,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_child_parses_one_document_after_another() {
    let parsers = pool("256MB", 10, 1);
    let first = parsers
        .parse(
            Kind::Markdown,
            Encoding::Identity,
            b"# Hello\n\n*world*".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!((first.text.as_str(), first.pages), ("Hello\nworld", 1));
    // The per-document cost of a warm child: a pipe round trip.
    let start = Instant::now();
    for i in 0..200 {
        let text = format!("document {i}");
        let parsed = parsers
            .parse(Kind::Text, Encoding::Identity, text.clone().into_bytes())
            .await
            .unwrap();
        assert_eq!(parsed.text, text);
    }
    let in_child = start.elapsed().as_secs_f64() * 1000.0 / 200.0;
    // The same documents parsed in this process, as the worker did before the child existed.
    let start = Instant::now();
    for i in 0..200 {
        let text = format!("document {i}").into_bytes();
        let limits = *parsers.limits();
        docparse::parse::parse(Kind::Text, Encoding::Identity, text, &limits.document).unwrap();
    }
    let in_process = start.elapsed().as_secs_f64() * 1000.0 / 200.0;
    eprintln!(
        "small document: {in_child:.3} ms through a warm child, {in_process:.4} ms in process"
    );
    assert_eq!(parsers.started(), 1, "one warm child, reused");
    let failed = parsers
        .parse(Kind::Pdf, Encoding::Identity, b"not a pdf".to_vec())
        .await
        .unwrap_err();
    assert_eq!(failed.error_type, ErrorType::InvalidInput);
    assert!(failed.message.contains("not a PDF"), "{}", failed.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_over_the_memory_limit_fails_alone_naming_the_limit() {
    let parsers = pool("128MB", 30, 1);
    let error = parsers
        .parse(Kind::Pdf, Encoding::Identity, double_flate_pdf(400))
        .await
        .unwrap_err();
    assert_eq!(error.error_type, ErrorType::InvalidInput);
    assert!(
        error.message.contains("max_parse_memory"),
        "{}",
        error.message
    );
    // The next document gets a fresh child.
    let next = parsers
        .parse(
            Kind::Html,
            Encoding::Identity,
            b"<p>still <b>here</b></p>".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(next.text, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_past_its_cpu_limit_is_stopped_and_a_dropped_parse_kills_its_child() {
    let deep = format!("{}deep", "<div>".repeat(100_000)).into_bytes();
    let parsers = pool("1000000007B", 1, 2);
    let started = Instant::now();
    match parsers
        .parse(Kind::Html, Encoding::Identity, deep.clone())
        .await
    {
        Err(error) => assert!(
            error.message.contains("max_parse_cpu_s")
                || error.message.contains("nested too deeply"),
            "{}",
            error.message
        ),
        Ok(parsed) => assert!(
            started.elapsed() < Duration::from_secs(2),
            "{}",
            parsed.pages
        ),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // A job that ends (deadline, stop) drops its parse: the child goes with it.
    let parse = parsers.parse(Kind::Html, Encoding::Identity, deep);
    assert!(tokio::time::timeout(Duration::from_millis(300), parse)
        .await
        .is_err());
    // SIGKILL was sent when the parse was dropped; the process is gone within moments.
    let gone = Instant::now();
    while live_parsers("1000000007B") > 0 {
        assert!(
            gone.elapsed() < Duration::from_secs(3),
            "the dropped parse's child was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Arbitrary bytes as any document kind, through the real child: a text or an
        /// `InvalidInput`, and the child keeps answering.
        #[test]
        fn arbitrary_documents_through_the_child_are_a_text_or_invalid_input(
            bytes in prop::collection::vec(any::<u8>(), 0..2048),
            kind in 0u8..5,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let parsers = pool("256MB", 10, 1);
            let (kind, encoding, bytes) = match kind {
                0 => (Kind::Text, Encoding::Identity, bytes),
                1 => (Kind::Markdown, Encoding::Identity, bytes),
                2 => (Kind::Html, Encoding::Identity, bytes),
                3 => (Kind::Fetched { html: false }, Encoding::Gzip, bytes),
                _ => (Kind::Pdf, Encoding::Identity, [b"%PDF-1.4\n".as_slice(), &bytes].concat()),
            };
            match runtime.block_on(parsers.parse(kind, encoding, bytes)) {
                Ok(parsed) => prop_assert!(!parsed.text.is_empty()),
                Err(error) => prop_assert_eq!(error.error_type, ErrorType::InvalidInput),
            }
            let alive = runtime.block_on(parsers.parse(Kind::Text, Encoding::Identity, b"ok".to_vec()));
            prop_assert_eq!(alive.map(|d| d.text).ok(), Some("ok".to_owned()));
        }
    }
}
