//! `runpod-worker-torch`: every command, in the binary that links libtorch (`runpod-worker`
//! becomes it for the commands that run models). It links libtorch's CPU library only and
//! loads the CUDA one at start when the host has an NVIDIA driver, so a CPU host never maps
//! the CUDA libraries.

use clap::Parser;
use runpod_worker::cli::Cli;
use runpod_worker::commands;
use worker::gpu::{cuda_runtime, identity};

fn main() {
    // Before any thread starts and before CUDA initialises: CUDA ordinals then follow the PCI
    // order NVML sees, so each card can be matched to its ordinal.
    identity::prepare_cuda_environment();
    // Before anything asks libtorch about CUDA (it caches the first answer).
    if let cuda_runtime::CudaLoad::Failed(why) = cuda_runtime::load_torch_cuda() {
        eprintln!(
            "runpod-worker: the NVIDIA driver is present but libtorch_cuda did not load: {why}"
        );
    }
    let cli = Cli::parse();
    commands::run_to_exit(commands::run(cli.command))
}
