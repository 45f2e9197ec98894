//! What a job ends with: its output, or an error result in the seed's shape.
//!
//! Every error a job can meet becomes a [`JobError`] with one `error_type` from a closed list, a
//! message written for the person who submitted the job (never a libtorch message or a file
//! path), and a `retry_after` only where retrying can succeed.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// The closed list of `error_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorType {
    /// Not enough GPU memory now; retry after `retry_after` seconds.
    #[serde(rename = "InsufficientGPUMemory")]
    InsufficientGpuMemory,
    /// The job's input is wrong; retrying the same input cannot succeed.
    InvalidInput,
    /// The job ran past its execution timeout, or waited too long for its handler.
    Timeout,
    /// The worker was shutting down and could not finish the job.
    Interrupted,
    /// The model failed or is not available.
    ModelError,
    /// The result is larger than the platform accepts.
    OutputTooLarge,
    /// A bug or an unexpected failure inside the worker.
    Internal,
}

impl ErrorType {
    /// The name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientGpuMemory => "InsufficientGPUMemory",
            Self::InvalidInput => "InvalidInput",
            Self::Timeout => "Timeout",
            Self::Interrupted => "Interrupted",
            Self::ModelError => "ModelError",
            Self::OutputTooLarge => "OutputTooLarge",
            Self::Internal => "Internal",
        }
    }
}

/// `retry_after` of a job that failed because the worker's file descriptors were spent.
const FILE_DESCRIPTORS_RETRY_AFTER_S: u64 = 5;

/// Whether `error`, or an error it wraps, is the process running out of file descriptors
/// (`EMFILE`, or the system's `ENFILE`).
pub fn is_out_of_file_descriptors(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(EMFILE | ENFILE)) {
                return true;
            }
        }
        current = e.source();
    }
    false
}

/// Linux's "too many open files" (per process) and "file table overflow" (system-wide).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// A failed job, as its submitter sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error_type:?}: {message}")]
pub struct JobError {
    /// Which kind of failure.
    pub error_type: ErrorType,
    /// What went wrong, for the person who submitted the job.
    pub message: String,
    /// Seconds after which a retry can succeed; `None` where it cannot.
    pub retry_after: Option<u64>,
    /// The device itself failed (a CUDA context that no longer works): the worker should be
    /// replaced rather than fail every job. Not part of the result.
    pub device_lost: bool,
}

impl JobError {
    /// An error of `error_type` that retrying will not fix.
    pub fn new(error_type: ErrorType, message: impl Into<String>) -> Self {
        Self {
            error_type,
            message: message.into(),
            retry_after: None,
            device_lost: false,
        }
    }

    /// The GPU failed in a way that does not heal (sticky CUDA errors).
    pub fn device_failure(message: impl Into<String>) -> Self {
        Self {
            device_lost: true,
            ..Self::new(ErrorType::ModelError, message)
        }
    }

    /// Whether the job ran out of GPU memory (counted towards replacing the worker).
    pub fn is_out_of_memory(&self) -> bool {
        self.error_type == ErrorType::InsufficientGpuMemory
    }

    /// The job's input is wrong.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorType::InvalidInput, message)
    }

    /// Something inside the worker failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Internal, message)
    }

    /// The worker ran out of file descriptors doing `what` (a flood of connections, say): its
    /// own trouble, not the job's input, and over once they are given back.
    pub fn out_of_file_descriptors(what: &str) -> Self {
        Self {
            retry_after: Some(FILE_DESCRIPTORS_RETRY_AFTER_S),
            ..Self::internal(format!(
                "{what}: the worker has too many open files (its file descriptors are spent); \
                 retry shortly"
            ))
        }
    }

    /// The seed's retry signal: GPU memory is short now, retry after `retry_after_s`.
    pub fn gpu_memory_exhausted(retry_after_s: u64) -> Self {
        Self {
            retry_after: Some(retry_after_s),
            ..Self::new(
                ErrorType::InsufficientGpuMemory,
                "GPU memory exhausted, retry shortly",
            )
        }
    }

    /// The seed's error object:
    /// `{"success": false, "error": .., "error_type": .., "retry_after": ..}`.
    pub fn to_object(&self) -> Value {
        let mut object = json!({
            "success": false,
            "error": self.message,
            "error_type": self.error_type.as_str(),
        });
        if let Some(after) = self.retry_after {
            object["retry_after"] = json!(after);
        }
        object
    }
}

/// A job-done body, serialised once: its size is checked and it is posted (or spooled) as
/// these bytes, never rebuilt.
pub type DoneBody = Box<RawValue>;

#[derive(Serialize)]
struct DoneFields<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    output: &'a Value,
    #[serde(rename = "stopPod", skip_serializing_if = "std::ops::Not::not")]
    stop_pod: bool,
}

