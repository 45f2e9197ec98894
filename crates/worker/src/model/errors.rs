//! libtorch failures as job errors. Raw libtorch messages carry file paths and TorchScript
//! tracebacks of the exporter's machine: they go to the log, never into a result.

use crate::outcome::{ErrorType, JobError};

/// `values` when every one is a finite number; else the `ModelError` that says the model's
/// `what` holds NaN or infinities. JSON has no such numbers (serde would write `null`), and a
/// score or an embedding that is not a number is the model failing, not a result.
pub fn finite<T: Copy + Into<f64>>(values: &[T], what: &str) -> Result<(), JobError> {
    match values.iter().find(|v| !(**v).into().is_finite()) {
        None => Ok(()),
        Some(bad) => Err(JobError::new(
            crate::outcome::ErrorType::ModelError,
            format!(
                "the model's {what} hold {} where numbers belong: its output is not usable",
                (*bad).into()
            ),
        )),
    }
}

/// Maps a libtorch error to what the job's submitter sees: a CUDA out-of-memory is the retry
/// signal, a broken CUDA context a device failure (the worker gets replaced), anything else a
/// `ModelError`.
pub fn torch_error(error: &tch::TchError, retry_after_s: u64) -> JobError {
    let message = error.to_string();
    let lower = message.to_ascii_lowercase();
    if lower.contains("out of memory")
        || message.contains("CUBLAS_STATUS_ALLOC_FAILED")
        || lower.contains("can't allocate memory")
    {
        tracing::warn!("out of memory in the model: {}", first_line(&message));
        return JobError::gpu_memory_exhausted(retry_after_s);
    }
    if message.contains("CUDA error")
        || lower.contains("device-side assert")
        || lower.contains("illegal memory access")
    {
        tracing::error!("the GPU failed: {}", first_line(&message));
        return JobError::device_failure("the GPU failed while running the model");
    }
    tracing::error!("the model failed: {message}");
    JobError::new(ErrorType::ModelError, "the model failed on this input")
}

fn first_line(text: &str) -> String {
    text.lines()
        .find(|l| l.contains("out of memory") || l.contains("CUDA"))
        .unwrap_or(text)
        .chars()
        .take(300)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_numbers_from_a_model_are_a_named_model_error() {
        assert!(finite(&[0.5f32, -1.0], "embeddings").is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let error = finite(&[0.5f32, bad], "embeddings").unwrap_err();
            assert_eq!(error.error_type, crate::outcome::ErrorType::ModelError);
            assert!(
                error.message.contains("embeddings hold"),
                "{}",
                error.message
            );
        }
        assert!(finite(&[f64::NAN], "scores").is_err());
    }

    #[test]
    fn cuda_oom_becomes_the_retry_signal_and_nothing_of_libtorch_leaks() {
        let oom = tch::TchError::Torch(
            "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript, serialized code:\n  File \"/home/me/export.py\"\nRuntimeError: CUDA out of memory. Tried to allocate 4096.00 GiB.".into(),
        );
        let error = torch_error(&oom, 7);
        assert_eq!(
            (error.error_type, error.retry_after),
            (ErrorType::InsufficientGpuMemory, Some(7))
        );
        assert!(!error.message.contains("/home/me"));

        let broken = torch_error(
            &tch::TchError::Torch("CUDA error: an illegal memory access was encountered".into()),
            7,
        );
        assert!(broken.device_lost);
        let other = torch_error(
            &tch::TchError::Torch("shape mismatch at /src/file.cpp:12".into()),
            7,
        );
        assert_eq!(other.error_type, ErrorType::ModelError);
        assert!(!other.message.contains("/src/file.cpp"));
    }
}
