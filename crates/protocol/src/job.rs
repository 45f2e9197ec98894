//! Wire types of the worker API: the job object a take returns, how the worker reads a take's
//! body, and the rules a job id must meet. The mock queue writes its take bodies itself and
//! keeps its own request parsing, so that it checks the worker independently; what both sides
//! share is in [`crate::limits`] and [`crate::ApiKey`].

use std::collections::HashMap;
use std::time::Duration;

use serde_json::value::RawValue;
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

/// Longest job id accepted. The platform's ids are UUIDs with a short prefix or suffix (under
/// 64 characters); a longer one would swell every heartbeat that lists it.
pub const MAX_ID_LEN: usize = 128;

/// Why a job id cannot be used as-is in the heartbeat's query and the result's URL path, or
/// `None` when it can: at most [`MAX_ID_LEN`] characters of `A-Z a-z 0-9 - _ . :`, and not `.`
/// or `..` (which a URL path resolves).
pub fn id_problem(id: &str) -> Option<String> {
    if id.len() > MAX_ID_LEN {
        return Some(format!(
            "the job id is {} bytes long, over the limit of {MAX_ID_LEN}",
            id.len()
        ));
    }
    let usable = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if id.is_empty() || id == "." || id == ".." || !id.chars().all(usable) {
        return Some(
            "the job id must be letters, digits, '-', '_', '.' or ':' (and not \".\" or \"..\")"
                .to_owned(),
        );
    }
    None
}

/// A job id as human log lines show it: control characters escaped, at most 64 characters
/// (a hostile id can neither forge a log line nor write a megabyte of one).
pub fn shown_id(id: &str) -> String {
    const SHOWN: usize = 64;
    let mut shown: String = id
        .chars()
        .take(SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    let total = id.chars().count();
    if total > SHOWN {
        shown.push_str(&format!("…({} more characters)", total - SHOWN));
    }
    shown
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

/// Limits on what one job may be, checked before the job is fully parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Largest job object, in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of arrays and objects in a job (below serde_json's own limit of 128).
    pub max_depth: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_bytes: crate::limits::MAX_RUNSYNC_BODY,
            max_depth: 64,
        }
    }
}

/// Reads a take's body: nothing (no job), one job object, or an array of them (a batch).
/// `Err` means the body is not a job at all (not JSON, or JSON of another shape).
///
/// One bad job must not cost the others, nor poison the take loop (a body that can never be
/// read would be retried forever while its jobs' leases run out and they come back). So the
/// body is first split into jobs without building them (serde_json's raw values are scanned
/// iteratively, at any depth), and each job is checked for size, nesting and UTF-8 before it is
/// parsed; a job that fails is answered by id when it has one.
pub fn parse_take_body(body: &[u8], limits: JobLimits) -> Result<Vec<Result<Job, BadJob>>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let (text, invalid_at) = decode_lossy(body);
    let top: &RawValue = serde_json::from_str(&text)
        .map_err(|e| format!("job-take answered with a body that is not JSON ({e})"))?;
    let raw_jobs: Vec<&RawValue> = match top.get().trim_start().as_bytes().first() {
        Some(b'[') => serde_json::from_str(top.get())
            .map_err(|e| format!("job-take batch is malformed ({e})"))?,
        Some(b'n') => Vec::new(),
        // An object is a job; any other JSON value is a job that cannot be answered (no id),
        // counted and logged as one whether it came alone or in a batch.
        _ => vec![top],
    };
    Ok(raw_jobs
        .iter()
        .map(|raw| {
            // The raw values borrow from `text`: where each job lies in it says whether an
            // invalid byte (replaced while decoding) was inside it, so only that job fails.
            let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
            let span = start..start + raw.get().len();
            let invalid_utf8 = invalid_at.iter().any(|at| span.contains(at));
            check_and_parse(raw.get(), invalid_utf8, limits)
        })
        .collect())
}

/// `body` as text, with each invalid UTF-8 sequence replaced by U+FFFD, and the offsets (in
/// the text) of those replacements: a U+FFFD that was in the body is not one of them.
fn decode_lossy(body: &[u8]) -> (std::borrow::Cow<'_, str>, Vec<usize>) {
    let Err(_) = std::str::from_utf8(body) else {
        return (String::from_utf8_lossy(body), Vec::new());
    };
    let (mut text, mut invalid_at) = (String::with_capacity(body.len()), Vec::new());
    let mut rest = body;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                break;
            }
            Err(error) => {
                let (valid, after) = rest.split_at(error.valid_up_to());
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                invalid_at.push(text.len());
                text.push('\u{FFFD}');
                match error.error_len() {
                    Some(len) => rest = &after[len..],
                    None => break,
                }
            }
        }
    }
    (std::borrow::Cow::Owned(text), invalid_at)
}

