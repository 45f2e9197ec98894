//! When each job and each worker next needs the lease ticker, ordered by time: a tick takes
//! only what is due, so the jobs a mock keeps (a long `local` session, 100k results within
//! their retention) cost nothing until their time comes.

use std::collections::BTreeSet;
use std::time::Instant;

/// What the ticker must look at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Due {
    /// A job's next deadline: its ttl, its lease, its execution timeout or the end of its
    /// retention, whichever comes first ([`super::JobRecord::next_deadline`]). One entry a
    /// job, moved when a change brings the deadline closer.
    Job { endpoint: String, id: String },
    /// A worker's latest ping going stale (then `/health` stops counting it). One entry a
    /// worker, set when it first pings: a ping only moves the deadline later, so the ticker
    /// finds the renewed ping when the entry comes due and sets the next one then.
    Worker { endpoint: String, worker: String },
}

/// The index: `(when, what)`, earliest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct Deadlines {
    by_time: BTreeSet<(Instant, Due)>,
}

impl Deadlines {
    /// Moves `due`'s entry from `from` to `to` (`None`: no entry there).
    pub(crate) fn reschedule(&mut self, due: Due, from: Option<Instant>, to: Option<Instant>) {
        if from == to {
            return;
        }
        match (from, to) {
            (Some(from), Some(to)) => {
                let entry = (from, due);
                self.by_time.remove(&entry);
                self.by_time.insert((to, entry.1));
            }
            (Some(from), None) => {
                self.by_time.remove(&(from, due));
            }
            (None, Some(to)) => {
                self.by_time.insert((to, due));
            }
            (None, None) => {}
        }
    }

    /// Takes out every entry due at `now` or before, earliest first. What the caller sets
    /// again for `now` or before waits for the next call.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<(Instant, Due)> {
        let mut due = Vec::new();
        while self.by_time.first().is_some_and(|(at, _)| *at <= now) {
            due.extend(self.by_time.pop_first());
        }
        due
    }

    /// Entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_time.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn job(id: &str) -> Due {
        Due::Job {
            endpoint: "ep".into(),
            id: id.into(),
        }
    }

    #[test]
    fn only_what_is_due_is_taken_and_a_moved_entry_leaves_no_trace() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut deadlines = Deadlines::default();
        for n in 0..1000 {
            deadlines.reschedule(job(&format!("kept-{n}")), None, Some(later));
        }
        deadlines.reschedule(job("due"), None, Some(now));
        // A lease renewed: the entry moves, it is not added.
        deadlines.reschedule(job("moved"), None, Some(later));
        deadlines.reschedule(job("moved"), Some(later), Some(now));
        assert_eq!(deadlines.len(), 1002);
        let due: Vec<Due> = deadlines.take_due(now).into_iter().map(|e| e.1).collect();
        assert_eq!(due, [job("due"), job("moved")]);
        assert!(deadlines.take_due(now).is_empty());
        assert_eq!(deadlines.len(), 1000);
        deadlines.reschedule(job("kept-0"), Some(later), None);
        assert_eq!(deadlines.take_due(later).len(), 999);
    }
}
