//! Which pending rows form the next batch. Pure (no model, no clock), so its rules are tested
//! on their own:
//! - **Groups.** A batch holds rows of one group: for token rows, one width bucket (the next
//!   power of two of the row's tokens, 16 at the least), so a 16-token classify text is never
//!   padded to a 256-token chunk: padding stays under half a row, and on the CPU, where cost
//!   follows padded tokens, merging never costs more than it saves; for tensors, one dtype and
//!   shape after the batch dimension (what can be concatenated).
//! - **Anchor.** The first row of one waiting request starts the batch: the narrowest such row
//!   (the cheapest pass first: a classify text before a document's chunks), unless a request
//!   has waited [`MAX_PASSES_WAITED`] passes, which then goes first (oldest first), so wide
//!   rows are never starved; and a request that started the previous batch yields to another
//!   when one waits: one job's 10,000 chunks alternate with the jobs behind them.
//! - **Share.** While rows of other requests wait in the bucket, one request gets at most half
//!   the batch's rows; what the others leave is then filled by anyone, oldest first.
//! - **Bounds.** Rows, padded tokens (rows × the longest row) and, before memory is learned,
//!   the number of requests whose declared memory fits. The anchor always goes in: a row too
//!   wide for a shrunken token limit runs alone (if it fails alone, it fails only its job).

use std::collections::HashMap;

/// One pending row: the request it belongs to, its place there, its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Row {
    /// The request (one job's call) it belongs to.
    pub(super) request: u64,
    /// Its index in that request.
    pub(super) index: usize,
    /// Its size: tokens (special tokens included), or a tensor input's elements.
    pub(super) len: usize,
    /// Rows of one group may share a pass.
    pub(super) group: u64,
    /// The batcher's pass count when it arrived.
    pub(super) arrived_pass: u64,
}

/// Passes a request may wait behind narrower ones before it goes first.
pub(super) const MAX_PASSES_WAITED: u64 = 2;

/// What the batcher remembers of its passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct History {
    /// The request that started the previous pass.
    pub(super) previous: Option<u64>,
    /// Passes formed so far.
    pub(super) passes: u64,
}

/// What one batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bounds {
    /// Rows.
    pub(super) max_rows: usize,
    /// Padded tokens: rows × the longest row.
    pub(super) max_tokens: usize,
    /// Distinct requests (memory booked per request before anything is learned).
    pub(super) max_requests: usize,
}

/// The width bucket of a row of `len` tokens.
pub(super) fn bucket(len: usize) -> usize {
    len.max(16).next_power_of_two()
}

/// The row that starts the next batch (see the module's rules). `pending` is in arrival
/// order; `None` only when it is empty.
pub(super) fn anchor(pending: &[Row], history: History) -> Option<usize> {
    // Each waiting request's first row, in arrival order.
    let mut seen = std::collections::HashSet::new();
    let heads: Vec<usize> = (0..pending.len())
        .filter(|&i| seen.insert(pending[i].request))
        .collect();
    let others: Vec<usize> = heads
        .iter()
        .copied()
        .filter(|&h| Some(pending[h].request) != history.previous)
        .collect();
    let choice = if others.is_empty() { &heads } else { &others };
    let waited = |h: usize| history.passes.saturating_sub(pending[h].arrived_pass);
    choice
        .iter()
        .copied()
        .find(|&h| waited(h) >= MAX_PASSES_WAITED)
        .or_else(|| choice.iter().copied().min_by_key(|&h| (pending[h].len, h)))
}

/// Indices into `pending` (arrival order) of the next batch, the anchor first; empty only
/// when nothing is pending.
pub(super) fn form(pending: &[Row], bounds: &Bounds, history: History) -> Vec<usize> {
    let Some(start) = anchor(pending, history) else {
        return Vec::new();
    };
    let group = pending[start].group;
    let candidates: Vec<usize> = std::iter::once(start)
        .chain((0..pending.len()).filter(|&i| i != start && pending[i].group == group))
        .collect();
    let waiting_requests = {
        let mut seen: Vec<u64> = candidates.iter().map(|&i| pending[i].request).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    };
    let share = if waiting_requests > 1 {
        bounds.max_rows.div_ceil(2).max(1)
    } else {
        usize::MAX
    };
    let mut batch = Batch::default();
    batch.add(pending[start], start);
    for cap in [share, usize::MAX] {
        for &i in &candidates[1..] {
            if batch.rows.len() >= bounds.max_rows {
                return batch.rows;
            }
            if !batch.rows.contains(&i) && batch.admits(pending[i], bounds, cap) {
                batch.add(pending[i], i);
            }
        }
    }
    batch.rows
}

/// A batch being formed.
#[derive(Default)]
struct Batch {
    rows: Vec<usize>,
    width: usize,
    per_request: HashMap<u64, usize>,
}

