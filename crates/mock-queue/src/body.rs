//! JSON the mock keeps as text: a job object, a result, a stream chunk. Parsed into a tree,
//! 10 MB of small numbers takes 160–230 MB (a 32-byte node per two bytes of text), kept for
//! the 30-minute retention; as text it takes its size. Only the few top-level fields the
//! mock reads are parsed, once, before the queue's lock is taken.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::Value;

/// A JSON object's top-level fields, each as its text.
pub(crate) type TopLevel<'a> = BTreeMap<String, &'a RawValue>;

/// The top-level fields of `text` if it is a JSON object (`None`: another JSON value).
/// `Err` when `text` is not JSON.
pub(crate) fn top_level(text: &[u8]) -> Result<Option<TopLevel<'_>>, serde_json::Error> {
    let starts_an_object = text
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if starts_an_object {
        serde_json::from_slice(text).map(Some)
    } else {
        // Checked, and then nothing to read in it.
        serde_json::from_slice::<&RawValue>(text).map(|_| None)
    }
}

/// Whether `raw` (JSON) is an object.
pub(crate) fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

/// Field `key` of `fields` when it is a JSON string (nothing else is parsed).
pub(crate) fn string_field(fields: &TopLevel<'_>, key: &str) -> Option<String> {
    let raw = fields.get(key).filter(|raw| raw.get().starts_with('"'))?;
    serde_json::from_str(raw.get()).ok()
}

/// A copy of `raw` the mock can keep.
pub(crate) fn owned(raw: &RawValue) -> Box<RawValue> {
    raw.to_owned()
}

/// `value` as JSON text (tests and `MockQueue::enqueue` hand the mock values).
pub(crate) fn raw_of(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("a Value always serializes")
}

/// A job object as workers receive it (`{"id", "input", "policy"?, "webhook"?, ...}`, or
/// anything a test queues), kept as its text, shared by the queue and the job's record, with
/// the fields the mock reads taken out once.
#[derive(Debug, Clone)]
pub struct JobBody(Arc<Fields>);

#[derive(Debug)]
struct Fields {
    text: Box<RawValue>,
    read: ReadFields,
}

/// What the mock reads of a job object.
#[derive(Debug, Default)]
struct ReadFields {
    id: Option<String>,
    task: Option<String>,
    execution_timeout: Option<Duration>,
    ttl: Option<Duration>,
    webhook: Option<String>,
}

impl ReadFields {
    fn of(text: &RawValue) -> Self {
        let fields = top_level(text.get().as_bytes())
            .ok()
            .flatten()
            .unwrap_or_default();
        let string = |key: &str| string_field(&fields, key);
        // Lenient, as the worker is: a policy field that is not a whole number is ignored
        // here (submissions are checked before this; tests queue anything).
        let policy = fields
            .get("policy")
            .and_then(|policy| serde_json::from_str::<Value>(policy.get()).ok());
        let policy_ms = |key: &str| {
            policy
                .as_ref()
                .and_then(|p| p.get(key))
                .and_then(Value::as_u64)
                .map(Duration::from_millis)
        };
        let task = fields
            .get("input")
            .filter(|input| is_object(input))
            .and_then(|input| top_level(input.get().as_bytes()).ok().flatten())
            .and_then(|input| string_field(&input, "task"));
        Self {
            id: string("id"),
            task,
            execution_timeout: policy_ms("executionTimeout"),
            ttl: policy_ms("ttl"),
            webhook: string("webhook"),
        }
    }
}

impl JobBody {
    /// Reads the fields the mock needs from `text` (a JSON value).
    pub fn new(text: Box<RawValue>) -> Self {
        let read = ReadFields::of(&text);
        Self(Arc::new(Fields { text, read }))
    }

    /// Its JSON text.
    pub fn text(&self) -> &RawValue {
        &self.0.text
    }

    /// Its parsed tree (for tests and the console; the mock itself never needs it).
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.text.get()).unwrap_or(Value::Null)
    }

    /// Its `id`, when a string.
    pub fn id(&self) -> Option<&str> {
        self.0.read.id.as_deref()
    }

    /// Its `input.task`, when a string.
    pub fn task(&self) -> Option<&str> {
        self.0.read.task.as_deref()
    }

    /// `policy.executionTimeout`, when a whole number of ms.
    pub fn execution_timeout(&self) -> Option<Duration> {
        self.0.read.execution_timeout
    }

    /// `policy.ttl`, when a whole number of ms.
    pub fn ttl(&self) -> Option<Duration> {
        self.0.read.ttl
    }

    /// Its `webhook`, when a string.
    pub fn webhook(&self) -> Option<&str> {
        self.0.read.webhook.as_deref()
    }

    /// The bytes it takes: its text (the copies in the queue and the record share it).
    pub fn stored_bytes(&self) -> usize {
        self.0.text.get().len()
    }
}

impl From<Value> for JobBody {
    fn from(value: Value) -> Self {
        Self::new(raw_of(&value))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_fields_the_mock_reads_are_taken_out_and_the_text_is_kept_as_sent() {
        let text = r#"{"id": "a", "input": {"task": "echo", "n": [1,2,3]}, "policy": {"ttl": 20000, "executionTimeout": "x"}, "webhook": "https://example.com/h"}"#;
        let body = JobBody::new(RawValue::from_string(text.to_owned()).unwrap());
        assert_eq!(body.text().get(), text);
        assert_eq!(body.id(), Some("a"));
        assert_eq!(body.task(), Some("echo"));
        assert_eq!(body.ttl(), Some(Duration::from_secs(20)));
        assert_eq!(body.execution_timeout(), None, "not a number: ignored");
        assert_eq!(body.webhook(), Some("https://example.com/h"));
        assert_eq!(body.value()["input"]["n"], json!([1, 2, 3]));
        assert_eq!(body.stored_bytes(), text.len());
    }

    #[test]
    fn any_json_can_be_queued_and_only_an_object_has_fields() {
        for value in [
            json!([1, 2]),
            json!("x"),
            json!({"id": 7, "input": "s"}),
            json!(null),
        ] {
            let body = JobBody::from(value.clone());
            assert_eq!(body.value(), value);
            assert_eq!((body.id(), body.task()), (None, None));
        }
        assert!(top_level(b" [1, ").is_err(), "not JSON");
        assert!(top_level(b"{\"a\": 1").is_err(), "not JSON");
        assert!(top_level(b" 3 ").unwrap().is_none());
        let fields = top_level(br#" {"a": [1, 2], "b": "x"} "#).unwrap().unwrap();
        assert_eq!(fields["a"].get(), "[1, 2]");
        assert_eq!(string_field(&fields, "b").as_deref(), Some("x"));
        assert_eq!(string_field(&fields, "a"), None);
    }
}
