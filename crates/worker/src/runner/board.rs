//! The jobs this worker holds: their ids (for the heartbeat) and their stop tokens (for the stop
//! channel), and the jobs the queue re-sent while they ran that were answered moments ago (a
//! late copy that crossed the answer is not run again).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// A held job: its stop token, whether its result is being posted, and whether the queue sent
/// it again while it was held (its lease ran out while it ran).
#[derive(Debug)]
struct Held {
    stop: CancellationToken,
    answering: bool,
    sent_again: bool,
}

/// How long the id of a job that the queue re-sent while it ran is remembered once its result
/// is delivered: more copies may be on their way (a few lease periods).
const CROSSED_MEMORY: Duration = Duration::from_secs(120);
/// Most such ids remembered.
const CROSSED_MAX: usize = 4096;
/// How long a stop signal for a job this worker does not hold yet is remembered: the job may
/// be in a take's answer still on its way (the queue marks it IN_PROGRESS when it answers the
/// take, so a client can cancel it before the worker has read that answer).
const EARLY_STOP_MEMORY: Duration = Duration::from_secs(15);

/// Why a job was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlreadyHere {
    /// A job of that id is in hand: the running copy answers.
    Running,
    /// A copy sent while it ran, arriving after its result was delivered.
    Answered,
}

#[derive(Debug, Default)]
struct Board {
    jobs: BTreeMap<String, Held>,
    /// Jobs re-sent while they ran whose results were delivered, and when.
    crossed: VecDeque<(String, Instant)>,
    /// Stop signals for jobs not (yet) held, and when they came.
    stopped_early: VecDeque<(String, Instant)>,
}

/// Forgets what is older than `memory` or beyond `max` entries, oldest first.
fn forget_old(entries: &mut VecDeque<(String, Instant)>, now: Instant, memory: Duration) {
    while entries.len() >= CROSSED_MAX
        || entries
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > memory)
    {
        entries.pop_front();
    }
}

/// In-flight jobs, keyed by id, and the re-sent ones answered moments ago.
#[derive(Debug, Default)]
pub struct JobBoard {
    board: Mutex<Board>,
}

impl JobBoard {
    /// Records a job as held, until the returned guard is dropped (whatever way the job ends);
    /// its token is cancelled if the queue asks to stop it. Refused if a job of that id is in
    /// hand, or is a late copy of one the queue re-sent while it ran and whose result has been
    /// delivered: it must not run twice. (A job sent again later, by `/retry` or after a
    /// failed delivery, runs again.)
    pub fn register(self: &Arc<Self>, job_id: &str) -> Result<HeldJob, AlreadyHere> {
        let mut board = self.lock();
        if let Some(held) = board.jobs.get_mut(job_id) {
            held.sent_again = true;
            return Err(AlreadyHere::Running);
        }
        let now = Instant::now();
        if board
            .crossed
            .iter()
            .any(|(id, at)| id == job_id && now.duration_since(*at) <= CROSSED_MEMORY)
        {
            return Err(AlreadyHere::Answered);
        }
        let token = CancellationToken::new();
        forget_old(&mut board.stopped_early, now, EARLY_STOP_MEMORY);
        if let Some(at) = board.stopped_early.iter().position(|(id, _)| id == job_id) {
            // The queue stopped it before its take's answer was read: it never runs.
            board.stopped_early.remove(at);
            token.cancel();
        }
        let held = Held {
            stop: token.clone(),
            answering: false,
            sent_again: false,
        };
        board.jobs.insert(job_id.to_owned(), held);
        Ok(HeldJob {
            board: self.clone(),
            id: job_id.to_owned(),
            stop: token,
        })
    }

    /// The job's output reached the queue. If the queue had sent it again while it ran, more
    /// copies may follow: they are not run for a while.
    pub fn delivered(&self, job_id: &str) {
        let mut board = self.lock();
        if !board.jobs.get(job_id).is_some_and(|held| held.sent_again) {
            return;
        }
        let now = Instant::now();
        forget_old(&mut board.crossed, now, CROSSED_MEMORY);
        board.crossed.push_back((job_id.to_owned(), now));
    }

    /// The job has been answered (or abandoned): it leaves the heartbeat.
    fn finish(&self, job_id: &str) {
        self.lock().jobs.remove(job_id);
    }

    /// Stops a held job; `false` if this worker does not hold it, in which case the signal is
    /// remembered a moment, in case the job is in a take's answer still on its way.
    pub fn cancel(&self, job_id: &str) -> bool {
        let mut board = self.lock();
        if let Some(held) = board.jobs.get(job_id) {
            held.stop.cancel();
            return true;
        }
        let now = Instant::now();
        forget_old(&mut board.stopped_early, now, EARLY_STOP_MEMORY);
        board.stopped_early.push_back((job_id.to_owned(), now));
        false
    }

    /// Marks `job_id` as being answered; `true` when every job in hand is now being answered,
    /// i.e. this is the last result of a worker that takes no more jobs.
    pub fn begin_answer(&self, job_id: &str) -> bool {
        let mut board = self.lock();
        if let Some(held) = board.jobs.get_mut(job_id) {
            held.answering = true;
        }
        board.jobs.values().all(|h| h.answering)
    }

    /// Ids of every held job (running or waiting for its handler).
    pub fn ids(&self) -> Vec<String> {
        self.lock().jobs.keys().cloned().collect()
    }

    /// Number of held jobs.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Whether no job is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        // A panic while holding this lock cannot leave the maps half-updated (single inserts
        // and removes), so a poisoned lock is still safe to use.
        self.board
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
    fn a_stop_that_arrives_before_its_job_stops_the_job_when_it_arrives() {
        let board = Arc::new(JobBoard::default());
        assert!(!board.cancel("early"), "not held yet");
        let held = board.register("early").unwrap();
        assert!(
            held.stop().is_cancelled(),
            "stopped on arrival: it never runs"
        );
        drop(held);
        // Remembered once: the same id sent again later runs.
        assert!(!board.register("early").unwrap().stop().is_cancelled());
        assert!(!board.register("other").unwrap().stop().is_cancelled());
    }

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
        let again = board
            .register("a")
            .expect("answered: it may come again (a /retry)");
        board.delivered("a");
        drop(again);
        assert!(
            board.register("a").is_ok(),
            "not re-sent while it ran: a later copy runs"
        );
        let crossed = board.register("b").unwrap();
        assert_eq!(board.register("b").err(), Some(AlreadyHere::Running));
        board.delivered("b");
        drop(crossed);
        assert_eq!(
            board.register("b").err(),
            Some(AlreadyHere::Answered),
            "a copy sent while it ran arrives after its result: not run"
        );
    }
}
