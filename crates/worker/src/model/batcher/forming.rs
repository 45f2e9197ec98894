//! Which pending rows form the next batch. Pure (no model, no clock), so its rules are tested
//! on their own:
//! - **Groups.** A batch holds rows of one group: for token rows, one width bucket (the next
//!   power of two of the row's tokens, 16 at the least), so a 16-token classify text is never
//!   padded to a 256-token chunk: padding stays under half a row, and on the CPU, where cost
//!   follows padded tokens, merging never costs more than it saves; for tensors, one dtype and
//!   shape after the batch dimension (what can be concatenated).
//! - **Anchor.** The oldest row starts the batch, except that a request which started the
//!   previous batch yields to the oldest row of another request, when there is one: one job's
//!   10,000 chunks alternate with a classify job behind them instead of going first.
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

/// The row that starts the next batch: the oldest, unless its request started the previous
/// batch and another request has a row waiting. `pending` is in arrival order.
pub(super) fn anchor(pending: &[Row], previous: Option<u64>) -> Option<usize> {
    let first = (!pending.is_empty()).then_some(0)?;
    Some(
        pending
            .iter()
            .position(|row| Some(row.request) != previous)
            .unwrap_or(first),
    )
}

/// Indices into `pending` (arrival order) of the next batch, the anchor first; empty only
/// when nothing is pending.
pub(super) fn form(pending: &[Row], bounds: &Bounds, previous: Option<u64>) -> Vec<usize> {
    let Some(start) = anchor(pending, previous) else {
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
                }
            })
            .collect()
    }

    const WIDE: Bounds = Bounds {
        max_rows: 64,
        max_tokens: 16_384,
        max_requests: usize::MAX,
    };

    #[test]
    fn a_batch_holds_one_width_bucket_so_short_texts_are_not_padded_to_chunks() {
        let pending = rows(&[(1, 20), (2, 250), (3, 30), (4, 240), (5, 12)]);
        assert_eq!(form(&pending, &WIDE, None), vec![0, 2]);
        // Started by 1 last time: 2 (the oldest of another request) anchors, with 4.
        assert_eq!(form(&pending, &WIDE, Some(1)), vec![1, 3]);
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
        assert_eq!(form(&pending, &tight, None), vec![0, 1]);
        let few = Bounds {
            max_rows: 3,
            ..WIDE
        };
        assert_eq!(form(&pending, &few, None), vec![0, 1, 2]);
        // A row wider than the limit still runs, alone.
        let shrunk = Bounds {
            max_tokens: 50,
            ..WIDE
        };
        assert_eq!(form(&pending, &shrunk, None), vec![0]);
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
        let batch = form(&pending, &bounds, None);
        assert_eq!(batch, vec![0, 1, 10, 11], "two of 1's, both of 2's");
        // With room for more, the rest of 1's rows fill it after 2's.
        let roomy = Bounds {
            max_rows: 8,
            ..WIDE
        };
        let batch = form(&pending, &roomy, None);
        assert_eq!(batch.len(), 8);
        assert!(batch.contains(&10) && batch.contains(&11));
    }

    #[test]
    fn the_request_that_went_first_yields_to_another_next_time() {
        let pending = rows(&[(1, 20), (1, 20), (2, 250)]);
        assert_eq!(anchor(&pending, Some(1)), Some(2));
        assert_eq!(anchor(&pending, Some(2)), Some(0));
        assert_eq!(anchor(&pending[..2], Some(1)), Some(0), "no one else waits");
        assert_eq!(anchor(&[], None), None);
    }

    #[test]
    fn before_memory_is_learned_the_requests_that_fit_bound_the_batch() {
        let pending = rows(&[(1, 20), (2, 20), (3, 20), (1, 20)]);
        let two_jobs = Bounds {
            max_requests: 2,
            ..WIDE
        };
        assert_eq!(form(&pending, &two_jobs, None), vec![0, 1, 3]);
    }
}
