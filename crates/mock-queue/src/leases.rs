//! Time-driven job changes: lease expiry (requeue), `policy.executionTimeout` (stop, then
//! TIMED_OUT), `policy.ttl` (deletion) and the end of a finished job's retention (deletion),
//! checked on a short tick, with whatever else would otherwise pile up; and webhook delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::jobs::JobState;
use super::state::{EndpointQueue, MockState};

/// How often leases and deadlines are checked.
const TICK: Duration = Duration::from_millis(100);

/// Runs the checks until `stop`.
pub(super) async fn run(state: Arc<MockState>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let hooks = state.with(|inner| {
            let now = Instant::now();
            let mut hooks = Vec::new();
            inner.ticker.ticks += 1;
            for queue in inner.endpoints.values_mut() {
                inner.ticker.visited += (queue.jobs.len() + queue.workers.len()) as u64;
                hooks.extend(expire(queue, &state.options, now));
                forget(queue, &state.options, now);
            }
            if !state.options.record_history {
                // Any id in a path makes a queue; one with nothing left in it goes.
                inner.endpoints.retain(|_, queue| !queue.is_idle());
            }
            hooks
        });
        state.wake();
        for (url, body) in hooks {
            tokio::spawn(deliver_webhook(state.clone(), url, body));
        }
    }
}

/// Applies every deadline that has passed; returns the webhooks to deliver.
fn expire(
    queue: &mut EndpointQueue,
    options: &super::options::MockOptions,
    now: Instant,
) -> Vec<(String, Value)> {
    let mut hooks = Vec::new();
    let ids: Vec<String> = queue.jobs.keys().cloned().collect();
    for id in ids {
        let Some(job) = queue.jobs.get(&id) else {
            continue;
        };
        if now.saturating_duration_since(job.submitted) > job.ttl {
            let holder = job.holder.clone();
            queue.jobs.remove(&id);
            queue.unqueue(&id);
            if let Some(worker) = holder {
                queue.stop(&worker, &id);
            }
            tracing::info!(job_id = %id, "ttl reached: job deleted");
            continue;
        }
        if job.retention_over(now) {
            queue.jobs.remove(&id);
            // A stop signal for it that no worker collected is moot now.
            for ids in queue.stops.values_mut() {
                ids.retain(|stop| stop != &id);
            }
            queue.stops.retain(|_, ids| !ids.is_empty());
            continue;
        }
        if job.state != JobState::InProgress {
            continue;
        }
        let started = job.started.unwrap_or(job.submitted);
        let timed_out =
            now.saturating_duration_since(started) > job.execution_timeout + options.timeout_grace;
        let lease_lost = job.lease_until.is_some_and(|until| now > until);
        let Some(job) = queue.jobs.get_mut(&id) else {
            continue;
        };
        let holder = job.holder.take();
        if timed_out {
            job.state = JobState::TimedOut;
            job.finished = Some(now);
            job.lease_until = None;
            if let Some(url) = job.webhook.clone() {
                hooks.push((url, job.status_body(&id)));
            }
            if let Some(worker) = holder {
                queue.stop(&worker, &id);
            }
            tracing::info!(job_id = %id, "execution timeout: job TIMED_OUT");
        } else if lease_lost {
            job.state = JobState::InQueue;
            job.lease_until = None;
            job.retries += 1;
            let raw = job.raw.clone();
            queue.retried += 1;
            queue.pending.push_front(raw);
            tracing::info!(
                job_id = %id,
                "lease expired (worker {} stopped pinging it): job requeued",
                holder.as_deref().unwrap_or("?")
            );
        } else {
            job.holder = holder;
        }
    }
    hooks
}

/// Drops what no one needs any more: workers that have not pinged for a lease (`/health`
/// no longer counts them).
fn forget(queue: &mut EndpointQueue, options: &super::options::MockOptions, now: Instant) {
    queue
        .workers
        .retain(|_, ping| now.saturating_duration_since(ping.at) < options.lease_timeout);
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
pub(super) async fn deliver_webhook(state: Arc<MockState>, url: String, body: Value) {
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
            .json(&body)
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
