//! What each subcommand does. Each returns the process exit code.

use crate::cli::Command;

mod check_config;
mod gpu_check;
mod health;
mod load_balancing;
mod local;
mod mock;
mod serve;
mod test_input;

pub use check_config::{capacity_plan, check_config, check_plan, PlannedGpu};
pub use gpu_check::{gpu_check, GpuCheckArgs};
pub use health::{health, ready_url};
pub use local::{
    local, local_mock_options, run_local, LocalArgs, LocalError, LocalSetup, LOCAL_ENDPOINT,
};
pub use mock::{mock_queue, parse_fault, JobRules, MockQueueArgs};
pub use serve::serve;
pub use test_input::test_input;

/// The binary that links libtorch, installed beside `runpod-worker`.
pub const TORCH_BINARY: &str = "runpod-worker-torch";

/// Whether `command` runs in the binary that links libtorch (`runpod-worker-torch`). The others
/// (the mock queue, the health probe, a plan for another GPU) run in `runpod-worker` itself,
/// which maps no libtorch: they start in milliseconds, and the image's HEALTHCHECK, run every
/// interval, costs no library loading.
pub fn needs_libtorch(command: &Command) -> bool {
    !matches!(
        command,
        Command::MockQueue { .. }
            | Command::Health { .. }
            | Command::CheckConfig {
                gpu_memory: Some(_),
                ..
            }
    )
}

/// Runs a command for which [`needs_libtorch`] is false; the others are handed back. Only what
/// this calls is linked into `runpod-worker`, so nothing here may reach a model.
pub async fn run_without_libtorch(command: Command) -> Result<i32, Command> {
    Ok(match command {
        Command::Health { config, url } => health(config.as_deref(), url.as_deref()).await,
        Command::MockQueue {
            host,
            port,
            api_key,
            long_poll,
            lease_timeout,
            max_queued,
            faults,
            rules,
        } => {
            let args = MockQueueArgs {
                host,
                port,
                api_key,
                long_poll_s: long_poll,
                lease_timeout_s: lease_timeout,
                max_queued,
                faults,
                rules: rules.into(),
            };
            mock_queue(args).await
        }
        Command::CheckConfig {
            config,
            gpu_memory: Some(gpu_memory),
            gpus,
        } => check_plan(config.as_deref(), &gpu_memory, gpus),
        other => return Err(other),
    })
}

/// Runs `work` on a multi-threaded runtime with the log set up, and exits the process with its
/// code (the `main` of both binaries).
pub fn run_to_exit(work: impl std::future::Future<Output = i32>) -> ! {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        worker::telemetry::init(worker::telemetry::LogFormat::from_env());
        work.await
    });
    std::process::exit(code);
}

/// Runs any command (in `runpod-worker-torch`).
pub async fn run(command: Command) -> i32 {
    let command = match run_without_libtorch(command).await {
        Ok(code) => return code,
        Err(command) => command,
    };
    match command {
        Command::Serve {
            config,
            load_balancing,
            ..
        } if load_balancing
            || worker::load_balancing::chosen_by(|name| std::env::var(name).ok()) =>
        {
            load_balancing::serve_requests(config.as_deref()).await
        }
        Command::Serve {
            config, http_port, ..
        } => serve(config.as_deref(), http_port).await,
        Command::Local {
            port,
            config,
            http_port,
            rules,
        } => {
            let args = LocalArgs {
                port,
                config,
                http_port,
                rules: rules.into(),
            };
            local(args).await
        }
        Command::TestInput { file, json, config } => {
            test_input(&file, json.as_deref(), config.as_deref()).await
        }
        Command::Bench { which, compare } => bench(&which, compare.into()),
        Command::GpuCheck {
            config,
            models,
            simulate,
            python,
            hog_bytes,
            hog_device,
        } => {
            let args = GpuCheckArgs {
                config,
                models,
                simulate,
                python,
                hog_bytes,
                hog_device,
            };
            gpu_check(args).await
        }
        Command::CheckConfig { config, .. } => check_config(config.as_deref()),
        // Run by `run_without_libtorch` above.
        Command::Health { .. } | Command::MockQueue { .. } => 2,
    }
}

/// Where `make models` writes the models the benchmarks run.
const MODELS: &str = "handler/models";

/// Runs `work` to its end from this synchronous command, on the current runtime.
fn on_runtime<T>(work: impl std::future::Future<Output = T>) -> T {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| runtime.block_on(work))
}

/// Prints a benchmark's report (exit 0), or says what `make models` must provide (exit 1).
fn print_report(report: Option<String>, needed: &str) -> i32 {
    match report {
        Some(report) => {
            print!("{report}");
            0
        }
        None => {
            eprintln!("run `make models` first ({needed})");
            1
        }
    }
}

/// `bench`: prints the chosen benchmark reports (`compare` writes BENCHMARKS.md instead).
pub fn bench(which: &str, compare: bench::compare::CompareArgs) -> i32 {
    match which {
        "compare" => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            return on_runtime(bench::compare::run(&compare, command));
        }
        "fastpath" => return on_runtime(bench::compare::fast_path_only(&compare)),
        "load-balancing" => return on_runtime(bench::compare::load_balancing_only()),
        "admission" => print!("{}", bench::admission::run()),
        "schedule" => print!("{}", bench::schedule::run()),
        "models" => {
            let python = std::path::Path::new(".venv/bin/python");
            let report = on_runtime(bench::models::run(MODELS.as_ref(), python));
            return print_report(report, "handler/models and .venv are needed");
        }
        "batching" => {
            let python = std::path::Path::new(".venv/bin/python");
            let python = python.exists().then_some(python);
            let report = on_runtime(bench::batching::run(MODELS.as_ref(), python));
            return print_report(report, "handler/models is needed");
        }
        "all" => print!("{}\n{}", bench::admission::run(), bench::schedule::run()),
        other => {
            eprintln!("unknown benchmark {other:?}: admission, schedule, models, batching, fastpath, load-balancing, compare or all");
            return 2;
        }
    }
    0
}
