//! `gpu-check`: loads the configuration and runs the checks (or, internally, the memory hog
//! that the pressure check starts).

use std::path::PathBuf;

use crate::gpu_check::{self, hog, GpuCheckOptions};
use worker::config::{Config, Size};

/// The arguments of `gpu-check`.
#[derive(Debug)]
pub struct GpuCheckArgs {
    /// Config file.
    pub config: Option<PathBuf>,
    /// Model directory override.
    pub models: Option<PathBuf>,
    /// A simulated GPU size instead of the real card.
    pub simulate: Option<String>,
    /// Python with torch.
    pub python: PathBuf,
    /// Internal: run as the memory hog.
    pub hog_bytes: Option<u64>,
    /// Internal: the hog's GPU.
    pub hog_device: usize,
}

/// Runs the checks; exit code 1 if any failed.
pub async fn gpu_check(args: GpuCheckArgs) -> i32 {
    if let Some(bytes) = args.hog_bytes {
        let device = args.hog_device;
        return tokio::task::spawn_blocking(move || hog::hold(bytes, device))
            .await
            .unwrap_or(1);
    }
    let (mut config, _) = match Config::load(args.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let Some(models) = args.models {
        config.handler.model_dir = models;
    }
    let simulate = match args.simulate.as_deref().map(str::parse::<Size>) {
        None => None,
        Some(Ok(size)) => Some(size),
        Some(Err(e)) => {
            eprintln!("--simulate: {e}");
            return 1;
        }
    };
    gpu_check::run(GpuCheckOptions {
        config,
        simulate,
        python: Some(args.python),
    })
    .await
}
