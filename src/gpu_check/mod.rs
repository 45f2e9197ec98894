//! `runpod-worker gpu-check`: proves the GPU paths on the card at hand, in a few minutes, and
//! prints a table (check, figure, PASS/FAIL). Rows marked REPORTED print a figure and never
//! fail; SKIP rows cannot run here (a simulated GPU has no NVML, no CUDA, no real OOM).
//!
//! The checks drive real workers (in this process, and two `serve` child processes) against a
//! mock queue in this process: device identity, resident memory, CUDA results against the CPU,
//! a burst sized so that exactly N jobs fit, external memory pressure, a real CUDA OOM, two
//! workers sharing the card through the host-wide ledger, learned footprints and speed; last,
//! which on-demand CUDA libraries all that mapped (what a slim image may leave out).

mod batching;
mod device_checks;
mod harness;
pub mod hog;
mod libraries;
mod memory_checks;
mod peers;
mod speed;

use std::path::PathBuf;
use std::time::Instant;

use worker::config::{Config, Size};
use worker::gpu::{self, DeviceReading, GpuAccess};

/// What `gpu-check` runs with.
#[derive(Debug, Clone)]
pub struct GpuCheckOptions {
    /// The base configuration (model directory, headroom); each check derives its own.
    pub config: Config,
    /// Run on a simulated GPU of this size instead of the real one (`make test`).
    pub simulate: Option<Size>,
    /// The Python interpreter with torch, for the speed comparison (`None`: skip it).
    pub python: Option<PathBuf>,
}

/// A row's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Checked and right.
    Pass,
    /// Checked and wrong.
    Fail,
    /// A figure, not a check.
    Reported,
    /// Cannot run here.
    Skip,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Reported => "REPORTED",
            Self::Skip => "SKIP",
        }
    }

    /// Pass if `ok`, else fail.
    pub(crate) fn of(ok: bool) -> Self {
        if ok {
            Self::Pass
        } else {
            Self::Fail
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was checked.
    pub check: String,
    /// What was measured.
    pub figure: String,
    /// The verdict.
    pub verdict: Verdict,
}

/// The rows so far; each is printed as it comes, so a run cut short still shows its results.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    pub(crate) fn add(&mut self, check: &str, figure: impl Into<String>, verdict: Verdict) {
        let row = Row {
            check: check.to_owned(),
            figure: figure.into(),
            verdict,
        };
        println!("{}", format_row(&row));
        self.rows.push(row);
    }

    /// The rows.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    fn failed(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.verdict == Verdict::Fail)
            .count()
    }
}

fn format_row(row: &Row) -> String {
    format!(
        "| {:<30} | {:<8} | {} |",
        row.check,
        row.verdict.as_str(),
        row.figure
    )
}

/// What every check shares: the base config and the card under check.
pub(crate) struct Ctx {
    /// Quick pacing, the model directory, and the simulated GPU when asked.
    pub(crate) base: Config,
    pub(crate) simulated: bool,
    /// The first device (the checks use device 0).
    pub(crate) device: DeviceReading,
    pub(crate) python: Option<PathBuf>,
}

impl Ctx {
    /// Total minus headroom on the device.
    pub(crate) fn budget(&self) -> u64 {
        self.device
            .total
            .saturating_sub(self.base.gpu.headroom.bytes())
    }
}

/// The first line: which GPU the checks run on, and why.
fn checked_gpu(flag: Option<Size>, config: Option<Size>) -> String {
    match (flag, config) {
        (Some(size), _) => format!("gpu-check on a simulated {size} GPU (--simulate)"),
        (None, Some(size)) => {
            format!("gpu-check on a simulated {size} GPU (the config's [gpu] simulate)")
        }
        (None, None) => "gpu-check on this machine's GPU".to_owned(),
    }
}

/// Runs every check and prints the table; the exit code is 1 if any check failed.
pub async fn run(options: GpuCheckOptions) -> i32 {
    let started = Instant::now();
    let mut table = Table::default();
    let mut base = harness::quick(options.config);
    // `--simulate` first, else the config's `[gpu] simulate`, as `serve` reads it.
    let from_config = base.gpu.simulate;
    base.gpu.simulate = options.simulate.or(from_config);
    println!("{}", checked_gpu(options.simulate, from_config));
    base.gpu.simulate_devices = 1;
    base.gpu.host_ledger_dir = None;
    println!("| {:<30} | {:<8} | figure |", "check", "result");
    println!("|{:-<32}|{:-<10}|{:-<8}|", "", "", "");
    let Some(ctx) = prepare(base, options.python, &mut table) else {
        return finish(&table, started);
    };
    device_checks::run(&ctx, &mut table).await;
    speed::run(&ctx, &mut table).await;
    batching::run(&ctx, &mut table).await;
    memory_checks::run(&ctx, &mut table).await;
    peers::run(&ctx, &mut table).await;
    libraries::row(&ctx, &mut table);
    finish(&table, started)
}

/// Finds the card and checks that libtorch can use it; `None` (and a failed row) otherwise.
fn prepare(base: Config, python: Option<PathBuf>, table: &mut Table) -> Option<Ctx> {
    let gpu::FoundGpu {
        probe,
        devices,
        access,
    } = match gpu::find(&base.gpu) {
        Ok(found) => found,
        Err(e) => {
            table.add("GPU found and mapped", e.to_string(), Verdict::Fail);
            return None;
        }
    };
    let problem = match &access {
        GpuAccess::Cuda | GpuAccess::Simulated => None,
        GpuAccess::None => Some(
            "no GPU: NVML sees none (use --simulate 24GB to check the simulated paths)".to_owned(),
        ),
        GpuAccess::Broken(why) => Some(why.clone()),
    };
    let device = devices.first().cloned();
    match (problem, device) {
        (None, Some(device)) => {
            let simulated = probe.is_simulated();
            Some(Ctx {
                base,
                simulated,
                device,
                python,
            })
        }
        (problem, _) => {
            table.add(
                "GPU found and mapped",
                problem.unwrap_or_else(|| "no device".to_owned()),
                Verdict::Fail,
            );
            None
        }
    }
}

fn finish(table: &Table, started: Instant) -> i32 {
    let failed = table.failed();
    println!();
    println!("| {:<30} | {:<8} | figure |", "check", "result");
    println!("|{:-<32}|{:-<10}|{:-<8}|", "", "", "");
    for row in table.rows() {
        println!("{}", format_row(row));
    }
    println!(
        "\ngpu-check: {} row(s), {failed} failed, in {:.0} s",
        table.rows().len(),
        started.elapsed().as_secs_f64()
    );
    i32::from(failed > 0)
}

/// Bytes as GiB with two decimals, as `/health` writes them.
pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}
