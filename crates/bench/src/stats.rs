//! The arithmetic of the side-by-side benchmarks: percentiles of latencies, min/median/max over
//! repetitions, slot utilisation and ratios. Pure, so it is unit-tested.

/// The `p`-th percentile (0–100) of sorted values, nearest rank (0 when empty).
pub fn percentile_f64(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// p50 and p99 of unsorted latencies.
pub fn p50_p99(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (percentile_f64(&sorted, 50.0), percentile_f64(&sorted, 99.0))
}

/// The minimum, median and maximum of one figure over the repetitions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spread {
    /// Smallest value.
    pub min: f64,
    /// Median value (the lower middle one for an even count).
    pub median: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            min: sorted[0],
            median: sorted[(sorted.len() - 1) / 2],
            max: sorted[sorted.len() - 1],
        }
    }
}

/// Slot utilisation: the time jobs held a slot over the time the slots existed.
pub fn utilisation(busy_s: f64, slots: usize, wall_s: f64) -> f64 {
    if slots == 0 || wall_s <= 0.0 {
        return 0.0;
    }
    busy_s / (slots as f64 * wall_s)
}

/// ours / theirs, or NaN when theirs is zero (shown as "n/a").
pub fn ratio(ours: f64, theirs: f64) -> f64 {
    if theirs == 0.0 {
        f64::NAN
    } else {
        ours / theirs
    }
}

/// Cosine similarity of two vectors (0 when either is zero or their lengths differ).
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_f64(&values, 50.0), 51.0);
        assert_eq!(percentile_f64(&values, 99.0), 99.0);
        assert_eq!(percentile_f64(&values, 100.0), 100.0);
        assert_eq!(percentile_f64(&[], 50.0), 0.0);
        assert_eq!(p50_p99(&[3.0, 1.0, 2.0]), (2.0, 3.0));
    }

    #[test]
    fn spread_is_min_median_max() {
        assert_eq!(
            Spread::of(&[5.0, 1.0, 3.0]),
            Spread {
                min: 1.0,
                median: 3.0,
                max: 5.0
            }
        );
        assert_eq!(Spread::of(&[]), Spread::default());
    }

    #[test]
    fn utilisation_is_busy_over_slots_times_wall() {
        // 16 jobs of 200 ms on 4 slots in 0.8 s: every slot busy all the time.
        assert!((utilisation(16.0 * 0.2, 4, 0.8) - 1.0).abs() < 1e-12);
        // The SDK's shape: 4 jobs of 200 ms per 1.2 s on 4 slots.
        assert!((utilisation(4.0 * 0.2, 4, 1.2) - 1.0 / 6.0).abs() < 1e-12);
        assert_eq!(utilisation(1.0, 0, 1.0), 0.0);
    }

    #[test]
    fn ratios_and_cosines() {
        assert_eq!(ratio(3.0, 2.0), 1.5);
        assert!(ratio(1.0, 0.0).is_nan());
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 2.0]), 0.0);
    }
}
