//! Part 6: the per-job fast path. Echo jobs from a pre-loaded queue at concurrency 1 and 16,
//! this build against a baseline build (a binary of an earlier commit, `--baseline`) measured
//! alternately in the same run, so the machine's noise falls on both; the bare queue's own
//! ceiling in the same run; and submit-to-result latency at a low, steady load. The worker's
//! CPU time per job is read from /proc for its whole process tree.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use super::queue::{start_worker, Proc, Queue, Setup, Worker};
use super::stats::Spread;
use super::workers::{latency_run, run_all, throughput_run};

/// Longest one throughput run may take (past it the worker has died or hung).
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Repetitions, alternating the builds.
const REPS: usize = 5;
/// Echo jobs per throughput run, per slot.
const JOBS_PER_SLOT: [(usize, usize); 2] = [(1, 1500), (16, 250)];
/// The low, steady load of the latency runs (jobs/s), and how many jobs (p99 of 300 is the
/// 4th-slowest).
const LOW_LOAD: f64 = 50.0;
const LATENCY_JOBS: usize = 300;

/// One build's figures at one concurrency.
#[derive(Debug, Clone, Default)]
struct Figures {
    jobs_s: Spread,
    cpu_ms: Spread,
}

struct Build {
    name: &'static str,
    binary: PathBuf,
}

/// Runs the part; the markdown table (and what it compared), or why not.
pub async fn run(setup: &Setup, baseline: Option<&Path>, queue: &Queue) -> Result<String> {
    let mut builds = vec![Build {
        name: "this build",
        binary: setup.binary.clone(),
    }];
    if let Some(baseline) = baseline {
        builds.push(Build {
            name: "baseline",
            binary: baseline.to_path_buf(),
        });
    }
    let echo = json!({"task": "echo", "n": 1});
    let mut rows: Vec<(usize, Vec<Figures>)> = Vec::new();
    let mut latency: Vec<(Spread, Spread)> = Vec::new();
    for (concurrency, per_slot) in JOBS_PER_SLOT {
        let mut running: Vec<(String, Proc)> = Vec::new();
        for build in &builds {
            let endpoint = format!("fast-{}-c{concurrency}", build.name.replace(' ', "-"));
            let setup = Setup {
                binary: build.binary.clone(),
                ..setup.clone()
            };
            let proc = start_worker(&setup, Worker::Ours, queue.base(), &endpoint, concurrency)?;
            run_all(queue, &endpoint, &echo, 2 * concurrency).await?;
            running.push((endpoint, proc));
        }
        let jobs = per_slot * concurrency;
        let mut per_s = vec![Vec::new(); builds.len()];
        let mut cpu = vec![Vec::new(); builds.len()];
        for rep in 0..REPS {
            eprintln!("  fast path c={concurrency} rep {}", rep + 1);
            for (i, (endpoint, proc)) in running.iter().enumerate() {
                let run = throughput_run(queue, endpoint, proc, &echo, jobs, concurrency);
                let (p, _, c) = tokio::time::timeout(RUN_LIMIT, run)
                    .await
                    .map_err(|_| anyhow::anyhow!("{endpoint}: stalled"))??;
                per_s[i].push(p);
                cpu[i].push(c);
            }
        }
        rows.push((
            concurrency,
            (0..builds.len())
                .map(|i| Figures {
                    jobs_s: Spread::of(&per_s[i]),
                    cpu_ms: Spread::of(&cpu[i]),
                })
                .collect(),
        ));
        if concurrency == 16 {
            for (endpoint, _) in &running {
                let (mut p50, mut p99) = (Vec::new(), Vec::new());
                for _ in 0..3 {
                    let (a, b) =
                        latency_run(queue, endpoint, &echo, LATENCY_JOBS, LOW_LOAD).await?;
                    p50.push(a);
                    p99.push(b);
                }
                latency.push((Spread::of(&p50), Spread::of(&p99)));
            }
        }
    }
    eprintln!("  fast path: the queue's own ceiling at 16");
    let ceiling = super::ceiling::run(queue, 16).await?;
    Ok(render(&builds, &rows, &latency, &ceiling))
}

fn render(
    builds: &[Build],
    rows: &[(usize, Vec<Figures>)],
    latency: &[(Spread, Spread)],
    ceiling: &Spread,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let names: Vec<&str> = builds.iter().map(|b| b.name).collect();
    let _ = writeln!(
        out,
        "| echo, pre-loaded queue | {} |{}",
        names.join(" | "),
        if builds.len() > 1 {
            " this build / baseline |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "|---|{}{}",
        "---|".repeat(builds.len()),
        if builds.len() > 1 { "---|" } else { "" }
    );
    let ratio = |figures: &[Figures], value: fn(&Figures) -> f64| -> String {
        match figures {
            [this, baseline] if value(baseline) > 0.0 => {
                format!(" {:.2}x |", value(this) / value(baseline))
            }
            _ => String::new(),
        }
    };
    for (concurrency, figures) in rows {
        let cells: Vec<String> = figures
            .iter()
            .map(|f| super::report::spread(&f.jobs_s, 0))
            .collect();
        let _ = writeln!(
            out,
            "| jobs/s at concurrency {concurrency} | {} |{}",
            cells.join(" | "),
            ratio(figures, |f| f.jobs_s.median)
        );
        let cells: Vec<String> = figures
            .iter()
            .map(|f| super::report::spread(&f.cpu_ms, 3))
            .collect();
        let _ = writeln!(
            out,
            "| worker CPU ms per job at {concurrency} | {} |{}",
            cells.join(" | "),
            ratio(figures, |f| f.cpu_ms.median)
        );
        if *concurrency == 16 && ceiling.median > 0.0 {
            let cells: Vec<String> = figures
                .iter()
                .map(|f| format!("{:.0}%", 100.0 * f.jobs_s.median / ceiling.median))
                .collect();
            let _ = writeln!(
                out,
                "| share of the queue's ceiling at 16 ({:.0} jobs/s) | {} |{}",
                ceiling.median,
                cells.join(" | "),
                if builds.len() > 1 { " |" } else { "" }
            );
        }
    }
    let p50: Vec<String> = latency
        .iter()
        .map(|(p50, _)| super::report::spread(p50, 2))
        .collect();
    let p99: Vec<String> = latency
        .iter()
        .map(|(_, p99)| super::report::spread(p99, 2))
        .collect();
    let tail = if builds.len() > 1 { " |" } else { "" };
    let _ = writeln!(
        out,
        "| submit-to-result p50 ms at {LOW_LOAD:.0} jobs/s | {} |{tail}",
        p50.join(" | ")
    );
    let _ = writeln!(
        out,
        "| submit-to-result p99 ms at {LOW_LOAD:.0} jobs/s | {} |{tail}",
        p99.join(" | ")
    );
    out
}
