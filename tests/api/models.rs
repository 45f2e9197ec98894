//! The libtorch handlers on the real MiniLM model (exported by `make models`): embeddings that
//! match a Python reference, zero-shot classification, chunking, the generic TorchScript
//! handler, and every bad document answered with `InvalidInput`.

use std::path::Path;
use std::process::{Command, Stdio};

use axum::routing::get;
use serde_json::json;
use worker::config::{Config, DeviceChoice, HandlerConfig};
use worker::model::{BatchLimits, Encoder, Ticket};

use crate::helpers::{test_config, TestWorker};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn models_dir() -> std::path::PathBuf {
    Path::new(ROOT).join("handler/models")
}

fn model_config() -> Config {
    let mut config = test_config();
    config.handler.model_dir = models_dir();
    config.handler.max_concurrency = 8;
    let table = |kind: &str, limit: u32| HandlerConfig {
        kind: Some(kind.into()),
        max_concurrency: limit,
        device: DeviceChoice::Cpu,
        ..HandlerConfig::default()
    };
    config.handlers.insert(
        "extract".into(),
        HandlerConfig {
            allow_private_urls: Some(true),
            max_document_size: Some("100KB".parse().unwrap()),
            chunk_tokens: Some(64),
            overlap: Some(8),
            ..table("extract", 4)
        },
    );
    config.handlers.insert("strict".into(), table("extract", 1));
    config
        .handlers
        .insert("classify".into(), table("classify", 2));
    config.handlers.insert(
        "lin".into(),
        HandlerConfig {
            model: Some("example_linear.pt".into()),
            inputs: Some(vec!["x".into()]),
            ..table("torchscript", 2)
        },
    );
    config
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The encoder on the CPU, its batcher bounded by `max_rows` and waiting `delay_us` for rows.
fn cpu_encoder(max_rows: usize, delay_us: u64) -> Encoder {
    let limits = BatchLimits {
        max_rows,
        max_tokens: 16_384,
        max_delay: std::time::Duration::from_micros(delay_us),
    };
    Encoder::load(&models_dir(), tch::Device::Cpu, limits).expect("make models has run")
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// Many jobs embed at once through one batcher: each text of very different length gets what
/// it gets alone (cosine ≥ 0.9999, the embeddings are unit vectors), and the nearest of the
/// texts' lone embeddings is its own, so no job received a row computed from another's input.
#[test]
fn batched_embeddings_equal_each_text_alone_and_no_job_gets_another_jobs_row() {
    let texts: Vec<String> = (0..24)
        .map(|i| {
            let topic = [
                "invoices",
                "recipes",
                "poems",
                "contracts",
                "weather",
                "football",
            ][i % 6];
            format!("Document {i} is about {topic}. ")
                + &"More words about it follow. ".repeat(i * i / 3)
        })
        .collect();
    let alone = cpu_encoder(1, 0);
    let reference: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            alone
                .embed(std::slice::from_ref(t), &Ticket::unbounded())
                .unwrap()
                .remove(0)
        })
        .collect();
    assert!(alone.batcher().report().mean_rows <= 1.0);

    let batched = std::sync::Arc::new(cpu_encoder(64, 20_000));
    let jobs: Vec<_> = texts
        .iter()
        .cloned()
        .map(|text| {
            let encoder = batched.clone();
            std::thread::spawn(move || {
                encoder
                    .embed(&[text], &Ticket::unbounded())
                    .unwrap()
                    .remove(0)
            })
        })
        .collect();
    let ours: Vec<Vec<f32>> = jobs.into_iter().map(|j| j.join().unwrap()).collect();
    let report = batched.batcher().report();
    assert!(report.mean_rows > 1.0, "the jobs shared passes: {report:?}");
    for (i, embedding) in ours.iter().enumerate() {
        let own = dot(embedding, &reference[i]);
        assert!(
            own >= 0.9999,
            "text {i}: cosine {own} with its lone embedding"
        );
        let nearest = (0..texts.len())
            .max_by(|&a, &b| {
                dot(embedding, &reference[a]).total_cmp(&dot(embedding, &reference[b]))
            })
            .unwrap();
        assert_eq!(nearest, i, "text {i} got a row nearest to text {nearest}'s");
    }
}

