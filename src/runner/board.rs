//! The jobs this worker holds: their ids (for the heartbeat) and their stop tokens (for the stop
//! channel).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// A held job: its stop token, and whether its result is being posted.
#[derive(Debug)]
struct Held {
    stop: CancellationToken,
    answering: bool,
}

/// In-flight jobs, keyed by id.
#[derive(Debug, Default)]
pub struct JobBoard {
    jobs: Mutex<BTreeMap<String, Held>>,
}

impl JobBoard {
    /// Records a job as held, until the returned guard is dropped (whatever way the job ends);
    /// its token is cancelled if the queue asks to stop it. `None` if a job of that id is
    /// already in hand: it must not run twice.
    pub fn register(self: &Arc<Self>, job_id: &str) -> Option<HeldJob> {
        let mut jobs = self.lock();
        if jobs.contains_key(job_id) {
            return None;
        }
        let token = CancellationToken::new();
        let held = Held {
            stop: token.clone(),
            answering: false,
        };
        jobs.insert(job_id.to_owned(), held);
        Some(HeldJob {
            board: self.clone(),
            id: job_id.to_owned(),
            stop: token,
        })
    }

    /// The job has been answered (or abandoned): it leaves the heartbeat.
    fn finish(&self, job_id: &str) {
        self.lock().remove(job_id);
    }

    /// Stops a held job; `false` if this worker does not hold it.
    pub fn cancel(&self, job_id: &str) -> bool {
        match self.lock().get(job_id) {
            Some(held) => {
                held.stop.cancel();
                true
            }
            None => false,
        }
    }

    /// Marks `job_id` as being answered; `true` when every job in hand is now being answered,
    /// i.e. this is the last result of a worker that takes no more jobs.
    pub fn begin_answer(&self, job_id: &str) -> bool {
        let mut jobs = self.lock();
        if let Some(held) = jobs.get_mut(job_id) {
            held.answering = true;
        }
        jobs.values().all(|h| h.answering)
    }

    /// Ids of every held job (running or waiting for its handler).
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Number of held jobs.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no job is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts
        // and removes), so a poisoned lock is still safe to use.
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A job on the board: listed in every heartbeat until this is dropped, on every path a job can
/// take (answered, stopped, interrupted, failed to start).
#[derive(Debug)]
pub struct HeldJob {
    board: Arc<JobBoard>,
    id: String,
    stop: CancellationToken,
}

impl HeldJob {
    /// Cancelled when the queue asks to stop the job.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }
}

impl Drop for HeldJob {
    fn drop(&mut self) {
        self.board.finish(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_job_leaves_the_board_when_its_guard_drops_and_an_id_in_hand_is_refused() {
        let board = Arc::new(JobBoard::default());
        let held = board.register("a").unwrap();
        assert!(board.register("a").is_none(), "already in hand");
        assert_eq!(board.ids(), vec!["a".to_owned()]);
        assert!(board.cancel("a") && held.stop().is_cancelled());
        drop(held);
        assert!(board.is_empty());
        assert!(board.register("a").is_some(), "answered: it may come again");
    }
}
