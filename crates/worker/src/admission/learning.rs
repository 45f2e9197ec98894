//! What admission learns from finished jobs: each handler's real GPU footprint (a high
//! percentile of recent peaks plus a margin, never above what was declared), its typical
//! duration (for `retry_after`), and an adaptive concurrency limit (halved on OOM, grown back
//! one step after a run of successes).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Peaks remembered per handler.
const WINDOW: usize = 64;

/// Learned footprint of one handler.
#[derive(Debug)]
pub struct Footprint {
    declared: u64,
    margin: f64,
    percentile: f64,
    min_samples: usize,
    peaks: Mutex<VecDeque<u64>>,
}

impl Footprint {
    /// Starts at `declared`; learns once `min_samples` peaks are known.
    pub fn new(declared: u64, margin: f64, percentile: f64, min_samples: usize) -> Self {
        Self {
            declared,
            margin,
            percentile,
            min_samples,
            peaks: Mutex::new(VecDeque::with_capacity(WINDOW)),
        }
    }

    /// Records one job's peak.
    pub fn record(&self, peak: u64) {
        let mut peaks = lock(&self.peaks);
        if peaks.len() == WINDOW {
            peaks.pop_front();
        }
        peaks.push_back(peak);
    }

    /// The declared footprint.
    pub fn declared(&self) -> u64 {
        self.declared
    }

    /// Peaks recorded (up to the window).
    pub fn samples(&self) -> usize {
        lock(&self.peaks).len()
    }

    /// The learned estimate: `percentile` of recent peaks times `1 + margin`, capped by the
    /// declared value; the declared value until enough peaks are known.
    pub fn estimate(&self) -> u64 {
        let peaks = lock(&self.peaks);
        if peaks.len() < self.min_samples {
            return self.declared;
        }
        let mut sorted: Vec<u64> = peaks.iter().copied().collect();
        sorted.sort_unstable();
        let rank = ((self.percentile / 100.0) * (sorted.len() - 1) as f64).ceil() as usize;
        let high = sorted[rank.min(sorted.len() - 1)] as f64;
        ((high * (1.0 + self.margin)) as u64).clamp(1, self.declared)
    }
}

/// Exponentially weighted mean of a handler's job durations.
#[derive(Debug, Default)]
pub struct DurationStats {
    mean_ms: Mutex<Option<f64>>,
}

impl DurationStats {
    /// Records one job's duration.
    pub fn record(&self, took: Duration) {
        let mut mean = lock(&self.mean_ms);
        let ms = took.as_secs_f64() * 1000.0;
        *mean = Some(mean.map_or(ms, |m| 0.8 * m + 0.2 * ms));
    }

    /// The typical duration, once one job has finished.
    pub fn typical(&self) -> Option<Duration> {
        lock(&self.mean_ms).map(|ms| Duration::from_secs_f64(ms / 1000.0))
    }
}

/// The additive-increase, multiplicative-decrease rule of adaptive concurrency.
#[derive(Debug)]
pub struct AdaptiveRule {
    /// Successes in a row before the limit grows by one.
    pub grow_after: u32,
    successes: Mutex<u32>,
}

impl AdaptiveRule {
    /// Grows after `grow_after` successes in a row.
    pub fn new(grow_after: u32) -> Self {
        Self {
            grow_after,
            successes: Mutex::new(0),
        }
    }

    /// The new limit after an OOM: half, never below 1.
    pub fn on_oom(&self, current: usize) -> usize {
        *lock(&self.successes) = 0;
        (current / 2).max(1)
    }

    /// The new limit after a success: one more every `grow_after` successes (the caller caps
    /// it at the configured maximum).
    pub fn on_success(&self, current: usize) -> usize {
        let mut successes = lock(&self.successes);
        *successes += 1;
        if *successes >= self.grow_after {
            *successes = 0;
            current + 1
        } else {
            current
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprint_is_declared_until_learned_then_a_high_percentile_plus_margin_capped() {
        let footprint = Footprint::new(10_000, 0.1, 95.0, 5);
        for peak in [1000, 1200, 1100] {
            footprint.record(peak);
        }
        assert_eq!(footprint.estimate(), 10_000, "too few samples");
        for peak in [1300, 1000, 1000, 1000] {
            footprint.record(peak);
        }
        assert_eq!(
            footprint.estimate(),
            1430,
            "p95 of the peaks (1300) plus 10%"
        );
        footprint.record(50_000);
        assert_eq!(
            footprint.estimate(),
            10_000,
            "never above the declared value"
        );
    }

    #[test]
    fn adaptive_rule_halves_on_oom_and_grows_back_one_step_at_a_time() {
        let rule = AdaptiveRule::new(3);
        assert_eq!(rule.on_oom(4), 2);
        assert_eq!(rule.on_oom(1), 1, "never below 1");
        assert_eq!(rule.on_success(1), 1);
        assert_eq!(rule.on_success(1), 1);
        assert_eq!(rule.on_success(1), 2, "third success in a row grows it");
    }

    #[test]
    fn durations_are_an_exponential_mean() {
        let stats = DurationStats::default();
        assert!(stats.typical().is_none());
        stats.record(Duration::from_millis(1000));
        stats.record(Duration::from_millis(2000));
        assert_eq!(stats.typical().unwrap().as_millis(), 1200);
    }
}