/// Padding is exact: a short text in one pass with a 250-token one gets what it gets alone.
#[test]
fn a_short_text_padded_beside_a_long_one_embeds_as_it_does_alone() {
    use worker::model::BatchModel;
    let encoder = cpu_encoder(64, 0);
    let short = encoder
        .ids(&["A short note.".to_owned()])
        .unwrap()
        .remove(0);
    let long = encoder
        .ids(&["A much longer text, repeated. ".repeat(60)])
        .unwrap()
        .remove(0);
    assert!(long.len() > 200 && short.len() < 10);
    let module = tch::CModule::load(models_dir().join("minilm.pt")).unwrap();
    let padded = worker::model::PaddedModule::new(
        std::sync::Arc::new(module),
        tch::Device::Cpu,
        encoder.pad(),
    );
    let together = padded.forward(&[&short, &long]).unwrap();
    let short_alone = padded.forward(&[&short]).unwrap();
    let long_alone = padded.forward(&[&long]).unwrap();
    assert!(dot(&together[0], &short_alone[0]) >= 0.9999);
    assert!(dot(&together[1], &long_alone[0]) >= 0.9999);
}

#[test]
fn embeddings_match_the_python_reference() {
    let long =
        "The quick brown fox jumps over the lazy dog while the committee deliberates. ".repeat(60);
    let texts = vec![
        "Hello, world! GPU inference.".to_owned(),
        "Invoice #4471: 3 × widgets at $12.50, total due within 30 days.".to_owned(),
        "Ünïcödé naïve café — 東京の天気は晴れ 🚀 ñandú".to_owned(),
        long,
        "   \n\t  ".to_owned(),
    ];
    let encoder = cpu_encoder(64, 0);
    let ours = encoder.embed(&texts, &Ticket::unbounded()).unwrap();

    let python = Path::new(ROOT).join(".venv/bin/python");
    let mut child = Command::new(python)
        .arg(Path::new(ROOT).join("handler/reference_embed.py"))
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), &texts).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let reference: Vec<Vec<f64>> = serde_json::from_slice(&out.stdout).unwrap();

    for ((text, a), b) in texts.iter().zip(&ours).zip(&reference) {
        assert_eq!(a.len(), 384);
        let similarity = cosine(a, b);
        println!(
            "cosine(rust, python) = {similarity:.7} for {:?}",
            text.chars().take(30).collect::<String>()
        );
        assert!(similarity >= 0.9999, "{similarity} for {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_shot_classification_gets_obviously_labelled_texts_right() {
    let worker = TestWorker::start(model_config(), |h| h, 1000).await;
    let labels = json!(["invoice", "recipe", "poem", "contract", "resume"]);
    let cases = [
        ("invoice", "INVOICE No. 2024-117. Bill to: Acme Corp. Item: consulting services, 10 hours at $150. Subtotal $1,500, VAT 20%, total amount due $1,800. Payment due within 30 days."),
        ("recipe", "Preheat the oven to 180°C. Whisk two eggs with 100 g of sugar, fold in 200 g of flour and a pinch of salt, pour into a buttered tin and bake for 25 minutes."),
        ("poem", "The moon climbs slow above the silver sea, / and every wave recalls a dream of thee; / the night is soft, the stars begin to sing."),
        ("contract", "This Agreement is entered into by and between the Parties. The Contractor shall provide the services described herein, and the Client agrees to the terms, obligations and termination clauses set forth below."),
        ("resume", "Jane Doe — Senior Software Engineer. Experience: 8 years building distributed systems at Globex. Skills: Rust, Go, Kubernetes. Education: BSc Computer Science. References available on request."),
    ];
    for (i, (expected, text)) in cases.iter().enumerate() {
        let id = format!("z{i}");
        worker.enqueue(
            &id,
            json!({"task": "classify", "text": text, "labels": labels}),
        );
        let output = worker.done(&id).await.body["output"].clone();
        assert_eq!(output["label"], *expected, "{output}");
        let total: f64 = output["scores"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert_eq!(output["truncated"], false);
    }
    worker.stop().await;
}

/// Classify jobs of distinct texts (a short line to a long page) through a worker, batching on
/// and off: each job gets the same label and probabilities within 1e-4 either way, so no job
/// got a row computed from another's text; the batched worker really shared passes, and says
/// so in `/health` and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_classify_jobs_get_what_they_get_unbatched_and_only_from_their_own_text() {
    let labels = json!(["invoice", "recipe", "poem", "contract", "weather", "football"]);
    let topics = [
        "Invoice 2024-117: consulting, 10 hours at $150, total due in 30 days.",
        "Whisk two eggs with sugar, fold in the flour and bake for 25 minutes.",
        "The moon climbs slow above the silver sea, and every wave recalls a dream.",
        "The Contractor shall provide the services; the Client agrees to the terms.",
        "Rain in the morning, sunny spells later, winds from the west at 20 km/h.",
        "The striker scored twice before half time and the keeper saved a penalty.",
    ];
    let texts: Vec<String> = (0..18)
        .map(|i| format!("Job {i}. ") + &topics[i % 6].repeat(1 + (i * 5) % 17))
        .collect();
    let run = |max_rows: usize| {
        let (texts, labels) = (texts.clone(), labels.clone());
        async move {
            let mut config = model_config();
            config.batching.max_batch_rows = max_rows;
            config.handler.max_concurrency = 18;
            config.handlers.get_mut("classify").unwrap().max_concurrency = 18;
            let worker = TestWorker::start(config, |h| h, 1000).await;
            for (i, text) in texts.iter().enumerate() {
                worker.enqueue(
                    &format!("b{i}"),
                    json!({"task": "classify", "text": text, "labels": labels}),
                );
            }
            let mut outputs = Vec::new();
            for i in 0..texts.len() {
                outputs.push(worker.done(&format!("b{i}")).await.body["output"].clone());
            }
            let health = worker.health().await;
            let metrics = worker.metrics().await;
            worker.stop().await;
            (outputs, health, metrics)
        }
    };
    let (alone, health_alone, _) = run(1).await;
    let (batched, health, metrics) = run(64).await;
    let encoder = |health: &serde_json::Value| {
        health["batching"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["model"] == "all-MiniLM-L6-v2")
            .cloned()
            .unwrap()
    };
    assert_eq!(encoder(&health_alone)["mean_rows"], 1.0, "{health_alone}");
    let shared = encoder(&health);
    assert!(shared["mean_rows"].as_f64().unwrap() > 1.0, "{shared}");
    assert_eq!(shared["device"], "cpu");
    assert!(
        metrics
            .contains("runpod_worker_batch_rows_count{device=\"cpu\",model=\"all-MiniLM-L6-v2\"}"),
        "{metrics}"
    );
    for (i, (ours, reference)) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(
            ours["label"], reference["label"],
            "job {i}: {ours} vs {reference}"
        );
        assert_eq!(ours["tokens"], reference["tokens"], "job {i}");
        for (label, p) in reference["scores"].as_object().unwrap() {
            let q = ours["scores"][label].as_f64().unwrap();
            let diff = (q - p.as_f64().unwrap()).abs();
            assert!(diff <= 1e-4, "job {i}, {label}: {q} vs {p}");
        }
    }
    // The texts differ enough that a crossed row would show: no two references agree.
    for i in 0..alone.len() {
        for j in i + 1..alone.len() {
            assert_ne!(alone[i]["scores"], alone[j]["scores"], "jobs {i} and {j}");
        }
    }
}

