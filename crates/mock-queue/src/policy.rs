//! The platform's rules for what a client may ask of a job, checked at submission: the `policy`
//! fields' types and ranges, the `webhook` URL, and `?wait=` (clamped, as the platform does).
//! Every refusal names the field it is about.

use std::time::Duration;

use serde_json::Value;

/// The longest `policy.executionTimeout` and `policy.ttl` (7 days), in ms.
const MAX_POLICY_MS: u64 = 7 * 24 * 3600 * 1000;
/// The shortest `policy.executionTimeout` the platform accepts, in ms.
const MIN_EXECUTION_TIMEOUT_MS: u64 = 5_000;
/// The shortest `policy.ttl` the platform accepts, in ms.
const MIN_TTL_MS: u64 = 10_000;
/// The `?wait=` range of `/runsync` and `/status-sync`, in ms; values outside are clamped.
const WAIT_MS: (f64, f64) = (1_000.0, 300_000.0);
/// `?wait=` when none is given (the platform's default).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(90);
/// The longest webhook URL accepted.
const MAX_WEBHOOK_LEN: usize = 2048;

/// A request field the platform would refuse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct FieldError {
    /// The field, as the client wrote it (`policy.ttl`, `webhook`, `wait`).
    pub field: String,
    /// What is wrong with it, and what is accepted.
    pub problem: String,
}

impl FieldError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Checks a submitted `policy`: an object of `executionTimeout` (ms, 5 s–7 days), `ttl`
/// (ms, 10 s–7 days) and `lowPriority` (a boolean), nothing else. With `strict_minimums`
/// off, any positive duration is accepted (tests).
pub fn check_policy(policy: &Value, strict_minimums: bool) -> Result<(), FieldError> {
    let Value::Object(fields) = policy else {
        return Err(FieldError::new(
            "policy",
            "must be a JSON object like {\"executionTimeout\": 600000, \"ttl\": 86400000}",
        ));
    };
    for (key, value) in fields {
        let field = format!("policy.{key}");
        match key.as_str() {
            "executionTimeout" => {
                check_ms(&field, value, MIN_EXECUTION_TIMEOUT_MS, strict_minimums)?
            }
            "ttl" => check_ms(&field, value, MIN_TTL_MS, strict_minimums)?,
            "lowPriority" if value.is_boolean() => {}
            "lowPriority" => return Err(FieldError::new(field, "must be true or false")),
            _ => {
                return Err(FieldError::new(
                    field,
                    "is not a policy field (executionTimeout, ttl, lowPriority)",
                ))
            }
        }
    }
    Ok(())
}

fn check_ms(field: &str, value: &Value, min: u64, strict_minimums: bool) -> Result<(), FieldError> {
    let min = if strict_minimums { min } else { 1 };
    match value.as_u64() {
        Some(ms) if (min..=MAX_POLICY_MS).contains(&ms) => Ok(()),
        _ => Err(FieldError::new(
            field,
            format!(
                "must be a whole number of milliseconds from {min} to {MAX_POLICY_MS} (7 days); got {value}"
            ),
        )),
    }
}

/// Checks a submitted `webhook`: an absolute http or https URL with a host.
pub fn check_webhook(webhook: &Value, allow_private: bool) -> Result<(), FieldError> {
    let problem = "must be an absolute http:// or https:// URL, like https://example.com/hook";
    let Some(text) = webhook.as_str() else {
        return Err(FieldError::new("webhook", problem));
    };
    if text.len() > MAX_WEBHOOK_LEN {
        return Err(FieldError::new(
            "webhook",
            format!("is longer than {MAX_WEBHOOK_LEN} characters"),
        ));
    }
    let url = match url::Url::parse(text) {
        Ok(url)
            if matches!(url.scheme(), "http" | "https")
                && url.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            url
        }
        _ => {
            return Err(FieldError::new(
                "webhook",
                format!("{problem}; got {text:?}"),
            ))
        }
    };
    if !allow_private && names_an_internal_host(&url) {
        return Err(FieldError::new("webhook", PRIVATE_WEBHOOK));
    }
    Ok(())
}

/// Why a webhook to this machine or its network is refused.
pub const PRIVATE_WEBHOOK: &str = "is a private, loopback or link-local address, which the \
    queue does not call (start the mock with --allow-private-webhooks to call one)";

