//! What each subcommand does. Each returns the process exit code.

mod check_config;
mod gpu_check;
mod health;
mod local;
mod mock;
mod serve;
mod test_input;

pub use check_config::{capacity_plan, check_config, PlannedGpu};
pub use gpu_check::{gpu_check, GpuCheckArgs};
pub use health::{health, ready_url};
pub use local::{
    local, local_mock_options, run_local, LocalArgs, LocalError, LocalSetup, LOCAL_ENDPOINT,
};
pub use mock::{mock_queue, parse_fault, JobRules, MockQueueArgs};
pub use serve::serve;
pub use test_input::test_input;

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
            eprintln!("unknown benchmark {other:?}: admission, schedule, models, batching, compare or all");
            return 2;
        }
    }
    0
}
