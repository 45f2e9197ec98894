//! Part 6: the per-job fast path. Echo jobs from a pre-loaded queue at concurrency 1 and 16,
//! this build against a baseline build (a binary of an earlier commit, `--baseline`) measured
//! alternately in the same run, so the machine's noise falls on both; the bare queue's own
//! ceiling in the same run; and submit-to-result latency at a low, steady load. The worker's
//! CPU time per job is read from /proc for its whole process tree.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::json;

use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt as _};
use serde_json::Value;

use super::procs;
use super::queue::{start_worker, Proc, Queue, Setup, Worker};
use super::stats::Spread;
use super::workers::{latency_run, run_all};

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
                let (p, c) = throughput(queue, endpoint, proc, &echo, jobs).await?;
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

/// How often the end of a throughput run is checked.
const POLL: Duration = Duration::from_millis(5);

/// One throughput run: (jobs/s, worker CPU ms per job). The worker is stopped (SIGSTOP) while
/// the queue is loaded, then continued and the clock starts; the end is read from the queue's
/// own count of unfinished jobs, so the harness adds no request per job (at 16 slots, waiting on
/// each job's status in turn capped what could be measured).
async fn throughput(
    queue: &Queue,
    endpoint: &str,
    proc: &Proc,
    input: &Value,
    jobs: usize,
) -> Result<(f64, f64)> {
    let pids = procs::tree(proc.pid());
    procs::signal(&pids, "STOP");
    let submitted = stream::iter(0..jobs)
        .map(|_| queue.submit(endpoint, input))
        .buffered(8)
        .collect::<Vec<_>>()
        .await;
    let cpu_before = procs::cpu_s(&pids);
    procs::signal(&pids, "CONT");
    let start = Instant::now();
    submitted.into_iter().collect::<Result<Vec<_>>>()?;
    while queue.unfinished(endpoint).await? > 0 {
        if start.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("{endpoint}: the jobs did not complete in 120 s");
        }
        tokio::time::sleep(POLL).await;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = procs::cpu_s(&procs::tree(proc.pid())) - cpu_before;
    Ok((jobs as f64 / wall, cpu * 1000.0 / jobs as f64))
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