/// Whether `url`'s host is an internal address as written (an IP, or `localhost`). A name
/// that resolves to one is caught when the webhook is delivered.
fn names_an_internal_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => runpod_protocol::address::is_internal(ip.into()),
        Some(url::Host::Ipv6(ip)) => runpod_protocol::address::is_internal(ip.into()),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
        None => false,
    }
}

/// Reads `?wait=` (ms): absent is the default; any number is clamped to 1–300 s, as the
/// platform does; anything else is refused.
pub fn parse_wait(raw: Option<&str>) -> Result<Duration, FieldError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_WAIT);
    };
    match raw.trim().parse::<f64>() {
        Ok(ms) if ms.is_finite() => {
            let ms = ms.clamp(WAIT_MS.0, WAIT_MS.1);
            Ok(Duration::from_millis(ms.round() as u64))
        }
        _ => Err(FieldError::new(
            "wait",
            format!(
                "must be a number of milliseconds ({} to {}); got {raw:?}",
                WAIT_MS.0, WAIT_MS.1
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn policy_fields_are_checked_against_the_documented_types_and_ranges() {
        let ok = json!({"executionTimeout": 5000, "ttl": 604_800_000u64, "lowPriority": true});
        assert_eq!(check_policy(&ok, true), Ok(()));
        let field_of = |policy: Value, strict| check_policy(&policy, strict).unwrap_err().field;
        assert_eq!(
            field_of(json!({"executionTimeout": 4999}), true),
            "policy.executionTimeout"
        );
        assert_eq!(
            field_of(json!({"executionTimeout": "600"}), true),
            "policy.executionTimeout"
        );
        assert_eq!(
            field_of(json!({"executionTimeout": 1.5}), true),
            "policy.executionTimeout"
        );
        assert_eq!(field_of(json!({"ttl": 9999}), true), "policy.ttl");
        assert_eq!(
            field_of(json!({"ttl": 604_800_001u64}), false),
            "policy.ttl"
        );
        assert_eq!(field_of(json!({"ttl": 0}), false), "policy.ttl");
        assert_eq!(
            field_of(json!({"lowPriority": "yes"}), true),
            "policy.lowPriority"
        );
        assert_eq!(field_of(json!({"priority": 1}), true), "policy.priority");
        assert_eq!(field_of(json!([1]), true), "policy");
        assert_eq!(
            check_policy(&json!({"executionTimeout": 200, "ttl": 200}), false),
            Ok(()),
            "relaxed minimums"
        );
    }

    #[test]
    fn webhooks_must_be_absolute_http_urls() {
        assert_eq!(
            check_webhook(&json!("https://example.com/hook?x=1"), false),
            Ok(())
        );
        assert_eq!(check_webhook(&json!("http://127.0.0.1:9/h"), true), Ok(()));
        assert!(check_webhook(&json!("http://127.0.0.1:9/h"), false).is_err());
        for bad in [
            json!("x"),
            json!("ftp://example.com/"),
            json!("http://"),
            json!(7),
        ] {
            assert_eq!(
                check_webhook(&bad, true).unwrap_err().field,
                "webhook",
                "{bad}"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_WEBHOOK_LEN));
        assert!(check_webhook(&json!(long), true).is_err());
    }

    #[test]
    fn wait_is_clamped_to_the_platform_range_and_a_non_number_is_refused() {
        assert_eq!(parse_wait(None), Ok(DEFAULT_WAIT));
        assert_eq!(parse_wait(Some("5000")), Ok(Duration::from_secs(5)));
        assert_eq!(parse_wait(Some("1")), Ok(Duration::from_secs(1)));
        assert_eq!(parse_wait(Some("-5")), Ok(Duration::from_secs(1)));
        assert_eq!(parse_wait(Some("1e30")), Ok(Duration::from_secs(300)));
        assert_eq!(parse_wait(Some("2500.4")), Ok(Duration::from_millis(2500)));
        for bad in ["abc", "", "NaN", "inf"] {
            assert_eq!(parse_wait(Some(bad)).unwrap_err().field, "wait", "{bad:?}");
        }
    }
}