/// The job-done body for a finished job.
///
/// Output goes as `{"output": ..}`. An error goes twice: as `output` (the SDK client's
/// `output()` sees it) and as a JSON string in `error` (the platform marks the job FAILED).
/// `stop_pod` asks the platform to replace this worker.
pub fn done_body(result: &Result<Value, JobError>, stop_pod: bool) -> DoneBody {
    let object;
    let fields = match result {
        Ok(output) => DoneFields {
            error: None,
            output,
            stop_pod,
        },
        Err(error) => {
            object = error.to_object();
            DoneFields {
                error: Some(object.to_string()),
                output: &object,
                stop_pod,
            }
        }
    };
    serde_json::value::to_raw_value(&fields).expect("a JSON value always serialises")
}

/// The `OutputTooLarge` error for an output of `size` bytes over `limit`.
fn output_too_large(size: u64, limit: u64) -> JobError {
    JobError::new(
        ErrorType::OutputTooLarge,
        format!(
            "the result is {size} bytes, over the limit of {limit} bytes; return less, or store \
             large outputs elsewhere and return a link"
        ),
    )
}

/// Refused bodies above this were most likely refused for their size (the platform's
/// stream-chunk limit; its result limit is 20 MB, but it answers both with a bare 400).
const LIKELY_TOO_LARGE: u64 = 1_000_000;

/// The small error result posted in place of a result the queue refused with `status` (a 4xx
/// other than 404): the client then sees `FAILED` with a cause instead of `COMPLETED` with no
/// output (runpod-python #309).
pub fn refused_result(status: u16, reason: &str, size: u64) -> JobError {
    let error_type = if status == 413 || size > LIKELY_TOO_LARGE {
        ErrorType::OutputTooLarge
    } else {
        ErrorType::Internal
    };
    JobError::new(
        error_type,
        format!(
            "the queue refused the job's result ({size} bytes) with HTTP {status}: {reason}; \
             this error was sent in its place"
        ),
    )
}

/// The job-done body of `result`, within `limit` bytes: a larger one becomes an
/// `OutputTooLarge` error (the platform refuses large results, and the job would end with no
/// output at all). Returns the result as it will be reported, and its body.
pub fn sized_done_body(
    result: Result<Value, JobError>,
    stop_pod: bool,
    limit: u64,
) -> (Result<Value, JobError>, DoneBody) {
    let body = done_body(&result, stop_pod);
    let size = body.get().len() as u64;
    if size <= limit {
        return (result, body);
    }
    drop(body);
    let error = output_too_large(size, limit);
    let body = done_body(&Err(error.clone()), stop_pod);
    (Err(error), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_signal_matches_the_seed_object_exactly() {
        let object = JobError::gpu_memory_exhausted(10).to_object();
        assert_eq!(
            object,
            json!({"success": false, "error": "GPU memory exhausted, retry shortly",
                   "error_type": "InsufficientGPUMemory", "retry_after": 10})
        );
    }

    #[test]
    fn error_body_carries_the_object_as_output_and_as_a_json_string() {
        let body: Value = serde_json::from_str(
            done_body(
                &Err(JobError::invalid_input("input.task is required")),
                false,
            )
            .get(),
        )
        .unwrap();
        let as_string: Value = serde_json::from_str(body["error"].as_str().unwrap()).unwrap();
        assert_eq!(as_string, body["output"]);
        assert_eq!(body["output"]["error_type"], "InvalidInput");
        assert!(body["output"].get("retry_after").is_none());
        assert!(body.get("stopPod").is_none());
    }

    #[test]
    fn a_refused_result_is_replaced_by_an_error_that_names_the_status_and_size() {
        let large = refused_result(400, "payload too large", 25_000_000);
        assert_eq!(large.error_type, ErrorType::OutputTooLarge);
        assert!(
            large.message.contains("25000000 bytes"),
            "{}",
            large.message
        );
        assert!(large.message.contains("HTTP 400: payload too large"));
        assert_eq!(large.retry_after, None);
        assert_eq!(
            refused_result(413, "too large", 10).error_type,
            ErrorType::OutputTooLarge
        );
        assert_eq!(
            refused_result(400, "bad body", 500).error_type,
            ErrorType::Internal
        );
    }

    #[test]
    fn output_body_is_just_the_output_plus_stop_pod_when_asked() {
        let parsed = |body: DoneBody| serde_json::from_str::<Value>(body.get()).unwrap();
        assert_eq!(
            parsed(done_body(&Ok(json!({"a": 1})), false)),
            json!({"output": {"a": 1}})
        );
        assert_eq!(
            parsed(done_body(&Ok(json!(null)), true)),
            json!({"output": null, "stopPod": true})
        );
    }
}
