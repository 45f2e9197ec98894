//! The console in a real browser: Debian's `chromium`, headless, driven over the DevTools
//! protocol (`headless_chrome`). `local` is started as a user starts it; the page is loaded,
//! a classify job is submitted through its form, and what the page shows is checked against
//! `/health` once the worker is idle. `make screenshot` runs the ignored test at the end, which
//! writes the README's picture of the console under load.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};
use serde_json::{json, Value};

use crate::helpers::WAIT;
use crate::local_process::LocalProcess;

const KEY: &str = "console-test-key";
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where Debian's package puts the browser (`make test` installs it when missing).
const CHROMIUM: &str = "/usr/bin/chromium";
/// Page loads, model work and a burst all fit in this.
const PAGE_WAIT: Duration = Duration::from_secs(60);

/// Picks `task` in the submit form, which fills in its sample.
fn pick_task(tab: &Tab, task: &str) {
    eval(
        tab,
        &format!(
            "(() => {{ const s = document.getElementById('submit-task'); s.value = '{task}'; \
             s.dispatchEvent(new Event('change')); return true; }})()"
        ),
    );
}

/// Starts `local` on free ports with `config`; its banner gives the console's URL first.
fn start_local(config: &Path) -> LocalProcess {
    let local = LocalProcess::start(config, KEY, &[]);
    assert!(
        local.first_line.starts_with("console: http://"),
        "the console URL comes first: {}",
        local.first_line
    );
    local
}

/// A config: a simulated 24 GB GPU, classify on it, echo on the CPU, quick polls.
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("runpod.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [handler]
            max_concurrency = 6
            model_dir = "{ROOT}/handler/models"
            [gpu]
            simulate = "24GB"
            [queue]
            empty_poll_floor_ms = 50
            backoff_initial_ms = 100
            spool_dir = "{}"
            [handlers.classify]
            max_concurrency = 1
            device = "cuda"
            [handlers.echo]
            max_concurrency = 2
            device = "cpu"
            {extra}
            "#,
            dir.join("spool").display()
        ),
    )
    .unwrap();
    config
}

/// Headless Chromium with a fresh profile in `profile`, its window `size` pixels.
fn browser(profile: &Path, size: (u32, u32)) -> Browser {
    let args: Vec<&OsStr> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
    ]
    .iter()
    .map(OsStr::new)
    .collect();
    let options = LaunchOptions {
        path: Some(CHROMIUM.into()),
        headless: true,
        sandbox: false,
        window_size: Some(size),
        user_data_dir: Some(profile.to_path_buf()),
        args,
        idle_browser_timeout: PAGE_WAIT * 4,
        ..LaunchOptions::default()
    };
    Browser::new(options).expect("chromium starts (make test installs Debian's chromium)")
}

/// The value of a JavaScript expression (JSON-encoded in the page, so any value comes back).
fn eval(tab: &Tab, expression: &str) -> Value {
    let wrapped = format!("JSON.stringify((() => {{ return {expression}; }})() ?? null)");
    let result = tab.evaluate(&wrapped, false).expect("evaluate");
    let text = result.value.and_then(|v| v.as_str().map(str::to_owned));
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Polls `expression` until it is `true`, at most [`PAGE_WAIT`].
fn wait_until(tab: &Tab, expression: &str, what: &str) {
    let deadline = Instant::now() + PAGE_WAIT;
    while eval(tab, expression) != Value::Bool(true) {
        assert!(
            Instant::now() < deadline,
            "{what}: never true: {expression}\npage: {}",
            eval(tab, "document.body.innerText.slice(0, 3000)")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn refreshes(tab: &Tab) -> u64 {
    eval(tab, "Number(document.body.dataset.refreshes)")
        .as_u64()
        .unwrap_or(0)
}

/// Waits until the page has fetched everything anew twice after this call.
fn wait_fresh(tab: &Tab) {
    let seen = refreshes(tab);
    wait_until(
        tab,
        &format!("Number(document.body.dataset.refreshes) >= {}", seen + 2),
        "two more refreshes",
    );
}

fn get_json(url: &str, key: bool) -> Value {
    get(url, key).1
}

/// A GET's status and JSON body, with the key or without.
fn get(url: &str, key: bool) -> (u16, Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut request = reqwest::Client::new().get(url);
        if key {
            request = request.bearer_auth(KEY);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    })
}

fn post_json(url: &str, body: &Value) -> Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let request = reqwest::Client::new().post(url).bearer_auth(KEY).json(body);
        request.send().await.unwrap().json().await.unwrap()
    })
}

