//! A `/runsync` or `/stream` body, read as the queue API's `/runsync` reads it:
//! `{"input": {...}, "policy"?: {"executionTimeout"?: ms}}`. Whatever is wrong is named by its
//! field, so the client can fix it.

use std::time::Duration;

use serde_json::{Map, Value};

use runpod_protocol::job::{kind_of, oversized_integer_problem};
use runpod_protocol::limits::LOAD_BALANCER_REQUEST_TIMEOUT;

/// A request that can be run.
#[derive(Debug, PartialEq)]
pub(super) struct RunRequest {
    /// The job's input.
    pub input: Value,
    /// The request's whole time: `policy.executionTimeout`, at most the balancer's.
    pub deadline: Duration,
}

/// Reads a body; the error names the field at fault.
pub(super) fn parse(body: &[u8]) -> Result<RunRequest, String> {
    if body.is_empty() {
        return Err(r#"the body is empty: send {"input": {...}}"#.to_owned());
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    // Valid JSON is UTF-8: the text is there to scan.
    let text = std::str::from_utf8(body).unwrap_or_default();
    if let Some(problem) = oversized_integer_problem(text, "body") {
        return Err(problem);
    }
    let Value::Object(mut body) = value else {
        return Err(r#"the body must be a JSON object such as {"input": {...}}"#.to_owned());
    };
    let input = match body.remove("input") {
        None => return Err(r#"input: required, an object such as {"task": "echo"}"#.to_owned()),
        Some(input @ Value::Object(_)) => input,
        Some(other) => return Err(format!("input: must be an object, not {}", kind_of(&other))),
    };
    if body.contains_key("webhook") {
        // The answer is this response; and a worker fetches no URL a job input could not.
        return Err(
            "webhook: not served by a load-balancing endpoint (the result is this response)"
                .to_owned(),
        );
    }
    let deadline = match body.get("policy") {
        None | Some(Value::Null) => LOAD_BALANCER_REQUEST_TIMEOUT,
        Some(Value::Object(policy)) => deadline_of(policy)?,
        Some(other) => return Err(format!("policy: must be an object, not {}", kind_of(other))),
    };
    Ok(RunRequest { input, deadline })
}

fn deadline_of(policy: &Map<String, Value>) -> Result<Duration, String> {
    let Some(timeout) = policy.get("executionTimeout") else {
        return Ok(LOAD_BALANCER_REQUEST_TIMEOUT);
    };
    let ms = timeout.as_u64().filter(|ms| *ms > 0).ok_or_else(|| {
        format!(
            "policy.executionTimeout: must be a positive whole number of milliseconds, not {timeout}"
        )
    })?;
    Ok(Duration::from_millis(ms).min(LOAD_BALANCER_REQUEST_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_with_an_input_runs_within_the_balancers_time() {
        let request = parse(br#"{"input": {"task": "echo"}}"#).unwrap();
        assert_eq!(request.input["task"], "echo");
        assert_eq!(request.deadline, LOAD_BALANCER_REQUEST_TIMEOUT);
        let request = parse(br#"{"input": {}, "policy": {"executionTimeout": 1500}}"#).unwrap();
        assert_eq!(request.deadline, Duration::from_millis(1500));
        let request = parse(br#"{"input": {}, "policy": {"executionTimeout": 9000000}}"#).unwrap();
        assert_eq!(request.deadline, LOAD_BALANCER_REQUEST_TIMEOUT);
    }

    #[test]
    fn each_malformed_body_names_its_field() {
        for (body, field) in [
            (&b""[..], "empty"),
            (b"{", "not JSON"),
            (b"[1]", "JSON object"),
            (b"{}", "input: required"),
            (
                br#"{"input": "hi"}"#,
                "input: must be an object, not a string",
            ),
            (br#"{"input": {}, "policy": 3}"#, "policy: must be"),
            (
                br#"{"input": {}, "policy": {"executionTimeout": -1}}"#,
                "policy.executionTimeout",
            ),
            (br#"{"input": {}, "webhook": "http://x"}"#, "webhook"),
            (
                br#"{"input": {"n": 123456789012345678901234567890}}"#,
                "beyond 64 bits",
            ),
        ] {
            let error = parse(body).unwrap_err();
            assert!(error.contains(field), "{error}");
        }
    }
}
