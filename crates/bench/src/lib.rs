//! The benchmark harness (`runpod-worker bench`, `make bench`): printed figures and ratios,
//! never timed tests. [`admission`] measures the cost of one admission decision; [`schedule`]
//! simulates a mixed GPU workload under the seed's static policy and the adaptive one;
//! [`models`] compares the handlers with Python torch on the same model; [`batching`] runs
//! them with batching across jobs on and off; [`fast_path`] times the per-job path against an
//! earlier build. [`compare`] runs the
//! whole worker against the official SDK worker, the bare mock queue and infinity-emb, and
//! writes BENCHMARKS.md with its plot ([`workers`], [`cold_start`], [`embeddings`], [`ceiling`],
//! [`report`], [`plot`]; [`queue`], [`procs`] and [`stats`] are their plumbing).

pub mod admission;
pub mod batching;
pub mod ceiling;
pub mod cold_start;
pub mod compare;
pub mod embeddings;
pub mod fast_path;
pub mod load_balancing;
pub mod models;
pub mod plot;
pub mod procs;
pub mod queue;
pub mod report;
pub mod schedule;
pub mod stats;
pub mod workers;

/// The `p`-th percentile (0–100) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
