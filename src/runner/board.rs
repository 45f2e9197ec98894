//! The jobs this worker holds: their ids (for the heartbeat) and their stop tokens (for the stop
//! channel), and the ids it answered moments ago (a re-send that crossed the answer is not run
//! again).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// A held job: its stop token, and whether its result is being posted.
#[derive(Debug)]
struct Held {
    stop: CancellationToken,
    answering: bool,
}

/// How long a delivered job's id is remembered: a queue whose lease ran out while the job ran
/// may hand it out again just before our result reaches it (a few lease periods).
const DELIVERED_MEMORY: Duration = Duration::from_secs(120);
/// Most delivered ids remembered.
const DELIVERED_MAX: usize = 4096;

/// Why a job was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlreadyHere {
    /// A job of that id is in hand: the running copy answers.
    Running,
    /// Its result was delivered moments ago: a re-send that crossed our answer.
    Answered,
}

/// In-flight jobs, keyed by id, and the ids whose results were delivered recently.
#[derive(Debug, Default)]
pub struct JobBoard {
    jobs: Mutex<BTreeMap<String, Held>>,
    delivered: Mutex<VecDeque<(String, Instant)>>,
}

impl JobBoard {
    /// Records a job as held, until the returned guard is dropped (whatever way the job ends);
    /// its token is cancelled if the queue asks to stop it. Refused if a job of that id is in
    /// hand, or was answered moments ago: it must not run twice.
    pub fn register(self: &Arc<Self>, job_id: &str) -> Result<HeldJob, AlreadyHere> {
        if self.recently_delivered(job_id) {
            return Err(AlreadyHere::Answered);
        }
        let mut jobs = self.lock();
        if jobs.contains_key(job_id) {
            return Err(AlreadyHere::Running);
        }
        let token = CancellationToken::new();
        let held = Held {
            stop: token.clone(),
            answering: false,
        };
        jobs.insert(job_id.to_owned(), held);
        Ok(HeldJob {
            board: self.clone(),
            id: job_id.to_owned(),
            stop: token,
        })
    }

    /// The job's result reached the queue: a re-send of it is not run again for a while.
    pub fn delivered(&self, job_id: &str) {
        let mut delivered = self.delivered_lock();
        let now = Instant::now();
        while delivered.len() >= DELIVERED_MAX
            || delivered
                .front()
                .is_some_and(|(_, at)| now.duration_since(*at) > DELIVERED_MEMORY)
        {
            delivered.pop_front();
        }
        delivered.push_back((job_id.to_owned(), now));
    }

    fn recently_delivered(&self, job_id: &str) -> bool {
        self.delivered_lock()
            .iter()
            .any(|(id, at)| id == job_id && at.elapsed() <= DELIVERED_MEMORY)
    }

    fn delivered_lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, Instant)>> {
        self.delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        assert_eq!(
            board.register("a").err(),
            Some(AlreadyHere::Running),
            "already in hand"
        );
        assert_eq!(board.ids(), vec!["a".to_owned()]);
        assert!(board.cancel("a") && held.stop().is_cancelled());
        drop(held);
        assert!(board.is_empty());
        assert!(
            board.register("a").is_ok(),
            "ended without a delivered result: it may come again"
        );
        board.delivered("a");
        assert_eq!(board.register("a").err(), Some(AlreadyHere::Answered));
        assert!(board.register("b").is_ok());
    }
}
