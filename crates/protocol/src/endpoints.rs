//! The queue URLs, built from the `RUNPOD_*` environment exactly as the official SDK does
//! (docs/runpod-protocol.md §1.2–1.3).
//!
//! `$ID` is the worker id in `RUNPOD_WEBHOOK_GET_JOB` and the job id in the output and stream
//! templates; `$RUNPOD_POD_ID` is replaced by the worker id in the output, stream and ping
//! templates only. Query parameters are appended with `&`, or `?` when the template has none
//! (the SDK would mangle the path there).

use std::time::Duration;

use crate::ApiKey;

/// Default heartbeat interval (the SDK's `RUNPOD_PING_INTERVAL` default, in ms).
pub const DEFAULT_PING_INTERVAL_MS: u64 = 10_000;
/// Shortest heartbeat interval honoured.
pub const MIN_PING_INTERVAL_MS: u64 = 100;
/// Longest heartbeat interval accepted: the platform's leases run out long before an hour
/// without a ping, so a larger value is a mistake, not a setting.
pub const MAX_PING_INTERVAL_MS: u64 = 3_600_000;

/// Why the environment does not describe a queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointsError {
    /// `RUNPOD_WEBHOOK_GET_JOB` is unset: not running on the platform.
    #[error(
        "RUNPOD_WEBHOOK_GET_JOB is not set, so there is no job queue to serve. On the platform it \
         is set for you; locally, run `runpod-worker local` (a mock queue and a worker in one \
         process), or `runpod-worker test-input` to run one job from handler/test_input.json"
    )]
    NoJobQueue,
    /// `RUNPOD_PING_INTERVAL` is not a number of milliseconds up to an hour.
    #[error(
        "RUNPOD_PING_INTERVAL must be a number of milliseconds, at most {MAX_PING_INTERVAL_MS} \
         (an hour), got {0:?}"
    )]
    BadPingInterval(String),
    /// The take URL is not an http(s) URL: every take would fail, forever.
    #[error("RUNPOD_WEBHOOK_GET_JOB must be an http:// or https:// URL, got {0:?}")]
    BadJobQueueUrl(String),
}

/// Every URL the worker talks to, with the worker id already substituted.
#[derive(Debug, Clone)]
pub struct QueueEndpoints {
    /// The worker id (`RUNPOD_POD_ID`, else a random UUID, as in the SDK).
    pub worker_id: String,
    /// Sent verbatim as `Authorization`.
    pub api_key: ApiKey,
    /// `RUNPOD_WEBHOOK_GET_JOB` with `$ID` replaced.
    pub job_get: String,
    /// `RUNPOD_WEBHOOK_POST_OUTPUT` with `$RUNPOD_POD_ID` replaced; `$ID` is the job id.
    pub job_done: String,
    /// `RUNPOD_WEBHOOK_POST_STREAM` likewise; `None` when unset (chunks cannot be sent).
    pub job_stream: Option<String>,
    /// `RUNPOD_WEBHOOK_PING` with `$RUNPOD_POD_ID` replaced; `None` when unset.
    pub ping: Option<String>,
    /// `RUNPOD_PING_INTERVAL` (ms, floored at 100 ms).
    pub ping_interval: Duration,
}

impl QueueEndpoints {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EndpointsError> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the variables through `var`, so tests need not touch the process environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, EndpointsError> {
        let job_get = var("RUNPOD_WEBHOOK_GET_JOB").ok_or(EndpointsError::NoJobQueue)?;
        let worker_id = var("RUNPOD_POD_ID").unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let probe_url = job_get.replace("$ID", &worker_id);
        let is_http = url::Url::parse(&probe_url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !is_http {
            return Err(EndpointsError::BadJobQueueUrl(job_get));
        }
        let ping_interval_ms = match var("RUNPOD_PING_INTERVAL") {
            None => DEFAULT_PING_INTERVAL_MS,
            Some(text) => text
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms <= MAX_PING_INTERVAL_MS)
                .ok_or_else(|| EndpointsError::BadPingInterval(text.clone()))?,
        };
        if ping_interval_ms < MIN_PING_INTERVAL_MS {
            tracing::warn!(
                "RUNPOD_PING_INTERVAL={ping_interval_ms} ms is below the floor: pinging every \
                 {MIN_PING_INTERVAL_MS} ms"
            );
        }
        let with_pod = |template: String| template.replace("$RUNPOD_POD_ID", &worker_id);
        Ok(Self {
            job_get: job_get.replace("$ID", &worker_id),
            // The SDK's defaults are placeholder strings that are not URLs; keep them so a
            // misconfigured worker fails loudly on its first result instead of silently.
            job_done: with_pod(
                var("RUNPOD_WEBHOOK_POST_OUTPUT").unwrap_or_else(|| "JOB_DONE_URL".into()),
            ),
            job_stream: var("RUNPOD_WEBHOOK_POST_STREAM").map(with_pod),
            ping: var("RUNPOD_WEBHOOK_PING").map(with_pod),
            api_key: ApiKey::new(var("RUNPOD_AI_API_KEY").unwrap_or_default()),
            ping_interval: Duration::from_millis(ping_interval_ms.max(MIN_PING_INTERVAL_MS)),
            worker_id,
        })
    }

