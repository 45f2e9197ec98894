//! Long work seen while it runs: results packed into stream messages under the platform's
//! 1 MB per message, and progress updates at a steady pace.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The platform's limit on one job-stream body, less the `{"output": ...}` around a message.
pub(super) const STREAM_MESSAGE_LIMIT: usize = runpod_protocol::limits::MAX_STREAM_CHUNK - 64;

/// Packs `items` into messages `{"<key>": [..]}` of at most `limit` bytes of JSON each, in
/// order. An item too large for a message alone has its `text` cut to fit, marked
/// `"text_truncated": true` (the final output, when aggregated, still has all of it).
pub(super) fn pack(key: &str, items: Vec<Value>, limit: usize) -> Vec<Value> {
    // `{"<key>":[` and `]}`, plus a comma per item.
    let envelope = key.len() + 8;
    let mut messages = Vec::new();
    let mut current: Vec<Value> = Vec::new();
    let mut size = envelope;
    for item in items {
        let item = fit(item, limit - envelope);
        let item_size = json_len(&item) + 1;
        if !current.is_empty() && size + item_size > limit {
            messages.push(json!({ key: std::mem::take(&mut current) }));
            size = envelope;
        }
        size += item_size;
        current.push(item);
    }
    if !current.is_empty() {
        messages.push(json!({ key: current }));
    }
    messages
}

fn json_len(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(0, |bytes| bytes.len())
}

/// `item` within `limit` bytes: its `text` cut (at a character boundary) when it is too big.
fn fit(item: Value, limit: usize) -> Value {
    if json_len(&item) <= limit {
        return item;
    }
    let Some(text) = item.get("text").and_then(Value::as_str).map(str::to_owned) else {
        return item;
    };
    let cut_at = |keep: usize| {
        let mut cut = item.clone();
        cut["text"] = Value::String(text[..keep].to_owned());
        cut["text_truncated"] = Value::Bool(true);
        cut
    };
    // The longest prefix that fits: JSON escapes make the size of a prefix unknown until it is
    // written, so search for it.
    let (mut fits, mut too_long) = (0, text.len());
    while too_long - fits > 1 {
        let mut middle = fits + (too_long - fits) / 2;
        while !text.is_char_boundary(middle) {
            middle -= 1;
        }
        if middle <= fits {
            break;
        }
        if json_len(&cut_at(middle)) <= limit {
            fits = middle;
        } else {
            too_long = middle;
        }
    }
    cut_at(fits)
}

/// When a job's next progress update is due: the first a period after the start, then at
/// that pace, so a short job sends none.
#[derive(Debug)]
pub(super) struct ProgressClock {
    every: Option<Duration>,
    next: Instant,
}

impl ProgressClock {
    /// A clock for a job starting now; `None`: never due.
    pub(super) fn start(every: Option<Duration>) -> Self {
        Self {
            every,
            next: Instant::now() + every.unwrap_or_default(),
        }
    }

    /// Whether an update is due now; if so, the next one is due a period later.
    pub(super) fn due(&mut self) -> bool {
        let Some(every) = self.every else {
            return false;
        };
        let now = Instant::now();
        if now < self.next {
            return false;
        }
        self.next = now + every;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_stay_under_the_limit_and_keep_every_item_in_order() {
        let items: Vec<Value> = (0..50)
            .map(|i| json!({"index": i, "text": "x".repeat(100)}))
            .collect();
        let messages = pack("chunks", items, 1000);
        assert!(messages.len() > 1);
        let mut seen = Vec::new();
        for message in &messages {
            assert!(json_len(message) <= 1000, "{}", json_len(message));
            for item in message["chunks"].as_array().unwrap() {
                seen.push(item["index"].as_u64().unwrap());
                assert!(item.get("text_truncated").is_none());
            }
        }
        assert_eq!(seen, (0..50).collect::<Vec<u64>>());
    }

    #[test]
    fn an_item_too_large_alone_has_its_text_cut_to_fit() {
        let items = vec![
            json!({"index": 0, "text": "é\"".repeat(2000)}),
            json!({"index": 1, "text": "short"}),
        ];
        let messages = pack("chunks", items, 1000);
        let first = &messages[0]["chunks"][0];
        assert!(json_len(&messages[0]) <= 1000);
        assert_eq!(first["text_truncated"], true);
        assert!(first["text"].as_str().unwrap().starts_with("é\""));
        let last = messages.last().unwrap()["chunks"].as_array().unwrap();
        assert_eq!(last.last().unwrap()["text"], "short");
    }

    #[test]
    fn a_new_clock_is_not_due_until_its_period_passes() {
        let mut clock = ProgressClock::start(Some(Duration::from_secs(60)));
        assert!(!clock.due());
        clock.next = Instant::now();
        assert!(clock.due());
        assert!(!clock.due(), "then a period later");
        let mut off = ProgressClock::start(None);
        assert!(!off.due(), "never without a period");
    }
}
