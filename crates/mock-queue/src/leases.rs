//! Time-driven job changes: lease expiry (requeue), `policy.executionTimeout` (stop, then
//! TIMED_OUT), `policy.ttl` (deletion) and the end of a finished job's retention (deletion),
//! checked on a short tick, with whatever else would otherwise pile up (stale workers, empty
//! queues); and webhook delivery. A tick takes from the index of deadlines
//! ([`super::deadlines`]) only the jobs and workers that are due: its cost does not grow with
//! the jobs kept.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::deadlines::Due;
use super::jobs::JobState;
use super::options::MockOptions;
use super::state::{Inner, MockState};

/// How often leases and deadlines are checked.
const TICK: Duration = Duration::from_millis(100);

/// A gap between two ticks this long means the mock itself did not run meanwhile.
const PAUSED: Duration = Duration::from_secs(2);

/// Runs the checks until `stop`.
pub(super) async fn run(state: Arc<MockState>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(TICK);
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = Instant::now();
        let paused = now.saturating_duration_since(last_tick);
        last_tick = now;
        if paused > PAUSED {
            // The mock itself was stopped (SIGSTOP, a frozen `local`): its workers could not
            // ping it meanwhile, and their leases must not all run out at once on resume.
            // Each holder gets a lease from now, as if it had pinged as the mock resumed.
            let renewed = state.with(|inner| inner.renew_leases(now + state.options.lease_timeout));
            tracing::warn!(
                "the mock queue was paused {:.1} s: {renewed} lease(s) renewed from now rather \
                 than expired",
                paused.as_secs_f64()
            );
        }
        let expired = state.with(|inner| expire(inner, &state.options, now));
        if expired.requeued || expired.stopped {
            state.wake();
        }
        for (url, body) in expired.hooks {
            tokio::spawn(deliver_webhook(state.clone(), url, body));
        }
    }
}

/// What a tick did that others must hear of.
#[derive(Debug, Default)]
struct Expired {
    /// Webhooks to deliver: the URL and the `/status` body.
    hooks: Vec<(String, String)>,
    /// A job went back to the queue (a held take may have it).
    requeued: bool,
    /// A worker was told to stop a job (its job-stop long-poll may have it).
    stopped: bool,
}

/// Applies every deadline that has passed, looking only at the jobs and workers whose entry
/// in the index is due.
fn expire(inner: &mut Inner, options: &MockOptions, now: Instant) -> Expired {
    let mut expired = Expired::default();
    let due = inner.deadlines.take_due(now);
    inner.ticker.ticks += 1;
    inner.ticker.visited += due.len() as u64;
    // Queued jobs past their ttl leave `pending` in one pass per endpoint, not one each.
    let mut unqueue: HashMap<String, HashSet<String>> = HashMap::new();
    let mut touched = BTreeSet::new();
    for (at, due) in due {
        match due {
            Due::Job { endpoint, id } => {
                let job = inner
                    .endpoints
                    .get_mut(&endpoint)
                    .and_then(|queue| queue.jobs.get_mut(&id));
                match job {
                    // Its entry, just taken out.
                    Some(job) if job.scheduled == Some(at) => job.scheduled = None,
                    // An entry left by a record since replaced (a test queued the same id
                    // again): that record has its own.
                    _ => continue,
                }
                match expire_job(inner, &endpoint, &id, options, now, &mut expired) {
                    Outcome::Deleted { queued: true } => {
                        unqueue.entry(endpoint.clone()).or_default().insert(id);
                    }
                    Outcome::Deleted { queued: false } => {}
                    Outcome::Changed => {
                        inner.reschedule(&endpoint, &id);
                        inner.job_changed(&id);
                    }
                    // A renewed lease: only its entry moves.
                    Outcome::Unchanged => inner.reschedule(&endpoint, &id),
                }
                touched.insert(endpoint);
            }
            Due::Worker { endpoint, worker } => {
                inner.forget_worker_if_stale(&endpoint, &worker, options.lease_timeout, now);
                touched.insert(endpoint);
            }
        }
    }
    for (endpoint, ids) in unqueue {
        if let Some(queue) = inner.endpoints.get_mut(&endpoint) {
            queue
                .pending
                .retain(|job| !job.id().is_some_and(|id| ids.contains(id)));
        }
    }
    if !options.record_history {
        for endpoint in &touched {
            inner.forget_if_idle(endpoint);
        }
    }
    expired
}

/// What a due deadline did to a job.
enum Outcome {
    /// Deleted (ttl, retention); `queued`: it must leave `pending` too.
    Deleted { queued: bool },
    /// Timed out, or requeued after its lease.
    Changed,
    /// Nothing yet (a renewed lease), or the job is gone.
    Unchanged,
}

