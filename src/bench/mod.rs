//! The benchmark harness (`runpod-worker bench`, `make bench`): printed figures and ratios,
//! never timed tests. [`admission`] measures the cost of one admission decision; [`schedule`]
//! simulates a mixed GPU workload under the seed's static policy and the adaptive one;
//! [`models`] compares the handlers with Python torch on the same model.

pub mod admission;
pub mod models;
pub mod schedule;

/// The `p`-th percentile (0–100) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
