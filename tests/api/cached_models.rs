//! `MODEL_NAME` through the real binaries: the platform's Hugging Face cache (through
//! `refs/main`), then the SDK's older cache, then `model_dir`, said by `check-config`; a job runs
//! from the cached snapshot; a model found nowhere stops `serve` naming every path tried. And the
//! Hub's environment overrides, as `check-config` shows them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::helpers::{spawn_mock, worker_command, BIN, EP};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const HASH: &str = "4f1c0ffee4f1c0ffee4f1c0ffee4f1c0ffee4f1c";

/// A scratch place: a config whose `model_dir` is not there unless a test makes it, and empty
/// roots for both caches.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new(handlers: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[handler]\nmodel_dir = \"model_dir\"\n[queue]\nspool_dir = \"spool\"\n{handlers}"
        );
        std::fs::write(dir.path().join("runpod.toml"), text).unwrap();
        for sub in ["hub", "sdk"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        Self { dir }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// The binary with this config, both cache roots here, `MODEL_NAME` set and the Hub's
    /// other variables cleared (the test machine's own must not count).
    fn command(&self, model: &str, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .arg("--config")
            .arg(self.path("runpod.toml"))
            .env("MODEL_NAME", model)
            .env("HF_HUB_CACHE", self.path("hub"))
            .env("RUNPOD_MODEL_CACHE", self.path("sdk"));
        for knob in worker::config::ENV_OVERRIDES {
            if knob.var != "MODEL_NAME" {
                command.env_remove(knob.var);
            }
        }
        command
    }

    /// `repo`'s revision `main` in the Hugging Face layout: the MiniLM files in
    /// `snapshots/HASH/` as symlinks (as the cache links its blobs), `refs/main` naming it.
    fn cache_in_hub(&self, repo: &str) -> PathBuf {
        let repo_dir = self
            .path("hub")
            .join(format!("models--{}", repo.replace('/', "--")));
        let snapshot = repo_dir.join("snapshots").join(HASH);
        link_models(&snapshot);
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), HASH).unwrap();
        snapshot
    }
}

