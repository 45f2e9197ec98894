//! One change signal per job that someone waits on: a `/runsync`, `/status-sync`, `/stream` or
//! OpenAI request waiting on its job is woken by changes to that job only, so 9,000 idle
//! waiters cost nothing while other jobs come and go. A job's signal exists while someone
//! waits on it.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

/// Job id → its signal, for the jobs someone waits on.
#[derive(Debug, Default)]
pub(crate) struct JobSignals {
    senders: Mutex<HashMap<String, watch::Sender<()>>>,
}

impl JobSignals {
    fn senders(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        self.senders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Listens for changes to job `id` from now on (subscribe before looking at the job, so
    /// a change made in between still wakes the listener).
    pub(crate) fn subscribe(&self, id: &str) -> JobSubscription<'_> {
        let receiver = self
            .senders()
            .entry(id.to_owned())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        JobSubscription {
            signals: self,
            id: id.to_owned(),
            receiver: Some(receiver),
        }
    }

    /// Wakes the listeners of the jobs `ids` (a job nobody waits on costs a lookup).
    pub(crate) fn notify(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let senders = self.senders();
        for id in ids {
            if let Some(sender) = senders.get(id) {
                sender.send_replace(());
            }
        }
    }

    /// Jobs with a signal now (someone waits on each).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.senders().len()
    }
}

/// A listener for one job's changes; its job's signal goes with its last listener.
pub(crate) struct JobSubscription<'a> {
    signals: &'a JobSignals,
    id: String,
    receiver: Option<watch::Receiver<()>>,
}

impl JobSubscription<'_> {
    /// Waits for the next change to the job (returns at once if there was one since the
    /// last call, or since subscribing).
    pub(crate) async fn changed(&mut self) {
        if let Some(receiver) = &mut self.receiver {
            // The sender lives while this receiver does (it is removed only with the last).
            let _ = receiver.changed().await;
        }
    }
}

impl Drop for JobSubscription<'_> {
    fn drop(&mut self) {
        let mut senders = self.signals.senders();
        // Dropped under the lock, so a new listener cannot subscribe to a signal being removed.
        self.receiver = None;
        if senders
            .get(&self.id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            senders.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_listener_hears_its_own_job_only_and_the_signal_goes_with_the_last_one() {
        let signals = JobSignals::default();
        let mut first = signals.subscribe("a");
        let mut second = signals.subscribe("a");
        let other = signals.subscribe("b");
        signals.notify(&["a".to_owned(), "nobody-waits".to_owned()]);
        first.changed().await;
        second.changed().await;
        let heard = |s: &JobSubscription<'_>| s.receiver.as_ref().unwrap().has_changed().unwrap();
        assert!(!heard(&other), "b's listener heard a's change");
        assert!(!heard(&first), "one change, heard once");
        assert_eq!(signals.len(), 2, "a signal only for the jobs waited on");
        drop(first);
        assert_eq!(signals.len(), 2);
        drop(second);
        drop(other);
        assert_eq!(signals.len(), 0);
    }

    #[tokio::test]
    async fn a_change_between_subscribing_and_waiting_is_not_missed() {
        let signals = JobSignals::default();
        let mut listener = signals.subscribe("a");
        signals.notify(&["a".to_owned()]);
        let heard = tokio::time::timeout(Duration::from_secs(5), listener.changed()).await;
        assert!(heard.is_ok());
    }
}
