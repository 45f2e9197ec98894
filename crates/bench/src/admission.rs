//! The cost of one admission decision: the memory check (ledger plus live measured memory from
//! the latest sample) with its reservation and release, and the take-sizing decision.

use std::sync::Arc;
use std::time::Instant;

use super::percentile;
use worker::admission::{HostLedger, Limits, MemoryAdmission};
use worker::config::Config;
use worker::gpu::sampler::GpuSampler;
use worker::gpu::SimulatedProbe;
use worker::handlers::HandlerSet;

const ROUNDS: usize = 200_000;

fn measure(rounds: usize, mut decide: impl FnMut()) -> (u64, u64) {
    let mut ns = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        decide();
        ns.push(start.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    (percentile(&ns, 50.0), percentile(&ns, 99.0))
}

fn memory_admission(host_dir: Option<&std::path::Path>) -> MemoryAdmission {
    let mut config = Config::default();
    config.gpu.simulate = Some("24GB".parse().expect("a valid size"));
    config.gpu.host_ledger_dir = host_dir.map(std::path::Path::to_path_buf);
    // Admission does not care what the handlers compute: echo stands in for the models.
    for table in config.handlers.values_mut() {
        table.kind = Some("echo".into());
    }
    let handlers = HandlerSet::build(&config, true, true).expect("echo handlers need no files");
    let probe = Arc::new(SimulatedProbe::new(
        config.gpu.simulate.unwrap_or_default(),
        1,
        None,
    ));
    MemoryAdmission::new(
        &config.gpu,
        &handlers,
        GpuSampler::new(probe),
        Default::default(),
    )
    .expect("ledger opens")
}

/// Runs the measurements and returns the report.
pub fn run() -> String {
    let mut report = String::from("Admission decision cost (simulated 24 GB GPU, classify 6 GB)\n");
    let memory = memory_admission(None);
    let need = memory.need("classify").unwrap_or(0);
    let (p50, p99) = measure(ROUNDS, || {
        let reservation = memory.try_admit("classify", need);
        drop(reservation);
    });
    report += &format!(
        "  memory admission (ledger + measured memory) + release: p50 {p50} ns, p99 {p99} ns \
         ({:.0}x under the 10 µs target at p99)\n",
        10_000.0 / p99.max(1) as f64
    );

    let limits = Limits::new(4, [("extract".to_owned(), 4), ("classify".to_owned(), 1)]);
    let (p50, p99) = measure(ROUNDS, || {
        std::hint::black_box(limits.takeable_with(|h, slots| memory.startable(h, slots)));
    });
    report +=
        &format!("  take sizing (slots and memory of every handler): p50 {p50} ns, p99 {p99} ns\n");

    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("runpod-worker-bench-{}", std::process::id()));
    if HostLedger::open(&dir, "GPU-simulated-0").is_ok() {
        let shared = memory_admission(Some(&dir));
        let (p50, p99) = measure(ROUNDS / 20, || {
            let reservation = shared.try_admit("classify", need);
            drop(reservation);
        });
        report += &format!(
            "  with the host-wide ledger ({}, file lock + read + write, twice): p50 {p50} ns, p99 {p99} ns\n",
            base.display()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    report += "  (NVML memory_info is 6.7 µs a call on an H200: it is sampled off the job path)\n";
    report
}
