//! Wire types of the worker API, shared by the client and the mock: the job object a take
//! returns, and how a take's body is read.

use std::time::Duration;

use serde_json::{Map, Value};

/// A job as the queue hands it out. Keys other than `id` and `input` (`webhook`, `policy`,
/// `batchId`, ...) are kept in `raw`, as the SDK passes them through.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The job id, used in the done and stream URLs.
    pub id: String,
    /// The job's input (any JSON; our handlers need an object with `task`).
    pub input: Value,
    /// The whole job object.
    pub raw: Map<String, Value>,
}

impl Job {
    /// `policy.executionTimeout` (ms) when the job carries one.
    pub fn policy_execution_timeout(&self) -> Option<Duration> {
        let ms = self.raw.get("policy")?.get("executionTimeout")?.as_u64()?;
        (ms > 0).then(|| Duration::from_millis(ms))
    }
}

/// A job that cannot be run as handed out. With an `id` it is answered with an `InvalidInput`
/// result; without one nobody can be answered, so it is logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadJob {
    /// The job id, when the object had a string `id`.
    pub id: Option<String>,
    /// What is wrong, for the error result and the log.
    pub problem: String,
}

/// Reads one element of a take's body.
pub fn parse_job(value: Value) -> Result<Job, BadJob> {
    let Value::Object(raw) = value else {
        return Err(BadJob {
            id: None,
            problem: format!("a job must be a JSON object, got {}", kind_of(&value)),
        });
    };
    let id = match raw.get("id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(BadJob {
                id: None,
                problem: format!(
                    "job `id` must be a non-empty string, got {}",
                    kind_of(other)
                ),
            })
        }
        None => {
            return Err(BadJob {
                id: None,
                problem: "job has no `id`".to_owned(),
            })
        }
    };
    let Some(input) = raw.get("input").cloned() else {
        return Err(BadJob {
            id: Some(id),
            problem: "job has no `input`".to_owned(),
        });
    };
    Ok(Job { id, input, raw })
}

/// Reads a take's body: nothing (no job), one job object, or an array of them (a batch).
/// `Err` means the body is not a job at all (not JSON, or JSON of another shape).
pub fn parse_take_body(body: &[u8]) -> Result<Vec<Result<Job, BadJob>>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("job-take answered with a body that is not JSON ({e})"))?;
    match value {
        Value::Array(items) => Ok(items.into_iter().map(parse_job).collect()),
        Value::Object(_) => Ok(vec![parse_job(value)]),
        Value::Null => Ok(Vec::new()),
        other => Err(format!(
            "job-take answered with JSON {}, not a job",
            kind_of(&other)
        )),
    }
}

/// "an object", "a string", ... for messages.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn single_and_batch_bodies_give_jobs_with_their_extra_keys() {
        let one = parse_take_body(br#"{"id":"j1","input":{"task":"echo"},"webhook":"http://h"}"#)
            .unwrap();
        let job = one[0].as_ref().unwrap();
        assert_eq!(job.id, "j1");
        assert_eq!(job.raw["webhook"], "http://h");
        let batch = parse_take_body(br#"[{"id":"a","input":{}},{"id":"b","input":1}]"#).unwrap();
        assert_eq!(batch.len(), 2);
        assert!(parse_take_body(b"").unwrap().is_empty());
        assert!(parse_take_body(b"[]").unwrap().is_empty());
    }

    #[test]
    fn malformed_jobs_say_what_is_missing_and_keep_the_id_when_there_is_one() {
        let jobs = parse_take_body(br#"[{"input":{}},{"id":"x"},7,{"id":{},"input":{}}]"#).unwrap();
        let problems: Vec<_> = jobs.into_iter().map(|j| j.unwrap_err()).collect();
        assert_eq!(
            problems[0],
            BadJob {
                id: None,
                problem: "job has no `id`".into()
            }
        );
        assert_eq!(problems[1].id.as_deref(), Some("x"));
        assert!(problems[1].problem.contains("no `input`"));
        assert!(problems[2].problem.contains("a number"));
        assert!(problems[3].problem.contains("an object"));
    }

    #[test]
    fn garbage_bodies_are_errors_not_jobs() {
        assert!(parse_take_body(b"<html>oops</html>").is_err());
        assert!(parse_take_body(b"\"hello\"").is_err());
    }

    #[test]
    fn policy_execution_timeout_is_read_in_milliseconds() {
        let job =
            parse_job(json!({"id":"j","input":{},"policy":{"executionTimeout":5000}})).unwrap();
        assert_eq!(job.policy_execution_timeout(), Some(Duration::from_secs(5)));
        let job = parse_job(json!({"id":"j","input":{}})).unwrap();
        assert_eq!(job.policy_execution_timeout(), None);
    }
}
