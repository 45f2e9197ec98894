//! A scheduling simulation: a mixed GPU workload whose jobs declare more memory than they use,
//! run under the seed's static policy (admit by declared memory) and under the adaptive policy
//! (admit by learned footprints), on the same 24 GB card. Both must never over-commit the real
//! memory; the adaptive one should finish the same work sooner.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use worker::admission::Footprint;

/// One kind of job.
struct Kind {
    name: &'static str,
    declared: u64,
    actual: (u64, u64),
    duration_ms: (u64, u64),
    limit: usize,
}

const GB: u64 = 1_000_000_000;
const BUDGET: u64 = 24 * GB - (1 << 30);
const GLOBAL_LIMIT: usize = 16;
const JOBS: usize = 5_000;

fn kinds() -> [Kind; 2] {
    [
        Kind {
            name: "classify",
            declared: 6 * GB,
            actual: (GB + GB / 2, 2 * GB + GB / 2),
            duration_ms: (800, 1200),
            limit: 8,
        },
        Kind {
            name: "embed",
            declared: 4 * GB,
            actual: (GB * 8 / 10, GB * 12 / 10),
            duration_ms: (400, 600),
            limit: 8,
        },
    ]
}

struct Job {
    kind: usize,
    actual: u64,
    duration_ms: u64,
}

/// What one policy achieved.
struct Outcome {
    makespan_ms: u64,
    over_commits: usize,
    peak_actual: u64,
    mean_concurrency: f64,
}

fn workload(seed: u64) -> Vec<Job> {
    let mut rng = StdRng::seed_from_u64(seed);
    let kinds = kinds();
    (0..JOBS)
        .map(|_| {
            let kind = rng.random_range(0..kinds.len());
            let k = &kinds[kind];
            Job {
                kind,
                actual: rng.random_range(k.actual.0..=k.actual.1),
                duration_ms: rng.random_range(k.duration_ms.0..=k.duration_ms.1),
            }
        })
        .collect()
}

/// Runs the backlog to completion. `adaptive` admits by the learned footprint.
fn simulate(jobs: &[Job], adaptive: bool) -> Outcome {
    let kinds = kinds();
    let footprints: Vec<Footprint> = kinds
        .iter()
        .map(|k| Footprint::new(k.declared, 0.1, 95.0, 5))
        .collect();
    let mut pending: VecDeque<usize> = (0..jobs.len()).collect();
    // (end time, job index, reserved bytes)
    let mut running: BinaryHeap<Reverse<(u64, usize, u64)>> = BinaryHeap::new();
    let (mut now, mut reserved, mut actual_in_use) = (0u64, 0u64, 0u64);
    let mut active = vec![0usize; kinds.len()];
    let (mut over_commits, mut peak_actual, mut busy_area) = (0usize, 0u64, 0f64);
    loop {
        // Admit what fits, in order, looking a little past a job that must wait (as the
        // worker's local queue does).
        let mut index = 0;
        while index < pending.len().min(64) && running.len() < GLOBAL_LIMIT {
            let job = &jobs[pending[index]];
            let kind = &kinds[job.kind];
            let need = if adaptive {
                footprints[job.kind].estimate()
            } else {
                kind.declared
            };
            if active[job.kind] < kind.limit && reserved + need <= BUDGET {
                reserved += need;
                actual_in_use += job.actual;
                active[job.kind] += 1;
                running.push(Reverse((now + job.duration_ms, pending[index], need)));
                pending.remove(index);
                if actual_in_use > BUDGET {
                    over_commits += 1;
                }
                peak_actual = peak_actual.max(actual_in_use);
            } else {
                index += 1;
            }
        }
        let Some(Reverse((end, done, need))) = running.pop() else {
            break;
        };
        busy_area += (running.len() + 1) as f64 * (end - now) as f64;
        now = end;
        let job = &jobs[done];
        reserved -= need;
        actual_in_use -= job.actual;
        active[job.kind] -= 1;
        footprints[job.kind].record(job.actual);
    }
    Outcome {
        makespan_ms: now,
        over_commits,
        peak_actual,
        mean_concurrency: busy_area / now.max(1) as f64,
    }
}

/// The best any policy could do: every job's real memory known in advance, so the card is
/// limited only by memory-time and the per-handler limits.
fn bound_ms(jobs: &[Job]) -> u64 {
    let kinds = kinds();
    let memory_time: f64 = jobs
        .iter()
        .map(|j| j.actual as f64 * j.duration_ms as f64)
        .sum();
    let by_memory = memory_time / BUDGET as f64;
    let by_limits = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            jobs.iter()
                .filter(|j| j.kind == i)
                .map(|j| j.duration_ms as f64)
                .sum::<f64>()
                / k.limit as f64
        })
        .fold(0.0, f64::max);
    by_memory.max(by_limits) as u64
}

/// Runs the simulation and returns the report.
pub fn run() -> String {
    let jobs = workload(7);
    let static_policy = simulate(&jobs, false);
    let adaptive = simulate(&jobs, true);
    let bound = bound_ms(&jobs);
    let throughput = |o: &Outcome| JOBS as f64 / (o.makespan_ms as f64 / 1000.0);
    let mut report = format!(
        "Scheduling simulation: {JOBS} jobs on one 24 GB card (budget {:.2} GB); classify declares 6 GB, \
         uses 1.5–2.5 GB; embed declares 4 GB, uses 0.8–1.2 GB; limits 8 + 8, 16 in all\n",
        BUDGET as f64 / GB as f64
    );
    for (name, o) in [
        ("static (seed: declared memory)", &static_policy),
        ("adaptive (learned footprints)", &adaptive),
    ] {
        report += &format!(
            "  {name:<32} {:>7.1} jobs/s  {:>5.1} running on average  real peak {:>5.2} GB  over-commits {}\n",
            throughput(o),
            o.mean_concurrency,
            o.peak_actual as f64 / GB as f64,
            o.over_commits
        );
    }
    report += &format!(
        "  adaptive / static throughput: {:.2}x; theoretical bound {:.1} jobs/s (adaptive reaches {:.0}% of it)\n",
        throughput(&adaptive) / throughput(&static_policy),
        JOBS as f64 / (bound as f64 / 1000.0),
        100.0 * bound as f64 / adaptive.makespan_ms as f64
    );
    report += &format!(
        "  kinds: {}\n",
        kinds()
            .iter()
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neither_policy_over_commits_and_adaptive_is_not_slower() {
        let jobs = workload(1);
        let (s, a) = (simulate(&jobs, false), simulate(&jobs, true));
        assert_eq!((s.over_commits, a.over_commits), (0, 0));
        assert!(a.makespan_ms <= s.makespan_ms);
        assert!(bound_ms(&jobs) <= a.makespan_ms);
    }
}
