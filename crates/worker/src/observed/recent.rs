//! The worker's recent jobs as its console shows them: id, handler, state, timings and, for a
//! failure, its `error_type` and `retry_after`. Nothing else is kept (no input, no output, no
//! error message, which may quote the input), so the worker's port, which faces the network
//! without a key on the platform, cannot show what a job carried.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use serde_json::{json, Value};

use crate::outcome::JobError;

/// Jobs kept, newest first.
pub const RECENT_KEPT: usize = 100;
/// Longest job id kept (ids come from the queue; a hostile one must not fill the page).
const ID_CHARS: usize = 80;

/// Where a job is, as far as this worker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecentState {
    /// Taken, waiting for its handler's slot or its memory.
    Waiting,
    /// Running.
    Running,
    /// Answered with an output.
    Completed,
    /// Answered with an error result.
    Failed,
    /// Stopped by the queue.
    Cancelled,
}

impl RecentState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "WAITING",
            Self::Running => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    id: String,
    task: Option<String>,
    state: RecentState,
    taken: Instant,
    started: Option<Instant>,
    finished: Option<Instant>,
    error_type: Option<&'static str>,
    retry_after: Option<u64>,
}

/// A bounded list of the latest jobs.
#[derive(Debug, Default)]
pub struct RecentJobs {
    jobs: Mutex<VecDeque<Entry>>,
}

impl RecentJobs {
    /// A job was taken for `task` (its handler).
    pub fn taken(&self, id: &str, task: &str) {
        let mut jobs = self.lock();
        while jobs.len() >= RECENT_KEPT {
            jobs.pop_back();
        }
        jobs.push_front(Entry {
            id: id.chars().take(ID_CHARS).collect(),
            task: Some(task.chars().take(ID_CHARS).collect()),
            state: RecentState::Waiting,
            taken: Instant::now(),
            started: None,
            finished: None,
            error_type: None,
            retry_after: None,
        });
    }

    /// The job got its slot and runs.
    pub fn started(&self, id: &str) {
        self.update(id, |e| {
            e.state = RecentState::Running;
            e.started = Some(Instant::now());
        });
    }

    /// The job was answered with `result`. A job answered without being taken for a handler
    /// (a bad job, an unknown task) is listed now.
    pub fn finished(&self, id: &str, result: &Result<Value, JobError>) {
        if !self.update(id, |_| {}) {
            self.taken(id, "");
            self.update(id, |e| e.task = None);
        }
        self.update(id, |e| {
            e.finished = Some(Instant::now());
            match result {
                Ok(_) => e.state = RecentState::Completed,
                Err(error) => {
                    e.state = RecentState::Failed;
                    e.error_type = Some(error.error_type.as_str());
                    e.retry_after = error.retry_after;
                }
            }
        });
    }

    /// The queue stopped the job.
    pub fn cancelled(&self, id: &str) {
        self.update(id, |e| {
            e.state = RecentState::Cancelled;
            e.finished = Some(Instant::now());
        });
    }

    /// The list, newest first, as the worker's console shows it: ids, states, timings and
    /// error types only.
    pub fn view(&self) -> Vec<Value> {
        let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_millis() as u64;
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|e| {
                let delay = ms(e.taken, e.started.or(e.finished).unwrap_or(now));
                let execution = e.started.map(|s| ms(s, e.finished.unwrap_or(now)));
                json!({
                    "id": e.id,
                    "task": e.task,
                    "status": e.state.as_str(),
                    "delay_ms": delay,
                    "execution_ms": execution,
                    "age_ms": ms(e.taken, now),
                    "error_type": e.error_type,
                    "retry_after": e.retry_after,
                })
            })
            .collect()
    }

    /// Applies `f` to the newest entry of `id`; `false` when there is none.
    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) -> bool {
        let short: String = id.chars().take(ID_CHARS).collect();
        let mut jobs = self.lock();
        match jobs.iter_mut().find(|e| e.id == short) {
            Some(entry) => {
                f(entry);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        // Single pushes and field writes: a poisoned lock holds nothing half-done.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::ErrorType;

    /// The keys the worker's view may have: nothing that a job carried.
    const ALLOWED: [&str; 8] = [
        "id",
        "task",
        "status",
        "delay_ms",
        "execution_ms",
        "age_ms",
        "error_type",
        "retry_after",
    ];

    #[test]
    fn the_worker_view_shows_ids_states_timings_and_error_types_but_no_job_content() {
        let recent = RecentJobs::default();
        recent.taken("ok", "echo");
        recent.started("ok");
        recent.finished("ok", &Ok(json!({"secret": "the output"})));
        recent.taken("squeezed", "classify");
        let mut error = JobError::new(ErrorType::InsufficientGpuMemory, "about input 'secret'");
        error.retry_after = Some(7);
        recent.finished("squeezed", &Err(error));
        recent.finished(
            "bad",
            &Err(JobError::new(ErrorType::InvalidInput, "secret field")),
        );
        let view = recent.view();
        let text = serde_json::to_string(&view).unwrap();
        assert!(!text.contains("secret"), "no output, no message: {text}");
        for job in &view {
            for key in job.as_object().unwrap().keys() {
                assert!(ALLOWED.contains(&key.as_str()), "unexpected {key}");
            }
        }
        assert_eq!(view[0]["id"], "bad", "newest first");
        assert_eq!(view[0]["task"], Value::Null);
        assert_eq!(view[1]["status"], "FAILED");
        assert_eq!(view[1]["error_type"], "InsufficientGPUMemory");
        assert_eq!(view[1]["retry_after"], 7);
        assert_eq!(view[1]["execution_ms"], Value::Null, "never ran");
        assert_eq!(view[2]["status"], "COMPLETED");
        assert!(view[2]["execution_ms"].is_u64());
    }

    #[test]
    fn the_list_is_bounded_and_long_ids_are_cut() {
        let recent = RecentJobs::default();
        for i in 0..RECENT_KEPT + 5 {
            recent.taken(&format!("job-{i}"), "echo");
        }
        recent.taken(&"x".repeat(1000), "echo");
        recent.cancelled(&"x".repeat(1000));
        let view = recent.view();
        assert_eq!(view.len(), RECENT_KEPT);
        assert_eq!(view[0]["id"].as_str().unwrap().len(), ID_CHARS);
        assert_eq!(view[0]["status"], "CANCELLED");
    }
}
