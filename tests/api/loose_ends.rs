//! What a careful operator or a hostile client met at the edges of the real binary: a key set
//! with spaces around it, the bearer scheme in lower case, a heartbeat interval of 2^64 ms, and
//! a config "file" that never ends.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::helpers::{spawn_mock, worker_command, BIN, ECHO_CONFIG};
use crate::local_process::LocalProcess;

/// A config in `dir` naming the repository's models: `handler` keys beside `model_dir`, then
/// `rest` (the handler tables).
fn config_with_models(dir: &Path, handler: &str, rest: &str) -> std::path::PathBuf {
    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/handler/models");
    let config = dir.join("runpod.toml");
    std::fs::write(
        &config,
        format!("[handler]\nmodel_dir = {models:?}\n{handler}{rest}"),
    )
    .unwrap();
    config
}

/// `test-input` with `config` on `job`: its exit code and the job-done body it printed last.
fn test_input(config: &Path, job: &serde_json::Value) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(BIN)
        .args(["test-input", "--config"])
        .arg(config)
        .args(["--json", &job.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("null"),
        "no null in what it printed: {stdout}"
    );
    let done = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    (out.status.code(), done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_spaces_around_it_is_the_key_inside_and_bearer_is_case_insensitive() {
    let local = LocalProcess::start(Path::new(ECHO_CONFIG), " spaced key ", &[]);
    let runsync = format!("{}/v2/local/runsync", local.base);
    let client = reqwest::Client::new();
    for header in [
        "Bearer spaced key",
        "bearer spaced key",
        "BEARER spaced key",
    ] {
        let answer = client
            .post(&runsync)
            .header("authorization", header)
            .json(&json!({"input": {"task": "echo", "word": "in"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{header}");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["output"]["word"], "in", "{header}: {body}");
    }
    let wrong = client
        .post(&runsync)
        .header("authorization", "Bearer spaced")
        .json(&json!({"input": {"task": "echo"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_interval_past_an_hour_is_refused_at_start_naming_the_variable() {
    let mock = spawn_mock(Duration::from_secs(2));
    let out = worker_command(&mock.base_url(), "ping-overflow")
        .env("RUNPOD_PING_INTERVAL", "18446744073709551615")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("RUNPOD_PING_INTERVAL must be a number of milliseconds, at most"),
        "{stderr}"
    );
}

#[test]
fn check_config_reads_a_bounded_file_and_says_so() {
    let out = Command::new(BIN)
        .args(["check-config", "--config", "/dev/zero"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        // It read 5.5 GB in 15 s before; now it stops at the bound and says why.
        format!("{stdout}{stderr}").contains("larger than 1000000 bytes"),
        "{stdout}{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_since_on_the_console_is_a_json_400() {
    let local = LocalProcess::start(Path::new(ECHO_CONFIG), "test-key", &[]);
    for since in ["yesterday", "-1", "1e3"] {
        let answer = reqwest::get(format!(
            "{}/console/api/history?since={since}",
            local.worker()
        ))
        .await
        .unwrap();
        assert_eq!(answer.status(), 400, "{since}");
        let body: serde_json::Value = answer.json().await.expect("a JSON body");
        assert!(
            body["error"].as_str().unwrap().starts_with("since must be"),
            "{body}"
        );
    }
    let fine = reqwest::get(format!("{}/console/api/history?since=0", local.worker()))
        .await
        .unwrap();
    assert_eq!(fine.status(), 200);
}

/// Sends a request head (no body) on a fresh connection to `base`; the response's status
/// line and its body, read by hand: the server answers before any body is sent, which an HTTP
/// client would report as a broken request.
async fn answer_to_head(base: &str, head: String) -> (String, String) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.unwrap();
    (status, String::from_utf8(body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_a_json_413_before_it_is_sent_and_no_100_continue() {
    let mock = spawn_mock(Duration::from_secs(2));
    for expect in ["", "expect: 100-continue\r\n"] {
        let head = format!(
            "POST /v2/ep/run HTTP/1.1\r\nhost: x\r\nauthorization: Bearer test-key\r\n\
             content-type: application/json\r\ncontent-length: 40000000\r\n{expect}\r\n"
        );
        // Refused from its length, never told to go on, in the mock's JSON shape.
        let (status, body) = answer_to_head(&mock.base_url(), head).await;
        assert!(status.starts_with("HTTP/1.1 413"), "{expect:?}: {status:?}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        assert!(
            body["error"].as_str().unwrap().contains("larger than"),
            "{body}"
        );
    }
}

#[test]
fn runpod_tomls_example_works_once_its_table_is_uncommented() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/runpod.toml")).unwrap();
    // The table, as a user would uncomment it: every line from `# [handlers.example]` to the
    // end of its comment block loses its "# ".
    let mut lines: Vec<String> = shipped.lines().map(str::to_owned).collect();
    let start = lines
        .iter()
        .position(|l| l == "# [handlers.example]")
        .expect("runpod.toml carries the example table");
    for line in lines[start..].iter_mut() {
        match line.strip_prefix("# ") {
            Some(setting) => *line = setting.to_owned(),
            None => break,
        }
    }
    // Written elsewhere: its relative model_dir now names the repository's, by its full path.
    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/handler/models");
    let text = lines.join("\n").replace(
        "model_dir = \"handler/models\"",
        &format!("model_dir = {models:?}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runpod.toml");
    std::fs::write(&config, text).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = run(&["check-config"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("example"),
        "the example handler is planned: {text}"
    );
    let (code, text) = run(&[
        "test-input",
        "--file",
        "handler/test_inputs/example_torchscript.json",
    ]);
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn a_parser_that_does_not_answer_as_the_parser_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    for parser in ["/bin/true", "/bin/cat"] {
        let config = config_with_models(
            dir.path(),
            &format!("parser = {parser:?}\n"),
            "[handlers.extract]\nmax_concurrency = 1\ndevice = \"cpu\"\n",
        );
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{parser}: {text}");
        assert!(
            text.contains(&format!("the document parser {parser} is not working")),
            "{parser}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_route_answers_as_openai_does() {
    let config = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/runpod.toml"));
    let local = LocalProcess::start(config, "test-key", &[]);
    let openai = format!("{}/v2/local/openai/v1", local.base);
    let client = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        client
            .post(format!("{openai}{path}"))
            .header("authorization", "Bearer test-key")
            .json(&body)
            .send()
    };
    let embed = |input: serde_json::Value| {
        post(
            "/embeddings",
            json!({"model": "all-MiniLM-L6-v2", "input": input}),
        )
    };
    let answer = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        (status, response.json::<serde_json::Value>().await.unwrap())
    };

    // Token arrays are embedded as the ids they are, not decoded and tokenized again (80 copies
    // of id 1 were refused as "322 tokens"), and `usage` counts what was sent.
    let (status, body) = answer(embed(json!([vec![1; 80]])).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 80, "{body}");
    let (status, body) = answer(embed(json!([101, 102, 0, 0])).await.unwrap()).await;
    assert_eq!(
        (status, &body["usage"]["prompt_tokens"]),
        (200, &json!(4)),
        "{body}"
    );
    // `usage` leaves out the model's [CLS] and [SEP], as OpenAI's count has none.
    let (status, body) = answer(embed(json!("hello world")).await.unwrap()).await;
    assert_eq!(
        (status, &body["usage"]["prompt_tokens"]),
        (200, &json!(2)),
        "{body}"
    );

    // Each empty input names what is empty.
    for (input, says) in [
        (json!([]), "input cannot be an empty array"),
        (json!([[]]), "input cannot contain an empty token array"),
        (json!(["a", ""]), "input cannot contain an empty string"),
    ] {
        let (status, body) = answer(embed(input.clone()).await.unwrap()).await;
        assert_eq!(status, 400, "{input}: {body}");
        assert_eq!(body["error"]["message"], says, "{input}");
    }

    // A request is capped at 300,000 tokens, all inputs together, before any is embedded.
    let many = vec![vec![1000; 147]; 2048];
    let (status, body) = answer(embed(json!(many)).await.unwrap()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Requested 301056 tokens, max 300000 tokens per request"),
        "{body}"
    );

    // A route this worker does not serve is OpenAI's 404.
    let (status, body) = answer(post("/chat/completions", json!({})).await.unwrap()).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Invalid URL (/v1/chat/completions)"),
        "{body}"
    );
}

#[test]
fn gpu_check_uses_the_configs_simulated_gpu_and_says_so_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_models(
        dir.path(),
        "",
        "[gpu]\nsimulate = \"24GB\"\n[handlers.echo]\nmax_concurrency = 1\ndevice = \"cpu\"\n",
    );
    let mut child = Command::new(BIN)
        .args(["gpu-check", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = crate::local_process::lines_of(child.stdout.take().unwrap());
    // The first row after the header: the device check, which said "no GPU" before.
    let (row, seen) = crate::local_process::lines_until(&stdout, "| NVML = libtorch devices");
    let _ = child.kill();
    let _ = child.wait();
    let first = seen.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("gpu-check on a simulated 24") && first.contains("[gpu] simulate"),
        "{seen}"
    );
    let row = row.unwrap_or_else(|| panic!("no device row: {seen}"));
    assert!(!row.contains("FAIL"), "{seen}");
    assert!(!seen.contains("no GPU: NVML sees none"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_started_elsewhere_finds_its_models_and_announces_itself_once_ready() {
    // Another working directory, the repository's config by its absolute path: its
    // `model_dir = "handler/models"` is the config's directory's, not the working directory's.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["local", "--port", "0", "--http-port", "0", "--config"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/runpod.toml"))
        .current_dir(elsewhere.path())
        .env("RUNPOD_AI_API_KEY", "test-key")
        .env_remove("RUNPOD_ENDPOINT_ID")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = crate::local_process::lines_of(child.stdout.take().unwrap());
    let stderr = crate::local_process::lines_of(child.stderr.take().unwrap());
    let (curl, banner) = crate::local_process::lines_until(&stdout, "curl ");
    let worker = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("worker:"))
        .map(|url| url.trim().trim_end_matches("/health").to_owned());
    // The banner comes once the worker is ready: every address it names already answers.
    let ready = match &worker {
        Some(worker) => reqwest::get(format!("{worker}/ready")).await.ok(),
        None => None,
    };
    let _ = child.kill();
    let _ = child.wait();
    let log: Vec<String> = stderr.try_iter().collect();
    assert!(curl.is_some(), "no banner: {banner}\n{}", log.join("\n"));
    let ready = ready.expect("the worker's port answers");
    assert_eq!(ready.status(), 200, "announced before it was ready");
}

#[test]
fn a_models_nan_fails_the_job_by_name_and_never_becomes_null() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_models(
        dir.path(),
        "",
        "[handlers.classify]\nmax_concurrency = 1\ndevice = \"cpu\"\n\
         model = \"nan_logits.pt\"\nlabels = [\"spam\", \"ham\"]\n",
    );
    let job = json!({"input": {"task": "classify", "text": "win a prize now"}});
    let (code, done) = test_input(&config, &job);
    assert_eq!(code, Some(1), "an error result: {done}");
    assert_eq!(done["output"]["error_type"], "ModelError", "{done}");
    assert!(
        done["output"]["error"]
            .as_str()
            .unwrap()
            .contains("scores hold NaN"),
        "{done}"
    );
}

#[test]
fn an_output_that_cannot_fit_is_refused_after_the_first_batch_not_after_all_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_models(
        dir.path(),
        "",
        "[queue]\nmax_result_size = \"500KB\"\n\
         [handlers.extract]\nmax_concurrency = 1\ndevice = \"cpu\"\n",
    );
    // About 190 chunks of 16 tokens: their embeddings take some 800 kB of JSON, while the
    // floor before embedding (2 bytes a number) is some 150 kB, under the limit.
    let words: Vec<String> = (0..3000).map(|i| format!("word{}", i % 97)).collect();
    let job = json!({"input": {"task": "extract", "chunk_tokens": 16, "overlap": 0,
                               "document": {"text": words.join(" ")}}});
    let (code, done) = test_input(&config, &job);
    assert_eq!(code, Some(1), "{done}");
    assert_eq!(done["output"]["error_type"], "OutputTooLarge", "{done}");
    assert!(
        done["output"]["error"]
            .as_str()
            .unwrap()
            .contains("projected from the first 32"),
        "refused after one batch of 32: {done}"
    );
}

#[test]
fn an_integer_beyond_64_bits_is_refused_naming_it_not_turned_into_a_float() {
    let big = "123456789012345678901234567890";
    let out = Command::new(BIN)
        .args([
            "test-input",
            "--config",
            crate::helpers::ECHO_CONFIG,
            "--json",
        ])
        .arg(format!(r#"{{"input": {{"task": "echo", "n": {big}}}}}"#))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let done: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(done["output"]["error_type"], "InvalidInput", "{done}");
    let message = done["output"]["error"].as_str().unwrap();
    assert!(
        message.contains(big) && message.contains("as a string"),
        "{message}"
    );
    assert!(!stdout.contains("1.2345678901234568e29"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integer_beyond_64_bits_sent_to_local_reaches_the_worker_whole_and_is_refused() {
    let local = LocalProcess::start(Path::new(ECHO_CONFIG), "big-key", &[]);
    let big = "123456789012345678901234567890";
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v2/local/runsync", local.base))
        .header("Authorization", "Bearer big-key")
        .header("Content-Type", "application/json")
        .body(format!(r#"{{"input": {{"task": "echo", "n": {big}}}}}"#))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The queue kept the number as it was sent; the worker names it rather than round it.
    assert_eq!(answer["status"], "FAILED", "{answer}");
    assert_eq!(answer["output"]["error_type"], "InvalidInput", "{answer}");
    assert!(
        answer["output"]["error"].as_str().unwrap().contains(big),
        "{answer}"
    );
}
