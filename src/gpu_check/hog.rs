//! Another process that takes GPU memory: `runpod-worker gpu-check --hog-bytes N` allocates N
//! bytes on a device, says `ready`, and holds them until its stdin closes. The pressure check
//! runs it beside a worker.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The hog's side: allocates, announces, holds until stdin closes. Exit code 1 if the memory
/// cannot be had.
pub fn hold(bytes: u64, ordinal: usize) -> i32 {
    let Ok(elements) = i64::try_from(bytes) else {
        eprintln!("hog: {bytes} bytes is too many");
        return 1;
    };
    let options = (tch::Kind::Uint8, tch::Device::Cuda(ordinal));
    let block = match tch::Tensor::f_ones([elements], options) {
        Ok(block) => block,
        Err(e) => {
            eprintln!("hog: cannot take {bytes} bytes on GPU {ordinal}: {e}");
            return 1;
        }
    };
    println!("ready");
    // Until the parent closes our stdin (or dies).
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    drop(block);
    0
}

/// A running hog.
pub(super) struct Hog {
    child: Child,
}

/// Starts a hog of `bytes` on GPU `ordinal` and waits until it holds them.
pub(super) async fn spawn(bytes: u64, ordinal: usize) -> Result<Hog, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut child = Command::new(exe)
        .args(["gpu-check", "--hog-bytes", &bytes.to_string()])
        .args(["--hog-device", &ordinal.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the memory hog: {e}"))?;
    let stdout = child.stdout.take().ok_or("the hog has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    match lines.next_line().await {
        Ok(Some(line)) if line.trim() == "ready" => Ok(Hog { child }),
        _ => Err("the memory hog could not take its memory".to_owned()),
    }
}

impl Hog {
    /// Lets the hog go and waits for it to exit.
    pub(super) async fn release(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait().await;
    }
}