fn screenshot(tab: &Tab, path: &Path) {
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, png).unwrap();
}

/// Where tests write their screenshots: under `target/`, never into the tree.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join("target"))
}

/// Opens the console at `url` and gives it the key through its form.
fn open_with_key(browser: &Browser, url: &str) -> std::sync::Arc<Tab> {
    let tab = browser.new_tab().unwrap();
    tab.set_default_timeout(PAGE_WAIT);
    tab.navigate_to(url)
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    wait_until(
        &tab,
        "!document.getElementById('key-form').classList.contains('hidden')",
        "the page asks for the key",
    );
    tab.wait_for_element("#key-input")
        .unwrap()
        .click()
        .unwrap()
        .type_into(KEY)
        .unwrap();
    tab.wait_for_element("#key-form button")
        .unwrap()
        .click()
        .unwrap();
    wait_until(
        &tab,
        "Number(document.body.dataset.refreshes) >= 1",
        "first refresh",
    );
    tab
}

#[test]
fn the_console_submits_a_job_and_shows_what_health_says() {
    let dir = tempfile::tempdir().unwrap();
    let local = start_local(&write_config(dir.path(), ""));
    let browser = browser(&dir.path().join("profile"), (1400, 1100));
    let tab = open_with_key(&browser, &local.console);
    assert_eq!(eval(&tab, "document.body.dataset.mode"), "local");
    assert_eq!(
        eval(&tab, "sessionStorage.getItem('runpod-console-key')"),
        KEY,
        "kept in the tab's session storage"
    );
    assert!(
        !eval(&tab, "location.href").as_str().unwrap().contains(KEY),
        "never in a URL"
    );

    // The form: pick classify, its sample is filled in; submit and wait for the result.
    wait_until(
        &tab,
        "!!document.querySelector('#submit-task option[value=classify]')",
        "classify offered",
    );
    pick_task(&tab, "classify");
    let body = eval(&tab, "document.getElementById('submit-body').value");
    assert!(
        body.as_str().unwrap().contains(r#""task": "classify""#),
        "the sample is prefilled: {body}"
    );
    tab.wait_for_element("#submit-button")
        .unwrap()
        .click()
        .unwrap();
    wait_until(
        &tab,
        "['COMPLETED', 'FAILED', 'error'].includes(document.body.dataset.submit)",
        "the submitted job ends",
    );
    let shown = eval(&tab, "document.getElementById('submit-result').textContent");
    let result: Value = serde_json::from_str(shown.as_str().unwrap()).expect("the result JSON");
    assert_eq!(result["status"], "COMPLETED", "{result}");
    assert!(result["output"]["label"].is_string(), "{result}");
    let classified = result["id"].as_str().unwrap().to_owned();

    // echo's sample streams three chunks: the form shows them beside the result.
    eval(
        &tab,
        "(() => { const s = document.getElementById('submit-task'); s.value = 'echo'; \
         s.dispatchEvent(new Event('change')); document.body.dataset.submit = ''; return true; })()",
    );
    tab.wait_for_element("#submit-button")
        .unwrap()
        .click()
        .unwrap();
    wait_until(
        &tab,
        "['COMPLETED', 'FAILED', 'error'].includes(document.body.dataset.submit)",
        "the streaming job ends",
    );
    let chunks = eval(&tab, "document.getElementById('submit-chunks').textContent");
    assert_eq!(
        chunks.as_str().unwrap().lines().count(),
        3,
        "three streamed chunks: {chunks}"
    );

    // Job content is shown as text, never as HTML.
    let hostile = "<img src=x onerror=\"document.title='pwned'\"><b id=injected>boom</b>";
    let submitted = post_json(
        &format!("{}/v2/local/runsync", local.base),
        &json!({"input": {"task": "echo", "message": hostile}}),
    );
    assert_eq!(submitted["status"], "COMPLETED", "{submitted}");
    let echoed = submitted["id"].as_str().unwrap();
    wait_until(
        &tab,
        &format!("!!document.querySelector('tr[data-job=\"{echoed}\"]')"),
        "the echo job listed",
    );
    eval(
        &tab,
        &format!("(document.querySelector('tr[data-job=\"{echoed}\"]').click(), true)"),
    );
    wait_until(
        &tab,
        "document.getElementById('detail-output').textContent.includes('<b id=injected>boom</b>')",
        "the job's output shown",
    );
    assert_eq!(
        eval(&tab, "document.getElementById('injected')"),
        Value::Null
    );
    assert_ne!(eval(&tab, "document.title"), "pwned");
    let input = eval(&tab, "document.getElementById('detail-input').textContent");
    assert!(input.as_str().unwrap().contains("\"echo\""), "{input}");

    // Once the worker is idle, the page shows what /health and the queue's /health say.
    let deadline = Instant::now() + WAIT;
    let health = loop {
        let health = get_json(&format!("{}/health", local.worker()), false);
        if health["jobs"]["in_worker"] == 0 && health["jobs"]["completed"] == 3 {
            break health;
        }
        assert!(Instant::now() < deadline, "never idle: {health}");
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_fresh(&tab);
    let page = eval(
        &tab,
        r#"(() => {
            const v = (sel, attr) => { const e = document.querySelector(sel); return e ? e.getAttribute(attr || 'data-value') : null; };
            return {
                taken: v('#w-taken'), completed: v('#w-completed'), failed: v('#w-failed'),
                classify_limit: v('tr[data-handler=classify] [data-field=active-limit]', 'data-limit'),
                classify_active: v('tr[data-handler=classify] [data-field=active-limit]', 'data-active'),
                echo_limit: v('tr[data-handler=echo] [data-field=active-limit]', 'data-limit'),
                passes: v('tr[data-batcher="all-MiniLM-L6-v2 cpu"] [data-field=batches]'),
                budget: v('#gpu-0 [data-field=budget_gb]'), resident: v('#gpu-0 [data-field=resident_gb]'),
                reserved: v('#gpu-0 [data-field=reserved_gb]'), total: v('#gpu-0 [data-field=total_gb]'),
                q_completed: v('#q-completed'), q_in_queue: v('#q-in-queue'),
                workers: document.querySelectorAll('#workers tr').length,
                classified: document.querySelector('tr[data-job="CLASSIFIED"]')?.dataset.status,
            };
        })()"#
        .replace("CLASSIFIED", &classified)
        .as_str(),
    );
    let num = |v: &Value| v.as_str().and_then(|s| s.parse::<f64>().ok());
    let expect = [
        ("taken", &health["jobs"]["taken"]),
        ("completed", &health["jobs"]["completed"]),
        ("failed", &health["jobs"]["failed"]),
        ("classify_limit", &health["handlers"]["classify"]["limit"]),
        ("classify_active", &health["handlers"]["classify"]["active"]),
        ("echo_limit", &health["handlers"]["echo"]["limit"]),
        ("passes", &health["batching"][0]["batches"]),
        ("budget", &health["gpus"][0]["budget_gb"]),
        ("resident", &health["gpus"][0]["resident_gb"]),
        ("reserved", &health["gpus"][0]["reserved_gb"]),
        ("total", &health["gpus"][0]["total_gb"]),
    ];
    for (field, want) in expect {
        assert_eq!(
            num(&page[field]),
            want.as_f64(),
            "{field}: page {page} against /health {health}"
        );
    }
    let queue = get_json(&format!("{}/v2/local/health", local.base), true);
    assert_eq!(
        num(&page["q_completed"]),
        queue["jobs"]["completed"].as_f64(),
        "{page} against {queue}"
    );
    assert_eq!(num(&page["q_in_queue"]), Some(0.0));
    assert_eq!(page["workers"], 1, "{page}");
    assert_eq!(page["classified"], "COMPLETED", "{page}");
    screenshot(&tab, &target_dir().join("console-test/local.png"));

    // The data behind the page needs the key; the worker's port has none, and no content.
    for route in [
        "jobs",
        "queue",
        "health",
        "samples",
        &format!("jobs/{echoed}"),
    ] {
        let url = format!("{}/console/api/{route}", local.base);
        assert_eq!(get(&url, false).0, 401, "{url} without the key");
    }
    let (status, worker_jobs) = get(&format!("{}/console/api/jobs", local.worker()), false);
    assert_eq!(status, 200);
    assert!(
        worker_jobs["jobs"].as_array().unwrap().len() == 3
            && !worker_jobs.to_string().contains("injected"),
        "ids, states and timings only: {worker_jobs}"
    );
    assert_eq!(
        get(
            &format!("{}/console/api/jobs/{echoed}", local.worker()),
            false
        )
        .0,
        404
    );

    // The worker's own port: the same page, read-only, without job content or a key.
    let worker_tab = browser.new_tab().unwrap();
    worker_tab.set_default_timeout(PAGE_WAIT);
    worker_tab
        .navigate_to(&format!("{}/", local.worker()))
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    wait_until(
        &worker_tab,
        &format!("!!document.querySelector('tr[data-job=\"{classified}\"]')"),
        "the worker lists its jobs",
    );
    assert_eq!(eval(&worker_tab, "document.body.dataset.mode"), "worker");
    for hidden in ["#key-form", "#submit-card", "#queue-card"] {
        assert_eq!(
            eval(
                &worker_tab,
                &format!("document.querySelector('{hidden}').offsetParent === null")
            ),
            true,
            "{hidden} is not shown on the worker's port"
        );
    }
    eval(
        &worker_tab,
        &format!("(document.querySelector('tr[data-job=\"{classified}\"]').click(), true)"),
    );
    assert_eq!(
        eval(
            &worker_tab,
            "document.getElementById('job-detail').classList.contains('hidden')"
        ),
        true,
        "no job content on the worker's port"
    );
    screenshot(&worker_tab, &target_dir().join("console-test/worker.png"));
}

