//! What the model handlers accept and return, held to what the README says: the torchscript
//! example's real output, non-finite floats encoded rather than `null`, input names the model
//! does not take refused (at load and per job), and classify's `text`/`document` and
//! `temperature` checked.

use std::path::Path;

use serde_json::{json, Value};
use tch::{CModule, Device, Kind, Tensor};
use worker::config::{Config, DeviceChoice, HandlerConfig};
use worker::handlers::HandlerSet;

use crate::helpers::{test_config, TestWorker};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn table(kind: &str) -> HandlerConfig {
    HandlerConfig {
        kind: Some(kind.into()),
        max_concurrency: 2,
        device: DeviceChoice::Cpu,
        ..HandlerConfig::default()
    }
}

/// A worker with zero-shot `classify` and the README's `example` torchscript handler.
fn config() -> Config {
    let mut config = test_config();
    config.handler.model_dir = Path::new(ROOT).join("handler/models");
    config.handlers.insert("classify".into(), table("classify"));
    config.handlers.insert(
        "example".into(),
        HandlerConfig {
            model: Some("example_linear.pt".into()),
            inputs: Some(vec!["x".into()]),
            ..table("torchscript")
        },
    );
    config
}

/// The README's torchscript example: the job line and the output line after `→`.
fn readme_example() -> (Value, Value) {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let mut lines = readme.lines();
    let job = lines
        .find(|l| l.starts_with(r#"{"input": {"task": "example""#))
        .expect("the README shows a torchscript job");
    let output = lines
        .next()
        .and_then(|l| l.strip_prefix("→ "))
        .expect("the job is followed by its output");
    (
        serde_json::from_str(job).unwrap(),
        serde_json::from_str(output).unwrap(),
    )
}

async fn error_of(worker: &TestWorker, id: &str) -> (String, String) {
    let output = worker.done(id).await.body["output"].clone();
    (
        output["error_type"].as_str().unwrap_or_default().to_owned(),
        output["error"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_torchscript_example_returns_what_the_readme_shows() {
    let (job, shown) = readme_example();
    let worker = TestWorker::start(config(), |h| h, 1000).await;
    worker.enqueue("readme", job["input"].clone());
    let output = worker.done("readme").await.body["output"].clone();
    assert_eq!(output, shown);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torchscript_input_name_the_model_does_not_take_is_refused_by_name() {
    let worker = TestWorker::start(config(), |h| h, 1000).await;
    let x = json!({"shape": [1, 4], "data": [1, 2, 3, 4]});
    worker.enqueue(
        "extra",
        json!({"task": "example", "inputs": {"x": x, "mask": x}}),
    );
    let (error_type, message) = error_of(&worker, "extra").await;
    assert_eq!(error_type, "InvalidInput", "{message}");
    assert!(
        message.contains("input.inputs.mask is not an input") && message.contains("takes: x"),
        "{message}"
    );
    worker.stop().await;
}

#[test]
fn configured_torchscript_inputs_that_forward_does_not_declare_stop_the_start() {
    let mut config = config();
    config.handlers.remove("classify");
    config.handlers.insert(
        "example".into(),
        HandlerConfig {
            model: Some("example_linear.pt".into()),
            inputs: Some(vec!["input".into()]),
            ..table("torchscript")
        },
    );
    let error = HandlerSet::build(&config, false, false)
        .err()
        .expect("a wrong input name is a start-up error")
        .to_string();
    assert!(
        error.contains(r#"inputs = ["input"]"#) && error.contains("forward(x)"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchscript_infinities_and_nan_are_encoded_as_strings_never_null() {
    // log(x): log(0) = -inf, log(-1) = NaN, log(inf) = inf.
    let dir = tempfile::tempdir().unwrap();
    let example = Tensor::f_ones([4], (Kind::Float, Device::Cpu)).unwrap();
    let mut forward = |inputs: &[Tensor]| vec![inputs[0].log()];
    CModule::create_by_tracing("Log", "forward", &[example], &mut forward)
        .unwrap()
        .save(dir.path().join("log.pt"))
        .unwrap();
    let mut config = test_config();
    config.handler.model_dir = dir.path().to_path_buf();
    config.handlers.insert(
        "log".into(),
        HandlerConfig {
            model: Some("log.pt".into()),
            // What tch's tracer names the first argument (checked against forward at load).
            inputs: Some(vec!["argument_1".into()]),
            ..table("torchscript")
        },
    );
    let worker = TestWorker::start(config, |h| h, 1000).await;
    worker.enqueue(
        "log",
        json!({"task": "log", "inputs": {"argument_1": {"shape": [4], "data": [1, 0, -1, "Infinity"]}}}),
    );
    let output = worker.done("log").await.body["output"].clone();
    assert_eq!(
        output["outputs"][0]["data"],
        json!([0.0, "-Infinity", "NaN", "Infinity"]),
        "{output}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_refuses_text_with_a_document_and_a_temperature_out_of_range() {
    let worker = TestWorker::start(config(), |h| h, 1000).await;
    let labels = json!(["invoice", "recipe"]);
    let refused = [
        (
            "both",
            json!({"task": "classify", "text": "a", "document": {"text": "b"}, "labels": labels}),
            "not both",
        ),
        (
            "zero",
            json!({"task": "classify", "text": "a", "labels": labels, "temperature": 0}),
            "from 0.001 to 100",
        ),
        (
            "huge",
            json!({"task": "classify", "text": "a", "labels": labels, "temperature": 1000}),
            "from 0.001 to 100",
        ),
        (
            "word",
            json!({"task": "classify", "text": "a", "labels": labels, "temperature": "hot"}),
            "from 0.001 to 100",
        ),
    ];
    for (id, input, _) in &refused {
        worker.enqueue(id, input.clone());
    }
    for (id, _, expected) in refused {
        let (error_type, message) = error_of(&worker, id).await;
        assert_eq!(error_type, "InvalidInput", "{id}: {message}");
        assert!(message.contains(expected), "{id}: {message}");
    }

    // A temperature in range is used: a hotter softmax gives flatter scores.
    let text = "Preheat the oven to 180°C and bake the flour and eggs for 25 minutes.";
    let top = |output: &Value| {
        output["scores"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(0.0, f64::max)
    };
    for (id, t) in [("cold", 0.01), ("hot", 10.0)] {
        worker.enqueue(
            id,
            json!({"task": "classify", "text": text, "labels": labels, "temperature": t}),
        );
    }
    let cold = worker.done("cold").await.body["output"].clone();
    let hot = worker.done("hot").await.body["output"].clone();
    assert_eq!(
        (&cold["label"], &hot["label"]),
        (&json!("recipe"), &json!("recipe"))
    );
    assert!(top(&cold) > 0.99 && top(&hot) < 0.6, "{cold} {hot}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_refuses_a_text_beside_its_document_instead_of_ignoring_it() {
    let mut config = config();
    config.handlers.insert("extract".into(), table("extract"));
    let worker = TestWorker::start(config, |h| h, 1000).await;
    worker.enqueue(
        "both",
        json!({"task": "extract", "text": "ignored?", "document": {"text": "the document"}}),
    );
    let (error_type, message) = error_of(&worker, "both").await;
    assert_eq!(error_type, "InvalidInput", "{message}");
    assert!(message.contains("input.document.text"), "{message}");
    worker.stop().await;
}