/// The size and nesting checks a job from the queue gets, for one job's text (`test-input`).
pub fn check_job_text(text: &str, limits: JobLimits) -> Result<(), String> {
    match job_problem(text, false, limits) {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

fn job_problem(raw: &str, invalid_utf8: bool, limits: JobLimits) -> Option<String> {
    let Shape { depth, oversized } = shape(raw);
    if raw.len() > limits.max_bytes.saturating_add(QUEUE_ENVELOPE_BYTES) {
        Some(format!(
            "the job is {} bytes, over the limit of {} bytes",
            raw.len(),
            limits.max_bytes
        ))
    } else if depth > limits.max_depth {
        Some(format!(
            "the job nests arrays or objects {depth} levels deep, over the limit of {}",
            limits.max_depth
        ))
    } else if invalid_utf8 {
        Some("the job contains bytes that are not valid UTF-8".to_owned())
    } else {
        oversized.map(|number| integer_problem(number, "job"))
    }
}

/// What is wrong with `json` (the `what`: "job", "body") when it holds an integer beyond 64
/// bits, for an `InvalidInput` or a 400.
pub fn oversized_integer_problem(json: &str, what: &str) -> Option<String> {
    oversized_integer(json).map(|number| integer_problem(number, what))
}

fn integer_problem(number: &str, what: &str) -> String {
    let shown: String = number.chars().take(40).collect();
    format!(
        "the {what} holds the integer {shown}, beyond 64 bits: it would lose digits as a JSON \
         number here; send it as a string"
    )
}

/// What the queue adds to a submitted request body when it hands the job out (its `id`, and
/// room for status keys): `max_job_size`, like the platform's and the mock's `/run` and
/// `/runsync` limits, counts the body the client sent, not these.
pub const QUEUE_ENVELOPE_BYTES: usize = 1024;

fn check_and_parse(raw: &str, invalid_utf8: bool, limits: JobLimits) -> Result<Job, BadJob> {
    let problem = job_problem(raw, invalid_utf8, limits);
    match problem {
        None => {
            let value: Value = serde_json::from_str(raw).map_err(|e| BadJob {
                id: None,
                problem: format!("the job is not valid JSON ({e})"),
            })?;
            parse_job(value)
        }
        Some(problem) => Err(BadJob {
            id: shallow_id(raw),
            problem,
        }),
    }
}

/// The `id` of a job object without parsing the rest of it.
fn shallow_id(raw: &str) -> Option<String> {
    let fields: HashMap<String, Box<RawValue>> = serde_json::from_str(raw).ok()?;
    let id = fields.get("id")?.get();
    match serde_json::from_str::<Value>(id).ok()? {
        Value::String(id) if !id.is_empty() && !id.contains('\u{FFFD}') => Some(id),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What one pass over JSON text finds, without parsing it: how deep it nests, and the first
/// integer (outside strings) that fits neither an `i64` nor a `u64`.
struct Shape<'a> {
    depth: usize,
    oversized: Option<&'a str>,
}

/// One pass over `json`, counted without recursion.
fn shape(json: &str) -> Shape<'_> {
    let bytes = json.as_bytes();
    let (mut depth, mut deepest, mut oversized) = (0usize, 0usize, None);
    let (mut in_string, mut escaped, mut at) = (false, false, 0);
    while at < bytes.len() {
        let byte = bytes[at];
        at += 1;
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            // Outside strings, a digit or a minus can only start a number.
            b'-' | b'0'..=b'9' => {
                let start = at - 1;
                while at < bytes.len()
                    && matches!(bytes[at], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    at += 1;
                }
                let number = &json[start..at];
                let integer = !number.contains(['.', 'e', 'E']);
                if oversized.is_none()
                    && integer
                    && number.parse::<i64>().is_err()
                    && number.parse::<u64>().is_err()
                {
                    oversized = Some(number);
                }
            }
            _ => {}
        }
    }
    Shape {
        depth: deepest,
        oversized,
    }
}

/// The deepest nesting of `[`/`{` in JSON text, counted without recursion.
pub fn nesting_depth(json: &str) -> usize {
    shape(json).depth
}

/// The first integer in `json` (outside strings) that fits neither an `i64` nor a `u64`:
/// parsed, it would silently become a float that has lost digits.
pub fn oversized_integer(json: &str) -> Option<&str> {
    shape(json).oversized
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
    use proptest::prelude::*;
    use serde_json::json;

    fn parse_take_body_default(body: &[u8]) -> Result<Vec<Result<Job, BadJob>>, String> {
        parse_take_body(body, JobLimits::default())
    }

    #[test]
    fn single_and_batch_bodies_give_jobs_with_their_extra_keys() {
        let one =
            parse_take_body_default(br#"{"id":"j1","input":{"task":"echo"},"webhook":"http://h"}"#)
                .unwrap();
        let job = one[0].as_ref().unwrap();
        assert_eq!(job.id, "j1");
        assert_eq!(job.raw["webhook"], "http://h");
        let batch =
            parse_take_body_default(br#"[{"id":"a","input":{}},{"id":"b","input":1}]"#).unwrap();
        assert_eq!(batch.len(), 2);
        assert!(parse_take_body_default(b"").unwrap().is_empty());
        assert!(parse_take_body_default(b"[]").unwrap().is_empty());
    }

    #[test]
    fn malformed_jobs_say_what_is_missing_and_keep_the_id_when_there_is_one() {
        let jobs = parse_take_body_default(br#"[{"input":{}},{"id":"x"},7,{"id":{},"input":{}}]"#)
            .unwrap();
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
        assert!(parse_take_body_default(b"<html>oops</html>").is_err());
        // JSON that is not an object is one job nobody can answer, alone as in a batch.
        for body in [&b"42"[..], b"[42]", b"\"hello\""] {
            let jobs = parse_take_body_default(body).unwrap();
            let bad = jobs[0].as_ref().unwrap_err();
            assert_eq!(bad.id, None);
            assert!(
                bad.problem.contains("must be a JSON object"),
                "{}",
                bad.problem
            );
        }
    }

    #[test]
    fn policy_execution_timeout_is_read_in_milliseconds() {
        let job =
            parse_job(json!({"id":"j","input":{},"policy":{"executionTimeout":5000}})).unwrap();
        assert_eq!(job.policy_execution_timeout(), Some(Duration::from_secs(5)));
        let job = parse_job(json!({"id":"j","input":{}})).unwrap();
        assert_eq!(job.policy_execution_timeout(), None);
    }

    #[test]
    fn a_job_nested_too_deep_is_answered_by_id_and_its_batch_mates_still_run() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let body =
            format!(r#"[{{"id":"deep","input":{{"x":{deep}}}}},{{"id":"ok","input":{{}}}}]"#);
        let jobs = parse_take_body_default(body.as_bytes()).unwrap();
        let bad = jobs[0].as_ref().unwrap_err();
        assert_eq!(bad.id.as_deref(), Some("deep"));
        assert!(
            bad.problem.contains("100002 levels deep"),
            "{}",
            bad.problem
        );
        assert_eq!(jobs[1].as_ref().unwrap().id, "ok");
    }

    #[test]
    fn invalid_utf8_fails_only_the_job_that_carries_it() {
        let mut body = br#"[{"id":"bad","input":{"t":""#.to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(br#""}},{"id":"good","input":{"t":"caf\u00e9 \u2603"}}]"#);
        let jobs = parse_take_body_default(&body).unwrap();
        let bad = jobs[0].as_ref().unwrap_err();
        assert_eq!(
            (bad.id.as_deref(), bad.problem.contains("UTF-8")),
            (Some("bad"), true)
        );
        assert_eq!(jobs[1].as_ref().unwrap().input["t"], "café ☃");
    }

    #[test]
    fn a_legitimate_replacement_character_passes_beside_a_batch_mate_with_invalid_bytes() {
        // "café" spelled with a real U+FFFD (EF BF BD), then a batch-mate with a lone 0xFF.
        let mut body = br#"[{"id":"good","input":{"text":"caf"#.to_vec();
        body.extend_from_slice(&[0xEF, 0xBF, 0xBD]);
        body.extend_from_slice(br#" ok"}},{"id":"bad","input":{"text":"x"#);
        body.push(0xFF);
        body.extend_from_slice(br#""}}]"#);
        let jobs = parse_take_body_default(&body).unwrap();
        let good = jobs[0]
            .as_ref()
            .expect("U+FFFD is a character like any other");
        assert_eq!(good.input["text"], "caf\u{FFFD} ok");
        let bad = jobs[1].as_ref().unwrap_err();
        assert_eq!(bad.id.as_deref(), Some("bad"));
        assert!(bad.problem.contains("UTF-8"), "{}", bad.problem);
    }

    #[test]
    fn ids_that_cannot_go_in_a_url_path_as_they_are_have_a_problem() {
        assert_eq!(
            id_problem("sync-5ea3e1c4-8b2f-4a57-9a3e-12ab34cd56ef-u1"),
            None
        );
        assert_eq!(id_problem("job:1.2_x"), None);
        for bad in ["", ".", "..", "a/b", "a b", "a\nb", "a?b", "%2F", "é"] {
            assert!(id_problem(bad).is_some(), "{bad:?}");
        }
        assert!(id_problem(&"a".repeat(MAX_ID_LEN)).is_none());
        let long = id_problem(&"a".repeat(10_000)).unwrap();
        assert!(long.contains("10000 bytes"), "{long}");
    }

    #[test]
    fn ids_in_log_lines_are_escaped_and_short() {
        assert_eq!(shown_id("a\nINFO forged"), "a\\nINFO forged");
        let shown = shown_id(&"x".repeat(1_000_000));
        assert!(
            shown.len() < 100 && shown.ends_with("(999936 more characters)"),
            "{shown}"
        );
    }

    #[test]
    fn an_oversized_job_is_refused_by_id() {
        let body = format!(
            r#"{{"id":"big","input":{{"blob":"{}"}}}}"#,
            "x".repeat(2000)
        );
        let limits = JobLimits {
            max_bytes: 1000,
            max_depth: 64,
        };
        let jobs = parse_take_body(body.as_bytes(), limits).unwrap();
        let bad = jobs[0].as_ref().unwrap_err();
        assert_eq!(bad.id.as_deref(), Some("big"));
        assert!(bad.problem.contains("over the limit of 1000 bytes"));
    }

    #[test]
    fn integers_beyond_64_bits_are_found_outside_strings_only() {
        let big = "123456789012345678901234567890";
        assert_eq!(oversized_integer(&format!(r#"{{"n": {big}}}"#)), Some(big));
        assert_eq!(
            oversized_integer(r#"{"n": -99999999999999999999}"#),
            Some("-99999999999999999999")
        );
        for fits in [
            r#"{"n": 18446744073709551615, "m": -9223372036854775808}"#,
            r#"{"s": "123456789012345678901234567890"}"#,
            r#"{"f": 1.5e300, "g": 123456789012345678901234567890.5}"#,
            r#"{"e": "\"99999999999999999999999"}"#,
        ] {
            assert_eq!(oversized_integer(fits), None, "{fits}");
        }
        let jobs = parse_take_body_default(
            format!(r#"{{"id": "j", "input": {{"n": {big}}}}}"#).as_bytes(),
        )
        .unwrap();
        let problem = jobs[0].as_ref().unwrap_err();
        assert!(problem.problem.contains("beyond 64 bits"), "{problem:?}");
        assert_eq!(problem.id.as_deref(), Some("j"));
    }

    #[test]
    fn nesting_depth_ignores_brackets_inside_strings() {
        assert_eq!(nesting_depth(r#"{"a":"[[[{{{","b":[1,[2]]}"#), 3);
        assert_eq!(nesting_depth(r#""\"[""#), 0);
        assert_eq!(nesting_depth("7"), 0);
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any bytes at all: parsing never panics, and every job it yields has an id and input.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(jobs) = parse_take_body_default(&bytes) {
                for job in jobs.into_iter().flatten() {
                    prop_assert!(!job.id.is_empty());
                }
            }
        }

        /// Any JSON value as a job: a valid job round-trips; anything else is a BadJob.
        #[test]
        fn arbitrary_json_jobs_are_parsed_or_refused_never_lost(id in "[a-z0-9-]{1,12}", input in arbitrary_json(), extra in arbitrary_json()) {
            let job = json!({"id": id, "input": input, "extra": extra});
            let body = serde_json::to_vec(&json!([job, 5])).unwrap();
            let jobs = parse_take_body_default(&body).unwrap();
            prop_assert_eq!(jobs.len(), 2);
            let parsed = jobs[0].as_ref().unwrap();
            prop_assert_eq!(&parsed.id, &id);
            prop_assert_eq!(&parsed.input, &input);
            prop_assert!(jobs[1].is_err());
        }

        /// Jobs built from fragments of valid JSON: cut anywhere, the body is refused cleanly.
        #[test]
        fn truncated_bodies_are_errors_not_panics(input in arbitrary_json(), cut in 0usize..200) {
            let body = serde_json::to_vec(&json!({"id": "t", "input": input})).unwrap();
            let cut = cut.min(body.len());
            let _ = parse_take_body_default(&body[..cut]);
        }
    }
}