/// A torchscript model whose first dimension is a batch (`batch = true`): jobs of 1 to 4 rows
/// in flight together each get what the unbatched handler gives them, their own rows only; a
/// job whose inputs do not fit the model fails alone, and one whose inputs disagree on their
/// rows is refused before it reaches the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_torchscript_model_answers_each_job_with_its_own_rows() {
    let mut config = model_config();
    config.handler.max_concurrency = 24;
    config.handlers.insert(
        "blin".into(),
        HandlerConfig {
            kind: Some("torchscript".into()),
            model: Some("example_linear.pt".into()),
            inputs: Some(vec!["x".into()]),
            batch: Some(true),
            max_concurrency: 12,
            ..HandlerConfig::default()
        },
    );
    let worker = TestWorker::start(config, |h| h, 1000).await;
    let x = |i: usize| {
        let rows = 1 + i % 4;
        let data: Vec<f64> = (0..rows * 4)
            .map(|k| (i * 10 + k) as f64 / 8.0 - 2.0)
            .collect();
        json!({"shape": [rows, 4], "dtype": "float32", "data": data})
    };
    for i in 0..10 {
        worker.enqueue(
            &format!("b{i}"),
            json!({"task": "blin", "inputs": {"x": x(i)}}),
        );
    }
    worker.enqueue(
        "misfit",
        json!({"task": "blin", "inputs": {"x": {"shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}}}),
    );
    for i in 0..10 {
        worker.enqueue(
            &format!("u{i}"),
            json!({"task": "lin", "inputs": {"x": x(i)}}),
        );
    }
    for i in 0..10 {
        let batched = worker.done(&format!("b{i}")).await.body;
        let alone = worker.done(&format!("u{i}")).await.body;
        assert_eq!(batched["output"], alone["output"], "job {i}");
        assert_eq!(
            batched["output"]["outputs"][0]["shape"],
            json!([1 + i % 4, 2])
        );
    }
    let misfit = worker.done("misfit").await.body["output"].clone();
    assert_eq!(misfit["error_type"], "ModelError", "{misfit}");
    let health = worker.health().await;
    let linear = health["batching"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["model"] == "example_linear.pt")
        .cloned()
        .unwrap_or_else(|| panic!("{health}"));
    assert_eq!(
        linear["rows"], 10,
        "ten jobs' inputs went through its passes: {linear}"
    );
    assert_eq!(health["handlers"]["blin"]["batched"], true);
    assert_eq!(health["handlers"]["lin"]["batched"], false);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extraction_chunks_long_text_completely_and_concurrent_jobs_match_sequential_ones() {
    let worker = TestWorker::start(model_config(), |h| h, 1000).await;
    let text = (0..120)
        .map(|i| format!("Sentence number {i} talks about topic {}.", i % 7))
        .collect::<Vec<_>>()
        .join(" ");
    worker.enqueue(
        "seq",
        json!({"task": "extract", "document": {"text": text}}),
    );
    let sequential = worker.done("seq").await.body["output"].clone();
    let chunks = sequential["chunks"].as_array().unwrap();
    assert!(
        chunks.len() > 3,
        "long text is cut, not truncated: {}",
        chunks.len()
    );
    assert!(text.starts_with(chunks[0]["text"].as_str().unwrap()));
    assert!(
        text.ends_with(chunks.last().unwrap()["text"].as_str().unwrap()),
        "the last chunk reaches the end"
    );
    assert_eq!(sequential["dims"], 384);
    assert_eq!(chunks[0]["embedding"].as_array().unwrap().len(), 384);

    for i in 0..4 {
        worker.enqueue(
            &format!("par{i}"),
            json!({"task": "extract", "document": {"text": text}}),
        );
    }
    for i in 0..4 {
        let parallel = worker.done(&format!("par{i}")).await.body["output"].clone();
        for (a, b) in parallel["chunks"].as_array().unwrap().iter().zip(chunks) {
            let (a, b) = (
                a["embedding"].as_array().unwrap(),
                b["embedding"].as_array().unwrap(),
            );
            let gap = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
                .fold(0.0, f64::max);
            assert!(gap < 1e-5, "concurrent result differs by {gap}");
        }
    }

    worker.enqueue("noembed", json!({"task": "extract", "document": {"markdown": "# Title\n\nSome *text*."}, "embed": false}));
    let output = worker.done("noembed").await.body["output"].clone();
    assert_eq!(output["text"], "Title\nSome text.");
    assert!(output["chunks"][0].get("embedding").is_none());
    worker.stop().await;
}

/// A one-page PDF saying `text`, with a correct cross-reference table.
fn pdf(text: &str) -> Vec<u8> {
    let content = format!("BT /F1 24 Tf 72 720 Td ({text}) Tj ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_owned(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned(),
    ];
    let objects: Vec<Vec<u8>> = objects.iter().map(|o| o.clone().into_bytes()).collect();
    crate::helpers::pdf_of(&objects)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_from_pdf_html_and_url_and_the_torchscript_handler() {
    use base64::Engine as _;
    let site = axum::Router::new()
        .route(
            "/page",
            get(|| async {
                (
                    [("content-type", "text/html")],
                    "<html><body><p>Served over HTTP.</p></body></html>",
                )
            }),
        )
        .route("/big", get(|| async { "x".repeat(200_000) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, site).await });
    let worker = TestWorker::start(model_config(), |h| h, 1000).await;

    let encoded = base64::engine::general_purpose::STANDARD.encode(pdf("Hello from a PDF"));
    worker.enqueue(
        "pdf",
        json!({"task": "extract", "document": {"pdf_base64": encoded}}),
    );
    let output = worker.done("pdf").await.body["output"].clone();
    assert!(
        output["text"]
            .as_str()
            .unwrap()
            .contains("Hello from a PDF"),
        "{output}"
    );
    assert_eq!(output["pages"], 1);

    worker.enqueue(
        "url",
        json!({"task": "extract", "document": {"url": format!("{base}/page")}}),
    );
    assert_eq!(
        worker.done("url").await.body["output"]["text"],
        "Served over HTTP."
    );

    worker.enqueue("lin", json!({"task": "lin", "inputs": {"x": {"shape": [2, 4], "dtype": "float32", "data": [1, 0, 0, 0, 0, 1, 2, 3]}}}));
    let output = worker.done("lin").await.body["output"].clone();
    // relu(x·Wᵀ + b) with W = [[1,-1,.5,0],[0,2,-1,1]], b = [.5,-.5]
    assert_eq!(output["outputs"][0]["shape"], json!([2, 2]));
    assert_eq!(output["outputs"][0]["data"], json!([1.5, 0.0, 0.5, 2.5]));

    let long_text = "word ".repeat(600);
    worker.enqueue(
        "trunc",
        json!({"task": "classify", "text": long_text, "labels": ["a", "b"]}),
    );
    let output = worker.done("trunc").await.body["output"].clone();
    assert_eq!(
        (output["truncated"].as_bool(), output["tokens"].as_u64()),
        (Some(true), Some(256)),
        "{output}"
    );

    let bad = [
        (
            "empty",
            json!({"task": "extract", "document": {"text": "  \n "}}),
            "no text",
        ),
        (
            "b64",
            json!({"task": "extract", "document": {"pdf_base64": "%%%not base64"}}),
            "not valid base64",
        ),
        (
            "notpdf",
            json!({"task": "extract", "document": {"pdf_base64": "aGVsbG8="}}),
            "not a PDF",
        ),
        (
            "badpdf",
            json!({"task": "extract", "document": {"pdf_base64": base64::engine::general_purpose::STANDARD.encode(b"%PDF-1.7 garbage")}}),
            "PDF",
        ),
        (
            "notext",
            json!({"task": "extract", "document": {"html": "<html><body><img src=x></body></html>"}}),
            "no text",
        ),
        (
            "404",
            json!({"task": "extract", "document": {"url": format!("{base}/missing")}}),
            "answered 404",
        ),
        (
            "big",
            json!({"task": "extract", "document": {"url": format!("{base}/big")}}),
            "over the limit",
        ),
        (
            "ftp",
            json!({"task": "extract", "document": {"url": "ftp://example.com/x"}}),
            "only http and https",
        ),
        (
            "private",
            json!({"task": "strict", "document": {"url": format!("{base}/page")}}),
            "private, loopback or link-local",
        ),
        (
            "twokeys",
            json!({"task": "extract", "document": {"text": "a", "html": "b"}}),
            "exactly one",
        ),
        (
            "nolabels",
            json!({"task": "classify", "text": "hello", "labels": []}),
            "empty",
        ),
        (
            "badlabel",
            json!({"task": "classify", "text": "hello", "labels": ["a", 5]}),
            "string",
        ),
        (
            "missing",
            json!({"task": "lin", "inputs": {}}),
            "input.inputs.x is missing",
        ),
        (
            "shape",
            json!({"task": "lin", "inputs": {"x": {"shape": [3, 4], "data": [1, 2]}}}),
            "needs 12",
        ),
        (
            "wrongdim",
            json!({"task": "lin", "inputs": {"x": {"shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}}}),
            "model failed on these inputs",
        ),
    ];
    for (id, input, _) in &bad {
        worker.enqueue(id, input.clone());
    }
    for (id, _, message) in bad {
        let output = worker.done(id).await.body["output"].clone();
        let expected_type = if id == "wrongdim" {
            "ModelError"
        } else {
            "InvalidInput"
        };
        assert_eq!(output["error_type"], expected_type, "{id}: {output}");
        let text = output["error"].as_str().unwrap();
        assert!(text.contains(message), "{id}: {text}");
        assert!(
            !text.contains(ROOT) && !text.contains(".py"),
            "{id}: no paths in results: {text}"
        );
    }
    assert_eq!(worker.health().await["status"], "healthy");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_that_cannot_fit_is_refused_before_anything_is_embedded() {
    let mut config = model_config();
    config.queue.max_result_size = "100KB".parse().unwrap();
    let worker = TestWorker::start(config, |h| h, 200).await;
    // 80 KB of text: the text, its chunks and 384 numbers per chunk cannot fit in 100 KB.
    let text = "word ".repeat(16_000);
    worker.enqueue(
        "too-big",
        json!({"task": "extract", "document": {"text": text}}),
    );
    let output = worker.done("too-big").await.body["output"].clone();
    assert_eq!(output["error_type"], "OutputTooLarge", "{output}");
    let message = output["error"].as_str().unwrap();
    assert!(
        message.contains("would take at least") && message.contains("embed to false"),
        "decided from the chunk count, before the embeddings exist: {message}"
    );
    // Without embeddings the same document fits.
    worker.enqueue(
        "text-only",
        json!({"task": "extract", "embed": false, "document": {"text": "word ".repeat(2_000)}}),
    );
    let output = worker.done("text-only").await.body["output"].clone();
    assert!(
        output["chunks"].as_array().is_some_and(|c| !c.is_empty()),
        "{output}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_streams_its_chunks_under_the_message_limit_with_progress_before_the_result() {
    use mock_queue::Route;
    let mut config = model_config();
    // Too small for the whole output: streaming is what lets a large extraction through.
    config.queue.max_result_size = "100KB".parse().unwrap();
    config.handler.progress_interval_ms = 1;
    let worker = TestWorker::start(config, |h| h, 200).await;
    let ep = crate::helpers::EP;
    let text: String = (0..3_000).map(|i| format!("word{} ", i % 40)).collect();
    worker.enqueue(
        "streamed",
        json!({"task": "extract", "stream": true, "chunk_tokens": 16, "overlap": 0,
               "document": {"text": text}}),
    );
    let done = worker.done("streamed").await;
    let output = &done.body["output"];
    assert_eq!(done.is_stream.as_deref(), Some("true"));
    assert!(
        output.get("chunks").is_none() && output.get("text").is_none(),
        "{output}"
    );
    let total = output["chunks_streamed"].as_u64().expect("a summary") as usize;
    assert!(total > 100, "{output}");
    let queue = worker.mock.endpoint(ep);
    let mut indexes = Vec::new();
    for record in queue.streams.iter().filter(|s| s.job_id == "streamed") {
        let size = serde_json::to_vec(&record.body).unwrap().len();
        assert!(size <= 1_000_000, "a stream message of {size} bytes");
        for chunk in record.body["output"]["chunks"].as_array().unwrap() {
            assert_eq!(chunk["embedding"].as_array().unwrap().len(), 384);
            indexes.push(chunk["index"].as_u64().unwrap() as usize);
        }
    }
    assert_eq!(
        indexes,
        (0..total).collect::<Vec<_>>(),
        "every chunk, once, in order"
    );
    let progress: Vec<_> = queue
        .progress
        .iter()
        .filter(|p| p.job_id == "streamed")
        .collect();
    assert!(!progress.is_empty(), "a long job reports progress");
    let last = &progress.last().unwrap().body["output"];
    assert_eq!(last["chunks_total"].as_u64(), Some(total as u64));
    assert!(last["chunks_done"].as_u64().unwrap() <= total as u64);
    assert_eq!(
        worker.mock.requests(Route::Done),
        progress.len() as u64 + 1,
        "no progress update came after the result (none refused as late)"
    );

    // With the SDK's return_aggregate_stream, the final output holds what was streamed.
    let small: String = (0..60).map(|i| format!("word{} ", i % 40)).collect();
    worker.enqueue(
        "aggregated",
        json!({"task": "extract", "stream": true, "return_aggregate_stream": true,
               "chunk_tokens": 16, "overlap": 0, "document": {"text": small}}),
    );
    let output = worker.done("aggregated").await.body["output"].clone();
    let streamed: Vec<serde_json::Value> = worker
        .mock
        .endpoint(ep)
        .streams
        .into_iter()
        .filter(|s| s.job_id == "aggregated")
        .flat_map(|s| s.body["output"]["chunks"].as_array().unwrap().clone())
        .collect();
    assert_eq!(output["chunks"].as_array(), Some(&streamed), "{output}");
    assert_eq!(output["text"], small.trim_end());
    worker.stop().await;
}

#[test]
fn a_torchscript_handler_warms_up_on_its_warm_up_shapes_and_names_a_wrong_one() {
    use std::collections::BTreeMap;
    use worker::config::WarmUpInput;
    use worker::handlers::HandlerSet;
    let with_shape = |shape: Vec<i64>| {
        let mut config = model_config();
        let lin = config.handlers.get_mut("lin").unwrap();
        lin.warm_up = Some(BTreeMap::from([(
            "x".to_owned(),
            WarmUpInput { shape, dtype: None },
        )]));
        let set = HandlerSet::build(&config, false, false).expect("handlers load");
        let handler = set.get("lin").unwrap().handler.clone().unwrap();
        handler.warm_up()
    };
    // example_linear.pt is a Linear(4, 2).
    assert_eq!(with_shape(vec![1, 4]), Ok(()));
    let wrong = with_shape(vec![1, 3]).unwrap_err();
    assert!(wrong.contains("warm_up"), "{wrong}");
    // A warm_up without an entry for each input is refused with the config.
    let mut config = model_config();
    config.handlers.get_mut("lin").unwrap().warm_up = Some(BTreeMap::new());
    let refused = config.validate().unwrap_err().to_string();
    assert!(refused.contains("warm_up"), "{refused}");
}
