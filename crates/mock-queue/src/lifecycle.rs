//! The bookkeeping a change to a job or a worker needs, in one place: its entry in the ticker's
//! index of deadlines ([`super::deadlines`]), and the requests waiting on the job
//! ([`super::signals`]). A route that changes a job's state calls [`Inner::reschedule`] after
//! it, so the ticker looks at the job when its next deadline comes and not before, and
//! [`Inner::job_changed`], so the requests waiting on that job (and only those) look again.

use std::time::{Duration, Instant};

use super::body::JobBody;
use super::deadlines::Due;
use super::jobs::JobRecord;
use super::state::{Inner, PingRecord};

impl Inner {
    /// Queues a job object on `endpoint`; one with a string id gets a record (status, lease,
    /// deadlines), kept for `retention` once it ends.
    pub fn push(&mut self, endpoint: &str, job: impl Into<JobBody>, retention: Duration) {
        let job = job.into();
        let id = job.id().map(str::to_owned);
        if let Some(id) = &id {
            // The same id queued again (tests do): the old record and its deadline go.
            self.remove_job(endpoint, id);
        }
        let queue = self.endpoint(endpoint);
        if let Some(id) = &id {
            queue
                .jobs
                .insert(id.clone(), JobRecord::new(job.clone(), retention));
        }
        queue.pending.push_back(job);
        if let Some(id) = id {
            self.reschedule(endpoint, &id);
            self.job_changed(&id);
        }
    }

    /// Notes that job `id` changed: once the lock is released, the requests waiting on it
    /// (and only those) look at it again.
    pub(crate) fn job_changed(&mut self, id: &str) {
        self.changed_jobs.push(id.to_owned());
    }

    /// Gives every held job a lease until at least `until` (after the mock itself was
    /// paused); how many. A lease only moves later, so each entry in the index is found
    /// renewed when it comes due.
    pub(crate) fn renew_leases(&mut self, until: Instant) -> usize {
        let mut renewed = 0;
        for queue in self.endpoints.values_mut() {
            for job in queue.jobs.values_mut() {
                if let Some(lease) = job.lease_until.as_mut() {
                    if *lease < until {
                        *lease = until;
                        renewed += 1;
                    }
                }
            }
        }
        renewed
    }

    /// Sets the ticker's entry for job `id` of `endpoint` at its next deadline, after a change
    /// that may have moved it (taken, ended, requeued, retried). A deadline that only moves
    /// later (a renewed lease) needs no call: the ticker finds it when the old one comes.
    pub(crate) fn reschedule(&mut self, endpoint: &str, id: &str) {
        let grace = self.timeout_grace;
        let Some(job) = self
            .endpoints
            .get_mut(endpoint)
            .and_then(|queue| queue.jobs.get_mut(id))
        else {
            return;
        };
        let next = job.next_deadline(grace);
        if job.scheduled == next {
            return;
        }
        let scheduled = std::mem::replace(&mut job.scheduled, next);
        let due = Due::Job {
            endpoint: endpoint.to_owned(),
            id: id.to_owned(),
        };
        self.deadlines.reschedule(due, scheduled, next);
    }

    /// Deletes job `id`'s record and its entry in the ticker's index (not its place in
    /// `pending`: see [`super::EndpointQueue::unqueue`]); its waiters find it gone.
    pub(crate) fn remove_job(&mut self, endpoint: &str, id: &str) -> Option<JobRecord> {
        let record = self.endpoints.get_mut(endpoint)?.jobs.remove(id)?;
        let due = Due::Job {
            endpoint: endpoint.to_owned(),
            id: id.to_owned(),
        };
        self.deadlines.reschedule(due, record.scheduled, None);
        self.job_changed(id);
        Some(record)
    }

    /// Keeps `ping` as its worker's latest; a worker seen for the first time gets its entry
    /// in the ticker's index, `lease_timeout` on.
    pub(crate) fn note_ping(&mut self, endpoint: &str, ping: PingRecord, lease_timeout: Duration) {
        let stale_at = ping.at.checked_add(lease_timeout);
        let worker = ping.worker.clone();
        let known = self
            .endpoint(endpoint)
            .workers
            .insert(worker.clone(), ping)
            .is_some();
        if !known {
            let due = Due::Worker {
                endpoint: endpoint.to_owned(),
                worker,
            };
            self.deadlines.reschedule(due, None, stale_at);
        }
    }

    /// Forgets `worker` of `endpoint` if its latest ping is `lease_timeout` old; otherwise
    /// sets its entry again for when that ping goes stale. Returns whether it was forgotten.
    pub(crate) fn forget_worker_if_stale(
        &mut self,
        endpoint: &str,
        worker: &str,
        lease_timeout: Duration,
        now: Instant,
    ) -> bool {
        let Some(queue) = self.endpoints.get_mut(endpoint) else {
            return false;
        };
        let Some(ping) = queue.workers.get(worker) else {
            return false;
        };
        match ping.at.checked_add(lease_timeout) {
            Some(stale_at) if stale_at <= now => {
                queue.workers.remove(worker);
                true
            }
            later => {
                let due = Due::Worker {
                    endpoint: endpoint.to_owned(),
                    worker: worker.to_owned(),
                };
                self.deadlines.reschedule(due, None, later);
                false
            }
        }
    }

    /// Drops `endpoint`'s queue if nothing is kept in it any more (any id in a path makes a
    /// queue; a long-running mock forgets the ones left empty).
    pub(crate) fn forget_if_idle(&mut self, endpoint: &str) {
        if self.endpoints.get(endpoint).is_some_and(|q| q.is_idle()) {
            self.endpoints.remove(endpoint);
        }
    }
}