    /// The environment a worker needs to serve endpoint `endpoint_id` of a queue at `base`
    /// (e.g. `http://127.0.0.1:8000`), in the shape the platform uses.
    pub fn env_for(
        base: &str,
        endpoint_id: &str,
        worker_id: &str,
        key: &str,
    ) -> Vec<(String, String)> {
        let root = format!("{}/v2/{endpoint_id}", base.trim_end_matches('/'));
        [
            (
                "RUNPOD_WEBHOOK_GET_JOB",
                format!("{root}/job-take/$ID?gpu=local"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                format!("{root}/job-done/$RUNPOD_POD_ID/$ID?gpu=local"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_STREAM",
                format!("{root}/job-stream/$RUNPOD_POD_ID/$ID?gpu=local"),
            ),
            (
                "RUNPOD_WEBHOOK_PING",
                format!("{root}/ping/$RUNPOD_POD_ID?gpu=local"),
            ),
            ("RUNPOD_POD_ID", worker_id.to_owned()),
            ("RUNPOD_AI_API_KEY", key.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The same, as endpoints (for in-process workers).
    pub fn for_queue(base: &str, endpoint_id: &str, worker_id: &str, key: &str) -> Self {
        let env = Self::env_for(base, endpoint_id, worker_id, key);
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        Self::from_vars(lookup).expect("env_for always sets RUNPOD_WEBHOOK_GET_JOB")
    }

    /// Single take: `GET_JOB&job_in_progress=0|1`.
    pub fn take_url(&self, job_in_progress: bool) -> String {
        append_query(
            &self.job_get,
            &format!("job_in_progress={}", u8::from(job_in_progress)),
        )
    }

    /// Batch take: `/job-take/` → `/job-take-batch/`, then `&batch_size=N&job_in_progress=0|1`.
    pub fn take_batch_url(&self, batch_size: usize, job_in_progress: bool) -> String {
        let base = self.job_get.replace("/job-take/", "/job-take-batch/");
        let with_size = append_query(&base, &format!("batch_size={batch_size}"));
        append_query(
            &with_size,
            &format!("job_in_progress={}", u8::from(job_in_progress)),
        )
    }

    /// Stop channel: `/job-take/` → `/job-stop/`, query kept; `None` if the template lacks
    /// `/job-take/` (the SDK disables the channel then).
    pub fn stop_url(&self) -> Option<String> {
        self.job_get
            .contains("/job-take/")
            .then(|| self.job_get.replace("/job-take/", "/job-stop/"))
    }

    /// job-done for `job_id`, with `isStream`.
    pub fn done_url(&self, job_id: &str, is_stream: bool) -> String {
        append_query(
            &self.job_done.replace("$ID", &path_segment(job_id)),
            &format!("isStream={is_stream}"),
        )
    }

    /// job-stream for `job_id` (`isStream=false`, as the SDK sends).
    pub fn stream_url(&self, job_id: &str) -> Option<String> {
        let template = self.job_stream.as_ref()?;
        Some(append_query(
            &template.replace("$ID", &path_segment(job_id)),
            "isStream=false",
        ))
    }
}

/// A job id as one URL path segment: `/`, `#`, `?`, spaces and the like are percent-encoded,
/// so an id cannot cut the query off or point the result at another path.
fn path_segment(id: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'<')
        .add(b'>')
        .add(b'?')
        .add(b'`')
        .add(b'{')
        .add(b'}')
        .add(b'/')
        .add(b'%')
        .add(b'\\')
        .add(b'^')
        .add(b'|')
        .add(b'[')
        .add(b']');
    percent_encoding::utf8_percent_encode(id, SEGMENT).to_string()
}

/// Appends `pair` to `url`'s query string.
fn append_query(url: &str, pair: &str) -> String {
    match url.find('?') {
        None => format!("{url}?{pair}"),
        Some(_) if url.ends_with('?') || url.ends_with('&') => format!("{url}{pair}"),
        Some(_) => format!("{url}&{pair}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    const SDK_ENV: &[(&str, &str)] = &[
        (
            "RUNPOD_WEBHOOK_GET_JOB",
            "http://q/v2/ep1/job-take/$ID?gpu=NVIDIA+H100",
        ),
        (
            "RUNPOD_WEBHOOK_POST_OUTPUT",
            "http://q/v2/ep1/job-done/$RUNPOD_POD_ID/$ID?gpu=NVIDIA+H100",
        ),
        (
            "RUNPOD_WEBHOOK_POST_STREAM",
            "http://q/v2/ep1/job-stream/$RUNPOD_POD_ID/$ID?gpu=NVIDIA+H100",
        ),
        (
            "RUNPOD_WEBHOOK_PING",
            "http://q/v2/ep1/ping/$RUNPOD_POD_ID?gpu=NVIDIA+H100",
        ),
        ("RUNPOD_POD_ID", "pod123"),
        ("RUNPOD_AI_API_KEY", "sk-test"),
        ("RUNPOD_PING_INTERVAL", "1500"),
    ];

    #[test]
    fn urls_are_templated_as_the_sdk_does() {
        let e = QueueEndpoints::from_vars(vars(SDK_ENV)).unwrap();
        assert_eq!(
            e.take_url(false),
            "http://q/v2/ep1/job-take/pod123?gpu=NVIDIA+H100&job_in_progress=0"
        );
        assert_eq!(
            e.take_batch_url(3, true),
            "http://q/v2/ep1/job-take-batch/pod123?gpu=NVIDIA+H100&batch_size=3&job_in_progress=1"
        );
        assert_eq!(
            e.stop_url().unwrap(),
            "http://q/v2/ep1/job-stop/pod123?gpu=NVIDIA+H100"
        );
        assert_eq!(
            e.done_url("job-1", false),
            "http://q/v2/ep1/job-done/pod123/job-1?gpu=NVIDIA+H100&isStream=false"
        );
        assert_eq!(
            e.stream_url("job-1").unwrap(),
            "http://q/v2/ep1/job-stream/pod123/job-1?gpu=NVIDIA+H100&isStream=false"
        );
        assert_eq!(
            e.ping.as_deref(),
            Some("http://q/v2/ep1/ping/pod123?gpu=NVIDIA+H100")
        );
        assert_eq!(e.ping_interval, Duration::from_millis(1500));
        assert_eq!(e.api_key.expose(), "sk-test");
    }

    #[test]
    fn job_ids_are_one_path_segment() {
        let e = QueueEndpoints::from_vars(vars(SDK_ENV)).unwrap();
        assert_eq!(
            e.done_url("a b#c/../d?x", false),
            "http://q/v2/ep1/job-done/pod123/a%20b%23c%2F..%2Fd%3Fx?gpu=NVIDIA+H100&isStream=false"
        );
    }

    #[test]
    fn pod_id_is_not_substituted_in_the_take_template() {
        let e = QueueEndpoints::from_vars(vars(&[
            (
                "RUNPOD_WEBHOOK_GET_JOB",
                "http://q/job-take/$RUNPOD_POD_ID?x=1",
            ),
            ("RUNPOD_POD_ID", "w"),
        ]))
        .unwrap();
        assert_eq!(
            e.take_url(false),
            "http://q/job-take/$RUNPOD_POD_ID?x=1&job_in_progress=0"
        );
    }

    #[test]
    fn templates_without_a_query_get_one() {
        let e =
            QueueEndpoints::from_vars(vars(&[("RUNPOD_WEBHOOK_GET_JOB", "http://q/job-take/$ID")]))
                .unwrap();
        assert!(
            e.take_url(true).contains("?job_in_progress=1"),
            "{}",
            e.take_url(true)
        );
    }

    #[test]
    fn missing_take_url_refuses_to_serve_and_stop_needs_job_take_in_the_path() {
        assert_eq!(
            QueueEndpoints::from_vars(vars(&[])).unwrap_err(),
            EndpointsError::NoJobQueue
        );
        let e = QueueEndpoints::from_vars(vars(&[("RUNPOD_WEBHOOK_GET_JOB", "http://q/take?x")]))
            .unwrap();
        assert!(e.stop_url().is_none());
        assert!(
            !e.worker_id.is_empty(),
            "a random worker id stands in for RUNPOD_POD_ID"
        );
    }

    #[test]
    fn ping_interval_is_milliseconds_with_a_floor() {
        let e = QueueEndpoints::from_vars(vars(&[
            ("RUNPOD_WEBHOOK_GET_JOB", "http://q/job-take/$ID?"),
            ("RUNPOD_PING_INTERVAL", "5"),
        ]))
        .unwrap();
        assert_eq!(e.ping_interval, Duration::from_millis(MIN_PING_INTERVAL_MS));
        let bad = QueueEndpoints::from_vars(vars(&[
            ("RUNPOD_WEBHOOK_GET_JOB", "http://q/job-take/$ID?"),
            ("RUNPOD_PING_INTERVAL", "10s"),
        ]));
        assert!(matches!(bad, Err(EndpointsError::BadPingInterval(_))));
        for too_long in ["18446744073709551615", "3600001"] {
            let refused = QueueEndpoints::from_vars(vars(&[
                ("RUNPOD_WEBHOOK_GET_JOB", "http://q/job-take/$ID?"),
                ("RUNPOD_PING_INTERVAL", too_long),
            ]));
            assert!(
                matches!(refused, Err(EndpointsError::BadPingInterval(_))),
                "{too_long}"
            );
        }
    }

    #[test]
    fn a_take_template_that_is_not_an_http_url_is_refused_at_start() {
        for bad in [
            "job-take/$ID",
            "ftp://q/job-take/$ID",
            "http://",
            "not a url",
        ] {
            let refused = QueueEndpoints::from_vars(vars(&[("RUNPOD_WEBHOOK_GET_JOB", bad)]));
            assert!(
                matches!(refused, Err(EndpointsError::BadJobQueueUrl(_))),
                "{bad}: {refused:?}"
            );
        }
    }
}
