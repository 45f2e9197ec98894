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

/// `bench`: prints the chosen benchmark reports (`compare` writes BENCHMARKS.md instead).
pub fn bench(which: &str, compare: bench::compare::CompareArgs) -> i32 {
    match which {
        "compare" => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let runtime = tokio::runtime::Handle::current();
            return tokio::task::block_in_place(|| {
                runtime.block_on(bench::compare::run(&compare, command))
            });
        }
        "admission" => print!("{}", bench::admission::run()),
        "schedule" => print!("{}", bench::schedule::run()),
        "models" => {
            let models = std::path::Path::new("handler/models");
            let python = std::path::Path::new(".venv/bin/python");
            let runtime = tokio::runtime::Handle::current();
            let report = tokio::task::block_in_place(|| {
                runtime.block_on(bench::models::run(models, python))
            });
            match report {
                Some(report) => print!("{report}"),
                None => {
                    eprintln!("run `make models` first (handler/models and .venv are needed)");
                    return 1;
                }
            }
        }
        "batching" => {
            let models = std::path::Path::new("handler/models");
            let python = std::path::Path::new(".venv/bin/python");
            let python = python.exists().then_some(python);
            let runtime = tokio::runtime::Handle::current();
            let report = tokio::task::block_in_place(|| {
                runtime.block_on(bench::batching::run(models, python))
            });
            match report {
                Some(report) => print!("{report}"),
                None => {
                    eprintln!("run `make models` first (handler/models is needed)");
                    return 1;
                }
            }
        }
        "all" => print!("{}\n{}", bench::admission::run(), bench::schedule::run()),
        other => {
            eprintln!("unknown benchmark {other:?}: admission, schedule, models, batching, compare or all");
            return 2;
        }
    }
    0
}
