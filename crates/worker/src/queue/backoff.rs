//! Exponential backoff with jitter, so a failing queue sees a few requests a second at most
//! (the SDK re-polls a failing job-take at once: about 750 requests a second).

use std::time::Duration;

use rand::Rng;

/// Delays after consecutive failures: `initial · 2^n`, capped at `max`, each drawn uniformly
/// from its upper half so that many workers do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and never above `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The wait before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let exponent = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.initial.saturating_mul(1 << exponent).min(self.max);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=ceiling - half)
    }

    /// A success: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_in_the_upper_half() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let bounds = [100, 200, 400, 800, 1000, 1000];
        for ceiling in bounds {
            let d = backoff.next_delay().as_millis() as u64;
            assert!(
                (ceiling / 2..=ceiling).contains(&d),
                "{d} not in upper half of {ceiling}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
