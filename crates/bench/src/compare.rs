//! `bench compare`: parts 1–4 of the comparison in one run on one machine, then BENCHMARKS.md and
//! its plot. A part that fails is named in the report; the others still run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use super::queue::{start_mock, Queue, Setup};
use super::report::{render, Results};
use super::workers::CONCURRENCY;

/// What `bench compare` needs (the command-line flags).
#[derive(Debug, Clone)]
pub struct CompareArgs {
    /// Python with runpod==1.12.0, torch and tokenizers (the SDK worker).
    pub python: PathBuf,
    /// The exported models (minilm.pt, tokenizer.json).
    pub models: PathBuf,
    /// infinity-emb's `infinity_emb` script in its own venv.
    pub infinity: PathBuf,
    /// The sentence-transformers directory of all-MiniLM-L6-v2 that infinity serves.
    pub minilm_dir: PathBuf,
    /// BENCHMARKS.md to write.
    pub out: PathBuf,
    /// The plot to write (an SVG), beside `out` or below it.
    pub plot: PathBuf,
    /// Parts to run: workers, ceiling, cold, embeddings, batching, fastpath, load-balancing.
    pub parts: Vec<String>,
    /// A build of an earlier commit, for the fast path's side by side.
    pub baseline: Option<PathBuf>,
}

/// The machine, in words, from /proc.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {total:.0} GiB RAM, Linux {}; no GPU used (every model on the CPU). \
         A shared VM: other engineers' builds ran on the same 2 cores, so figures are noisy (see min–max)",
        kernel.trim()
    )
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// A relative path from `from`'s directory to `to` (both relative to the working directory).
fn relative(from: &Path, to: &Path) -> String {
    let base = from.parent().unwrap_or(Path::new(""));
    to.strip_prefix(base).unwrap_or(to).display().to_string()
}

/// Runs the comparison and writes the report; the exit code.
pub async fn run(args: &CompareArgs, command: String) -> i32 {
    match compare(args, command).await {
        Ok(path) => {
            eprintln!("wrote {}", path.display());
            0
        }
        Err(e) => {
            eprintln!("bench compare: {e:#}");
            1
        }
    }
}

/// The binary a user runs (`runpod-worker`, which hands the model commands to
/// `runpod-worker-torch`), so the mock queue maps no libtorch and a cold start counts the
/// hand-over.
fn front_binary() -> Result<PathBuf> {
    let this = std::env::current_exe().context("this binary")?;
    let front = this.with_file_name("runpod-worker");
    Ok(if front.exists() { front } else { this })
}

/// `bench load-balancing`: part 7 alone, printed; the exit code.
pub async fn load_balancing_only() -> i32 {
    let run = async { super::load_balancing::run(&front_binary()?).await };
    match run.await {
        Ok(table) => {
            print!("{table}");
            0
        }
        Err(e) => {
            eprintln!("bench load-balancing: {e:#}");
            1
        }
    }
}

/// `bench fastpath`: part 6 alone, printed; the exit code.
pub async fn fast_path_only(args: &CompareArgs) -> i32 {
    let run = async {
        let binary = front_binary()?;
        let scratch = tempfile::tempdir()?;
        let setup = Setup {
            binary: binary.clone(),
            python: args.python.clone(),
            models: std::fs::canonicalize(&args.models).unwrap_or_else(|_| args.models.clone()),
            scratch: scratch.path().to_path_buf(),
        };
        let (_mock, base) = start_mock(&binary)?;
        let queue = Queue::new(&base);
        super::fast_path::run(&setup, args.baseline.as_deref(), &queue).await
    };
    match run.await {
        Ok(table) => {
            print!("{table}");
            0
        }
        Err(e) => {
            eprintln!("bench fastpath: {e:#}");
            1
        }
    }
}