/// `make screenshot`: the console under load for the README (docs/console.png): a burst on a
/// simulated 24 GB GPU that someone else also uses, so the bars fill, and a job that runs out
/// of memory, so a retry signal shows.
#[test]
#[ignore = "writes docs/console.png; run by `make screenshot`"]
fn console_screenshot_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let load = dir.path().join("gpu-load");
    std::fs::write(&load, "3GB").unwrap();
    let extra = r#"
        [handlers.render]
        kind = "echo"
        max_concurrency = 3
        device = "cuda"
        gpu_memory = "5GB"
        # Booked as the worker's resident memory on the simulated GPU, so the bar shows it.
        model_memory = "1.5GB"
        "#;
    let config = write_config(dir.path(), extra);
    // The load file is a [gpu] key: add it there.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "simulate = \"24GB\"",
        &format!(
            "simulate = \"24GB\"\n            external_load_file = \"{}\"",
            load.display()
        ),
    );
    std::fs::write(&config, text).unwrap();
    let local = start_local(&config);
    let browser = browser(&dir.path().join("profile"), (1400, 1300));
    let tab = open_with_key(&browser, &local.console);
    let run = format!("{}/v2/local/run", local.base);

    // A few finished jobs first, then the burst.
    for text in [
        "An invoice for 3 hours of consulting",
        "Preheat the oven to 180°C",
    ] {
        post_json(
            &format!("{}/v2/local/runsync", local.base),
            &json!({"input": {"task": "classify", "text": text, "labels": ["invoice", "recipe", "poem"]}}),
        );
    }
    post_json(
        &run,
        &json!({"input": {"task": "render", "fail": "oom", "sleep_ms": 300}}),
    );
    for i in 0..9 {
        post_json(
            &run,
            &json!({"input": {"task": "render", "sleep_ms": 6000, "gpu_peak_mb": 4000 + i * 100}}),
        );
    }
    post_json(
        &run,
        &json!({"input": {"task": "echo", "message": "hello", "stream": 3}}),
    );
    // Let the chart gather a few seconds of the burst, with jobs running and waiting.
    wait_until(
        &tab,
        "Number(document.querySelector('#gpu-0 [data-field=reserved_gb]')?.dataset.value) > 9 \
         && !!document.querySelector('tr[data-status=FAILED]') \
         && Number(document.getElementById('q-in-queue')?.dataset.value) > 0",
        "the burst shows",
    );
    let from = refreshes(&tab);
    wait_until(
        &tab,
        &format!("Number(document.body.dataset.refreshes) >= {}", from + 6),
        "a few seconds of chart",
    );
    // Show a failed job's detail, as a developer would click it.
    eval(
        &tab,
        "(document.querySelector('tr[data-status=FAILED]').click(), true)",
    );
    wait_until(
        &tab,
        "document.getElementById('detail-output').textContent.includes('InsufficientGPUMemory')",
        "the retry signal's detail",
    );
    pick_task(&tab, "classify");
    screenshot(&tab, &Path::new(ROOT).join("docs/console.png"));
    screenshot(&tab, &target_dir().join("console-test/under-load.png"));
}
