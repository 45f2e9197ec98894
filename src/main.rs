//! The `runpod-worker` binary. It links no libtorch: the commands that run no model (the mock
//! queue, the health probe, a plan for another GPU, `--version`, `--help`) run here and start
//! in milliseconds; for the others it becomes `runpod-worker-torch` (exec, same arguments and
//! process), which loads libtorch.

use std::os::unix::process::CommandExt as _;

use clap::Parser;
use runpod_worker::cli::Cli;
use runpod_worker::commands;

fn main() {
    let cli = Cli::parse();
    if commands::needs_libtorch(&cli.command) {
        become_torch_binary();
    }
    commands::run_to_exit(async {
        commands::run_without_libtorch(cli.command)
            .await
            .unwrap_or(2)
    })
}

/// Replaces this process by `runpod-worker-torch` beside this executable, with the same
/// arguments; returns only to exit with the reason it could not.
fn become_torch_binary() -> ! {
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "runpod-worker".into());
    let Some(path) = torch_binary(&arg0) else {
        eprintln!(
            "runpod-worker: cannot find this executable (no /proc/self/exe, and {} is not on \
             PATH) to start {} beside it",
            arg0.to_string_lossy(),
            commands::TORCH_BINARY
        );
        std::process::exit(1);
    };
    let error = std::process::Command::new(&path)
        .arg0(arg0)
        .args(args)
        .exec();
    eprintln!(
        "runpod-worker: cannot start {} (it runs the models; install it beside runpod-worker): \
         {error}",
        path.display()
    );
    std::process::exit(1);
}

/// `runpod-worker-torch` beside this executable: found through `/proc/self/exe`, else (a
/// chroot without /proc) through how it was called, a path or a name on `PATH`.
fn torch_binary(arg0: &std::ffi::OsStr) -> Option<std::path::PathBuf> {
    if let Ok(exe) = std::env::current_exe() {
        return Some(exe.with_file_name(commands::TORCH_BINARY));
    }
    let called = std::path::Path::new(arg0);
    if called.components().count() > 1 {
        return Some(called.with_file_name(commands::TORCH_BINARY));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(commands::TORCH_BINARY))
        .find(|candidate| candidate.is_file())
}