/// Applies job `id`'s deadlines that have passed.
fn expire_job(
    inner: &mut Inner,
    endpoint: &str,
    id: &str,
    options: &MockOptions,
    now: Instant,
    expired: &mut Expired,
) -> Outcome {
    let Some(queue) = inner.endpoints.get_mut(endpoint) else {
        return Outcome::Unchanged;
    };
    let Some(job) = queue.jobs.get_mut(id) else {
        return Outcome::Unchanged;
    };
    if now.saturating_duration_since(job.submitted) > job.ttl {
        let holder = job.holder.clone();
        let queued = job.state == JobState::InQueue;
        if let Some(worker) = holder {
            queue.stop(&worker, id);
            expired.stopped = true;
        }
        inner.remove_job(endpoint, id);
        tracing::info!(job_id = %id, "ttl reached: job deleted");
        return Outcome::Deleted { queued };
    }
    if job.retention_over(now) {
        // A stop signal for it that no worker collected is moot now.
        for ids in queue.stops.values_mut() {
            ids.retain(|stop| stop != id);
        }
        queue.stops.retain(|_, ids| !ids.is_empty());
        inner.remove_job(endpoint, id);
        return Outcome::Deleted { queued: false };
    }
    if job.state != JobState::InProgress {
        return Outcome::Unchanged;
    }
    let started = job.started.unwrap_or(job.submitted);
    let timed_out =
        now.saturating_duration_since(started) > job.execution_timeout + options.timeout_grace;
    let lease_lost = job.lease_until.is_some_and(|until| now > until);
    if timed_out {
        let holder = job.holder.take();
        job.state = JobState::TimedOut;
        job.finished = Some(now);
        job.lease_until = None;
        if let Some(url) = job.webhook.clone() {
            expired.hooks.push((url, job.status_body(id)));
        }
        if let Some(worker) = holder {
            queue.stop(&worker, id);
            expired.stopped = true;
        }
        tracing::info!(job_id = %id, "execution timeout: job TIMED_OUT");
    } else if lease_lost {
        let holder = job.holder.take();
        job.lease_lost_by.clone_from(&holder);
        job.state = JobState::InQueue;
        job.lease_until = None;
        job.retries += 1;
        let body = job.body.clone();
        queue.retried += 1;
        queue.pending.push_front(body);
        expired.requeued = true;
        tracing::info!(
            job_id = %id,
            "lease expired (worker {} stopped pinging it): job requeued",
            holder.as_deref().unwrap_or("?")
        );
    } else {
        return Outcome::Unchanged;
    }
    Outcome::Changed
}

/// Whether the webhook's host resolves to an internal address (a name that was not one as
/// written, at submission).
async fn resolves_internal(url: &str) -> bool {
    let Ok(url) = url::Url::parse(url) else {
        return true;
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return true;
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    match tokio::net::lookup_host((host, port)).await {
        Ok(addresses) => addresses
            .into_iter()
            .any(|a| runpod_protocol::address::is_internal(a.ip())),
        // Unresolvable: the POST would fail anyway.
        Err(_) => false,
    }
}

/// POSTs the final `/status` body to the job's webhook: three attempts in all.
pub(super) async fn deliver_webhook(state: Arc<MockState>, url: String, body: String) {
    if !state.options.allow_private_webhooks && resolves_internal(&url).await {
        tracing::warn!(
            "webhook {url} not called: its host {}",
            super::policy::PRIVATE_WEBHOOK
        );
        return;
    }
    for attempt in 1..=3 {
        let sent = state
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => tracing::warn!(
                "webhook {url} answered {} (attempt {attempt})",
                response.status()
            ),
            Err(e) => tracing::warn!(
                "webhook {url} failed: {} (attempt {attempt})",
                e.without_url()
            ),
        }
        if attempt < 3 {
            tokio::time::sleep(state.options.webhook_retry_delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn job(inner: &mut Inner) -> &mut super::super::JobRecord {
        inner.endpoint("ep").jobs.get_mut("a").unwrap()
    }

    #[test]
    fn a_job_is_looked_at_when_its_deadline_comes_and_a_renewed_lease_moves_it() {
        let options = MockOptions {
            record_history: false,
            ..MockOptions::default()
        };
        let mut inner = Inner::default();
        inner.push("ep", json!({"id": "a", "input": {}}), 60 * SECOND);
        let t0 = job(&mut inner).submitted;
        // Taken, with a 30 s lease.
        inner.endpoint("ep").pending.clear();
        let record = job(&mut inner);
        record.state = JobState::InProgress;
        record.holder = Some("w".into());
        record.started = Some(t0);
        record.lease_until = Some(t0 + 30 * SECOND);
        inner.reschedule("ep", "a");

        let visited = |inner: &Inner| inner.ticker.visited;
        expire(&mut inner, &options, t0 + 10 * SECOND);
        assert_eq!(visited(&inner), 0, "nothing due");
        // A ping renews the lease; the entry is found at its old time and moved.
        job(&mut inner).lease_until = Some(t0 + 50 * SECOND);
        expire(&mut inner, &options, t0 + 31 * SECOND);
        assert_eq!(visited(&inner), 1);
        assert_eq!(job(&mut inner).state, JobState::InProgress);
        expire(&mut inner, &options, t0 + 40 * SECOND);
        assert_eq!(visited(&inner), 1, "looked at once per lease, not per tick");
        inner.changed_jobs.clear();
        let expired = expire(&mut inner, &options, t0 + 51 * SECOND);
        assert!(expired.requeued);
        assert_eq!(job(&mut inner).state, JobState::InQueue);
        assert_eq!(inner.endpoint("ep").pending.len(), 1);
        assert_eq!(inner.changed_jobs, ["a"], "its waiters are told");

        // Ended: deleted when its retention is over, and its empty queue with it.
        inner.endpoint("ep").pending.clear();
        let record = job(&mut inner);
        record.state = JobState::Completed;
        record.finished = Some(t0 + 52 * SECOND);
        inner.reschedule("ep", "a");
        expire(&mut inner, &options, t0 + 100 * SECOND);
        assert!(inner
            .endpoints
            .get("ep")
            .is_some_and(|q| q.jobs.contains_key("a")));
        expire(&mut inner, &options, t0 + 113 * SECOND);
        assert!(inner.endpoints.is_empty(), "{:?}", inner.endpoints.keys());
        assert_eq!(
            visited(&inner),
            3,
            "the renewed lease, the lost one, the retention"
        );
    }
}