/// `dir` holding the MiniLM files `make models` wrote, as symlinks.
fn link_models(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for file in ["minilm.pt", "tokenizer.json"] {
        let source = Path::new(ROOT).join("handler/models").join(file);
        std::os::unix::fs::symlink(source, dir.join(file)).unwrap();
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `models:` line of `check-config --gpu-memory` (the front binary: no libtorch).
fn models_line(scratch: &Scratch, model: &str) -> String {
    let out = scratch
        .command(model, &["check-config", "--gpu-memory", "24GB"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    stdout(&out)
        .lines()
        .find(|l| l.starts_with("models:"))
        .unwrap_or_else(|| panic!("a models line in {}", stdout(&out)))
        .to_owned()
}

#[test]
fn check_config_names_the_snapshot_refs_main_points_at_and_a_job_runs_from_it() {
    let scratch = Scratch::new("");
    let snapshot = scratch.cache_in_hub("org/minilm");
    let line = models_line(&scratch, "org/minilm");
    assert!(
        line.contains(&format!(
            "{} (org/minilm, from the Hugging Face cache)",
            snapshot.display()
        )),
        "{line}"
    );
    // `model_dir` does not exist: the classification can only come from the snapshot.
    let out = scratch
        .command(
            "org/minilm",
            &[
                "test-input",
                "--file",
                &format!("{ROOT}/handler/test_inputs/classify.json"),
            ],
        )
        .output()
        .unwrap();
    let printed = stdout(&out);
    assert!(out.status.success(), "{printed}{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    assert_eq!(result["output"]["label"], "recipe", "{result}");
}

#[test]
fn the_hugging_face_cache_comes_before_the_sdks_and_the_sdks_before_model_dir() {
    let scratch = Scratch::new("");
    let snapshot = scratch.cache_in_hub("org/minilm");
    let sdk = scratch.path("sdk/org/minilm/main");
    link_models(&sdk);
    link_models(&scratch.path("model_dir"));
    let line = models_line(&scratch, "org/minilm");
    assert!(line.contains(&snapshot.display().to_string()), "{line}");

    std::fs::remove_file(scratch.path("hub/models--org--minilm/refs/main")).unwrap();
    let line = models_line(&scratch, "org/minilm");
    assert!(
        line.starts_with(&format!("models: {} ", sdk.display()))
            && line.contains("SDK's model cache")
            && line.contains("refs/main not found"),
        "{line}"
    );

    let line = models_line(&scratch, "org/minilm:v2");
    assert!(
        line.starts_with(&format!("models: {} ", scratch.path("model_dir").display()))
            && line.contains("org/minilm/v2 (no such directory)"),
        "a revision of its own is another directory of the SDK's cache: {line}"
    );
}

#[test]
fn the_repository_make_models_lays_out_is_found_by_its_name() {
    let cache = Path::new(ROOT).join("handler/hub-cache");
    assert!(
        cache.is_dir(),
        "{} is missing: run `make models`",
        cache.display()
    );
    let scratch = Scratch::new("");
    let out = scratch
        .command(
            "runpod-worker/minilm-torchscript",
            &["check-config", "--gpu-memory", "24GB"],
        )
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    let printed = stdout(&out);
    let snapshots = cache.join("models--runpod-worker--minilm-torchscript/snapshots/");
    assert!(
        printed.contains(&format!("models: {}", snapshots.display())),
        "{printed}{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_found_nowhere_stops_serve_naming_every_path_tried() {
    let scratch = Scratch::new("[handlers.echo]\nmax_concurrency = 1\ndevice = \"cpu\"\n");
    let mock = spawn_mock(Duration::from_secs(2));
    let out = worker_command(&mock.base_url(), "uncached")
        .env("RUNPOD_WORKER_CONFIG", scratch.path("runpod.toml"))
        .env("MODEL_NAME", "org/absent")
        .env("HF_HUB_CACHE", scratch.path("hub"))
        .env("RUNPOD_MODEL_CACHE", scratch.path("sdk"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let ping = mock
        .endpoint(EP)
        .pings
        .into_iter()
        .find(|p| p.worker == "uncached")
        .expect("the unhealthy ping");
    assert_eq!(ping.query["check"], "model_load");
    let reason = &ping.query["reason"];
    for tried in [
        scratch.path("hub/models--org--absent"),
        scratch.path("sdk/org/absent/main"),
        scratch.path("model_dir"),
    ] {
        assert!(
            reason.contains(&format!("{} (no such directory)", tried.display())),
            "{} in {reason}",
            tried.display()
        );
    }
}

#[test]
fn check_config_shows_the_hubs_environment_overrides_and_names_a_bad_one() {
    let scratch = Scratch::new("[handlers.classify]\nmax_concurrency = 2\ndevice = \"cuda\"\n");
    let out = scratch
        .command("", &["check-config", "--gpu-memory", "24GB"])
        .env("RUNPOD_MAX_CONCURRENCY", "7")
        .env("RUNPOD_GPU_MEMORY_PER_REQUEST", "10GB")
        .output()
        .unwrap();
    let printed = stdout(&out);
    assert!(out.status.success(), "{printed}{}", stderr(&out));
    assert!(
        printed.contains("worker: at most 7 job(s) at once"),
        "{printed}"
    );
    let classify = printed.lines().find(|l| l.starts_with("classify")).unwrap();
    assert!(classify.contains("10GB"), "{classify}");

    let refused = scratch
        .command("", &["check-config", "--gpu-memory", "24GB"])
        .env("RUNPOD_MAX_CONCURRENCY", "0")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let error = stderr(&refused);
    assert!(
        error.contains("RUNPOD_MAX_CONCURRENCY") && error.contains("handler.max_concurrency"),
        "{error}"
    );
}