async fn compare(args: &CompareArgs, command: String) -> Result<PathBuf> {
    let started = Instant::now();
    let when = now_utc();
    let binary = front_binary()?;
    let scratch = tempfile::tempdir()?;
    let models = std::fs::canonicalize(&args.models)
        .with_context(|| format!("{} (run `make models`)", args.models.display()))?;
    let setup = Setup {
        binary: binary.clone(),
        python: args.python.clone(),
        models,
        scratch: scratch.path().to_path_buf(),
    };
    let (_mock, base) = start_mock(&binary)?;
    let queue = Queue::new(&base);
    let wants = |part: &str| args.parts.iter().any(|p| p == part);
    let mut results = Results {
        machine: machine(),
        command,
        plot: relative(&args.out, &args.plot),
        analysis: std::fs::read_to_string("bench/analysis.md").unwrap_or_default(),
        ..Results::default()
    };
    if wants("workers") {
        eprintln!("part 1: both workers, side by side");
        match super::workers::run(&setup, &queue).await {
            Ok(rows) => results.rows = rows,
            Err(e) => results.failures.push(format!("side by side: {e:#}")),
        }
    }
    if wants("ceiling") {
        eprintln!("part 4: the mock queue alone");
        for concurrency in CONCURRENCY {
            match super::ceiling::run(&queue, concurrency).await {
                Ok(spread) => results.ceiling.push((concurrency, spread)),
                Err(e) => results.failures.push(format!("ceiling: {e:#}")),
            }
        }
    }
    if wants("cold") {
        eprintln!("part 2: cold start");
        results.load_floor_ms = Some(super::cold_start::load_floor_ms(&binary));
        let torch = binary.with_file_name("runpod-worker-torch");
        if torch.exists() {
            results.torch_floor_ms = Some(super::cold_start::load_floor_ms(&torch));
        }
        results.mock_listen_ms = Some(super::cold_start::mock_listen_ms(&binary));
        match super::cold_start::run(&setup, &queue).await {
            Ok(cold) => results.cold = Some(cold),
            Err(e) => results.failures.push(format!("cold start: {e:#}")),
        }
    }
    if wants("embeddings") {
        eprintln!("part 3: embeddings against infinity-emb");
        let scratch = scratch.path().to_path_buf();
        match super::embeddings::run(&binary, &args.infinity, &args.minilm_dir, &scratch).await {
            Ok(embeddings) => results.embeddings = Some(embeddings),
            Err(e) => results.failures.push(format!("embeddings: {e:#}")),
        }
    }
    if wants("batching") {
        eprintln!("part 5: batching on against off, in process");
        match super::batching::run(&args.models, Some(&args.python)).await {
            Some(table) => results.batching = Some(table),
            None => results
                .failures
                .push("batching: a job failed or the models are missing".to_owned()),
        }
    }
    if wants("load-balancing") {
        eprintln!("part 7: embeddings through a load-balancing worker against the queue");
        match super::load_balancing::run(&binary).await {
            Ok(table) => results.load_balancing = Some(table),
            Err(e) => results.failures.push(format!("load balancing: {e:#}")),
        }
    }
    if wants("fastpath") {
        eprintln!("part 6: the fast path, this build against the baseline");
        match super::fast_path::run(&setup, args.baseline.as_deref(), &queue).await {
            Ok(table) => results.fast_path = Some(table),
            Err(e) => results.failures.push(format!("fast path: {e:#}")),
        }
    }
    results.when = format!("{when}, {:.0} s in all", started.elapsed().as_secs_f64());
    if !results.rows.is_empty() {
        let svg = super::plot::render(&results.rows, &results.ceiling)?;
        if let Some(dir) = args.plot.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&args.plot, svg)?;
    }
    std::fs::write(&args.out, render(&results))?;
    Ok(args.out.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_is_linked_relative_to_the_report() {
        assert_eq!(
            relative(Path::new("BENCHMARKS.md"), Path::new("docs/bench.svg")),
            "docs/bench.svg"
        );
        assert_eq!(
            relative(Path::new("out/B.md"), Path::new("out/docs/b.svg")),
            "docs/b.svg"
        );
    }
}
