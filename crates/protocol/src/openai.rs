//! OpenAI's side of the platform's OpenAI-compatible route: a failed job's error result in
//! OpenAI's terms (its status and error object), the same wherever the route is served (the
//! mock queue's `/openai/v1/*`, the worker's own `/v1/*` in load-balancing mode).

use serde_json::{json, Value};

/// OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_object(kind: &str, code: &str, message: &str) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })
}

/// A failed job's error result (`error_type`, `error`, `retry_after`) in OpenAI's terms: the
/// HTTP status, the error object, and the `Retry-After` seconds of the retry signal (429).
pub fn failed_reply(result: &Value) -> (u16, Value, Option<u64>) {
    let message = result["error"].as_str().unwrap_or("the job failed");
    let error_type = result["error_type"].as_str().unwrap_or("Internal");
    let retry_after = result["retry_after"].as_u64();
    let (status, kind) = match error_type {
        // A route the worker does not serve: OpenAI answers those 404, with this wording.
        "InvalidInput" if message.starts_with("Invalid URL (") => (404, "invalid_request_error"),
        "InvalidInput" => (400, "invalid_request_error"),
        // The retry signal, whatever its cause (GPU memory, the local wait).
        _ if retry_after.is_some() => (429, "rate_limit_error"),
        _ => (500, "server_error"),
    };
    let after = (status == 429).then(|| retry_after.unwrap_or(1));
    (status, error_object(kind, error_type, message), after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_signal_becomes_a_429_with_retry_after() {
        let (status, _, after) = failed_reply(&json!({
            "success": false, "error": "GPU memory exhausted, retry shortly",
            "error_type": "InsufficientGPUMemory", "retry_after": 10
        }));
        assert_eq!((status, after), (429, Some(10)));
        let (status, body, after) =
            failed_reply(&json!({"error": "bad", "error_type": "InvalidInput"}));
        assert_eq!((status, after), (400, None));
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["message"], "bad");
        let (status, _, _) = failed_reply(
            &json!({"error": "Invalid URL (GET /v1/x)", "error_type": "InvalidInput"}),
        );
        assert_eq!(status, 404);
        let (status, _, _) = failed_reply(&json!({"error": "boom", "error_type": "ModelError"}));
        assert_eq!(status, 500);
    }
}
