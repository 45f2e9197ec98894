//! The `runpod-worker` binary: parses arguments and calls the library.

use clap::Parser;
use runpod_worker::cli::{Cli, Command};
use runpod_worker::{commands, telemetry};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    telemetry::init(telemetry::LogFormat::from_env());
    let code = match cli.command {
        Command::Serve { config, http_port } => commands::serve(config.as_deref(), http_port).await,
        Command::Local {
            port,
            config,
            http_port,
        } => commands::local(port, config.as_deref(), http_port).await,
        Command::MockQueue {
            host,
            port,
            api_key,
            long_poll,
            lease_timeout,
            max_queued,
            faults,
        } => {
            let args = commands::MockQueueArgs {
                host,
                port,
                api_key,
                long_poll_s: long_poll,
                lease_timeout_s: lease_timeout,
                max_queued,
                faults,
            };
            commands::mock_queue(args).await
        }
        Command::TestInput { file, json, config } => {
            commands::test_input(&file, json.as_deref(), config.as_deref()).await
        }
        Command::Bench { which } => commands::bench(&which),
        Command::CheckConfig { config, gpu_memory } => {
            commands::check_config(config.as_deref(), gpu_memory.as_deref())
        }
    };
    std::process::exit(code);
}
