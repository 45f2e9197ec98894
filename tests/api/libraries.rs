//! Which shared libraries each binary maps, read from `/proc/PID/maps` of the running process:
//! the commands that run no model map no libtorch at all (and need no `runpod-worker-torch`
//! beside them), and a CPU host maps libtorch's CPU library but none of the CUDA ones.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::helpers::{BIN, ECHO_CONFIG};
use crate::local_process::{lines_of, listening_address, LocalProcess};

/// The file names of the shared libraries process `pid` has mapped.
fn mapped_libraries(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut names: Vec<String> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.contains(".so"))
        .filter_map(|path| Path::new(path).file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// `runpod-worker` copied alone into a directory: no `runpod-worker-torch` beside it.
fn lone_front_binary() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("runpod-worker");
    std::fs::copy(BIN, &copy).unwrap();
    (dir, copy)
}

#[test]
fn commands_that_run_no_model_need_no_libtorch_and_map_none() {
    let (_dir, front) = lone_front_binary();
    let run = |args: &[&str]| Command::new(&front).args(args).output().unwrap();

    let version = run(&["--version"]);
    assert!(version.status.success(), "{version:?}");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("runpod-worker "));

    let plan = run(&[
        "check-config",
        "--config",
        ECHO_CONFIG,
        "--gpu-memory",
        "24GB",
    ]);
    let plan_out = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.status.success(), "{plan:?}");
    assert!(
        plan_out.contains("config OK") && plan_out.contains("24"),
        "{plan_out}"
    );

    // Nothing listens on port 9 here: the probe itself runs and says so.
    let probe = run(&["health", "--url", "http://127.0.0.1:9/ready"]);
    let probe_err = String::from_utf8_lossy(&probe.stderr);
    assert_eq!(probe.status.code(), Some(1), "{probe:?}");
    assert!(probe_err.contains("no answer"), "{probe_err}");

    // A command that runs models needs the other binary, and says which.
    let model = run(&["test-input", "--json", "{}"]);
    let model_err = String::from_utf8_lossy(&model.stderr);
    assert_eq!(model.status.code(), Some(1), "{model:?}");
    assert!(model_err.contains("runpod-worker-torch"), "{model_err}");

    let mut mock = Command::new(&front)
        .args(["mock-queue", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = lines_of(mock.stdout.take().unwrap());
    let _listening = listening_address(&stdout);
    let libraries = mapped_libraries(mock.id());
    let _ = mock.kill();
    let _ = mock.wait();
    assert!(
        libraries.iter().any(|name| name.starts_with("libc.so")),
        "maps were read: {libraries:?}"
    );
    assert!(
        !libraries
            .iter()
            .any(|name| name.contains("torch") || name.contains("c10")),
        "mock-queue maps libtorch: {libraries:?}"
    );
}

#[test]
fn a_cpu_host_maps_libtorch_cpu_and_no_cuda_library() {
    let local = LocalProcess::start(Path::new(ECHO_CONFIG), "key-libraries", &[]);
    let libraries = mapped_libraries(local.pid());
    assert!(
        libraries.iter().any(|name| name == "libtorch_cpu.so"),
        "local runs libtorch: {libraries:?}"
    );
    if libraries.iter().any(|name| name.starts_with("libcuda.so")) {
        return; // A host with an NVIDIA driver loads CUDA, as it should.
    }
    let cuda: Vec<&String> = libraries
        .iter()
        .filter(|name| {
            [
                "libtorch_cuda",
                "libc10_cuda",
                "libcublas",
                "libcudnn",
                "libnccl",
                "libcufft",
            ]
            .iter()
            .any(|cuda| name.starts_with(cuda))
        })
        .collect();
    assert!(
        cuda.is_empty(),
        "a CPU host mapped CUDA libraries: {cuda:?}"
    );
}