impl Batch {
    fn add(&mut self, row: Row, index: usize) {
        self.rows.push(index);
        self.width = self.width.max(row.len);
        *self.per_request.entry(row.request).or_default() += 1;
    }

    fn admits(&self, row: Row, bounds: &Bounds, share: usize) -> bool {
        let padded = (self.rows.len() + 1) * self.width.max(row.len);
        let taken = self.per_request.get(&row.request).copied().unwrap_or(0);
        let new_request = taken == 0;
        padded <= bounds.max_tokens
            && taken < share
            && (!new_request || self.per_request.len() < bounds.max_requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(spec: &[(u64, usize)]) -> Vec<Row> {
        let mut counts: HashMap<u64, usize> = HashMap::new();
        spec.iter()
            .map(|&(request, len)| {
                let index = counts.entry(request).or_default();
                *index += 1;
                Row {
                    request,
                    index: *index - 1,
                    len,
                    group: bucket(len) as u64,
                    arrived_pass: 0,
                }
            })
            .collect()
    }

    const WIDE: Bounds = Bounds {
        max_rows: 64,
        max_tokens: 16_384,
        max_requests: usize::MAX,
    };

    fn fresh() -> History {
        History::default()
    }

    #[test]
    fn a_batch_holds_one_width_bucket_so_short_texts_are_not_padded_to_chunks() {
        let pending = rows(&[(1, 20), (2, 250), (3, 30), (4, 240)]);
        // The narrowest first: 20 and 30 tokens share the 32 bucket; the chunks wait.
        assert_eq!(form(&pending, &WIDE, fresh()), vec![0, 2]);
        // Once the 250-token request has waited two passes, it goes first, with 240.
        let mut waited = pending;
        for row in &mut waited {
            row.arrived_pass = 2;
        }
        waited[1].arrived_pass = 0;
        let later = History {
            previous: None,
            passes: 2,
        };
        assert_eq!(form(&waited, &WIDE, later), vec![1, 3]);
        assert_eq!(bucket(12), 16);
        assert_eq!(bucket(17), 32);
        assert_eq!(bucket(256), 256);
    }

    #[test]
    fn padded_tokens_and_rows_bound_the_batch() {
        let pending = rows(&[(1, 100), (1, 120), (1, 128), (1, 90)]);
        let tight = Bounds {
            max_tokens: 300,
            ..WIDE
        };
        // 2 rows × 120 = 240 fits; a third would be 3 × 128 = 384.
        assert_eq!(form(&pending, &tight, fresh()), vec![0, 1]);
        let few = Bounds {
            max_rows: 3,
            ..WIDE
        };
        assert_eq!(form(&pending, &few, fresh()), vec![0, 1, 2]);
        // A row wider than the limit still runs, alone.
        let shrunk = Bounds {
            max_tokens: 50,
            ..WIDE
        };
        assert_eq!(form(&pending, &shrunk, fresh()), vec![0]);
    }

    #[test]
    fn one_request_gets_half_the_batch_while_others_wait_and_the_rest_after() {
        // Request 1 has 10 rows, request 2 has 2, behind them.
        let mut spec = vec![(1, 200); 10];
        spec.extend([(2, 210), (2, 220)]);
        let pending = rows(&spec);
        let bounds = Bounds {
            max_rows: 4,
            ..WIDE
        };
        let batch = form(&pending, &bounds, fresh());
        assert_eq!(batch, vec![0, 1, 10, 11], "two of 1's, both of 2's");
        // With room for more, the rest of 1's rows fill it after 2's.
        let roomy = Bounds {
            max_rows: 8,
            ..WIDE
        };
        let batch = form(&pending, &roomy, fresh());
        assert_eq!(batch.len(), 8);
        assert!(batch.contains(&10) && batch.contains(&11));
    }

    #[test]
    fn the_request_that_went_first_yields_to_another_next_time() {
        let pending = rows(&[(1, 20), (1, 20), (2, 250)]);
        let after = |previous| History {
            previous: Some(previous),
            passes: 1,
        };
        assert_eq!(anchor(&pending, fresh()), Some(0), "the narrowest");
        assert_eq!(anchor(&pending, after(1)), Some(2));
        assert_eq!(anchor(&pending, after(2)), Some(0));
        assert_eq!(
            anchor(&pending[..2], after(1)),
            Some(0),
            "no one else waits"
        );
        assert_eq!(anchor(&[], fresh()), None);
    }

    #[test]
    fn before_memory_is_learned_the_requests_that_fit_bound_the_batch() {
        let pending = rows(&[(1, 20), (2, 20), (3, 20), (1, 20)]);
        let two_jobs = Bounds {
            max_requests: 2,
            ..WIDE
        };
        assert_eq!(form(&pending, &two_jobs, fresh()), vec![0, 1, 3]);
    }
}
