//! The `runpod-worker` binary: parses arguments and calls the library.

use clap::Parser;
use runpod_worker::cli::{Cli, Command};
use runpod_worker::commands;
use worker::telemetry;

fn main() {
    // Before any thread starts and before CUDA initialises: CUDA ordinals then follow the PCI
    // order NVML sees, so each card can be matched to its ordinal.
    worker::gpu::identity::prepare_cuda_environment();
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
    let code = runtime.block_on(run(Cli::parse()));
    std::process::exit(code);
}

async fn run(cli: Cli) -> i32 {
    telemetry::init(telemetry::LogFormat::from_env());
    match cli.command {
        Command::Serve { config, http_port } => commands::serve(config.as_deref(), http_port).await,
        Command::Health { config, url } => {
            commands::health(config.as_deref(), url.as_deref()).await
        }
        Command::Local {
            port,
            config,
            http_port,
            rules,
        } => {
            let args = commands::LocalArgs {
                port,
                config,
                http_port,
                rules: rules.into(),
            };
            commands::local(args).await
        }
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
            let args = commands::MockQueueArgs {
                host,
                port,
                api_key,
                long_poll_s: long_poll,
                lease_timeout_s: lease_timeout,
                max_queued,
                faults,
                rules: rules.into(),
            };
            commands::mock_queue(args).await
        }
        Command::TestInput { file, json, config } => {
            commands::test_input(&file, json.as_deref(), config.as_deref()).await
        }
        Command::Bench { which, compare } => commands::bench(&which, compare.into()),
        Command::GpuCheck {
            config,
            models,
            simulate,
            python,
            hog_bytes,
            hog_device,
        } => {
            let args = commands::GpuCheckArgs {
                config,
                models,
                simulate,
                python,
                hog_bytes,
                hog_device,
            };
            commands::gpu_check(args).await
        }
        Command::CheckConfig {
            config,
            gpu_memory,
            gpus,
        } => commands::check_config(config.as_deref(), gpu_memory.as_deref(), gpus),
    }
}
