//! The model runtime: TorchScript modules loaded once per device and shared by concurrent
//! jobs (`CModule` is `Send + Sync`), the MiniLM sentence encoder with its tokenizer, and the
//! mapping of libtorch failures to job errors. Every call here blocks: handlers run them through
//! `JobContext::run_blocking`, with `no_grad` taken inside the thread.

mod batcher;
mod encoder;
mod errors;
mod padded;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{CModule, Device};

pub use batcher::{
    AnyBatcher, BatchAttachment, BatchItem, BatchLimits, BatchMemory, BatchMetrics, BatchModel,
    BatchReport, Batcher, Ticket,
};
pub use encoder::{device_label, Encoder, EMBED_BATCH, MAX_MODEL_TOKENS};
pub use errors::{finite, torch_error};
pub use padded::PaddedModule;

/// Why a model could not be loaded (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not there.
    #[error(
        "model file {0} not found: create the models with `make models` \
         (python handler/export_models.py --out <model_dir>), or point [handler] model_dir at them"
    )]
    Missing(PathBuf),
    /// The file is there but libtorch or the tokenizer refused it.
    #[error("cannot load {path}: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `[handler] model` (or `MODEL_NAME`) is in none of the places looked: each, and why.
    #[error("{0}")]
    ModelNotFound(String),
    /// The document parser executable, which extract and classify need, is not there.
    #[error("{0}")]
    NoParser(String),
}

/// Loads a TorchScript module onto `device`, in eval mode.
pub fn load_module(path: &Path, device: Device) -> Result<Arc<CModule>, LoadError> {
    if !path.is_file() {
        return Err(LoadError::Missing(path.to_path_buf()));
    }
    let mut module = CModule::load_on_device(path, device).map_err(|e| LoadError::Unreadable {
        path: path.to_path_buf(),
        reason: first_line(&e.to_string()),
    })?;
    module.set_eval();
    Ok(Arc::new(module))
}

/// The devices a handler's model goes on: every visible GPU for CUDA handlers when libtorch
/// sees one (admission picks the GPU per job), else the CPU (a simulated GPU is accounted as a
/// GPU but computes on the CPU).
pub fn devices_for(wants_gpu: bool) -> Vec<Device> {
    let gpus = if wants_gpu && tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    if gpus > 0 {
        (0..gpus as usize).map(Device::Cuda).collect()
    } else {
        vec![Device::Cpu]
    }
}

/// One copy of something per device, in device order (one entry for the CPU).
pub struct OnDevices<T>(pub Vec<T>);

impl<T> OnDevices<T> {
    /// The copy for CUDA ordinal `device` (a job's reservation says which), or the only copy
    /// when the job has no device (the CPU). A device without a copy is an error, never another
    /// device's copy: memory is booked on the card the job runs on.
    pub fn for_device(&self, device: Option<usize>) -> Result<&T, crate::outcome::JobError> {
        let copy = match device {
            Some(d) => self.0.get(d),
            None => self.0.first(),
        };
        copy.ok_or_else(|| {
            crate::outcome::JobError::internal(format!(
                "no model copy on GPU {}: the worker loaded {} copy(ies)",
                device.unwrap_or(0),
                self.0.len()
            ))
        })
    }
}

/// Sets libtorch's intra-op threads (0 keeps its default); applies to every thread.
pub fn set_threads(intra_op_threads: usize) {
    if let Ok(threads) = i32::try_from(intra_op_threads) {
        if threads > 0 {
            tch::set_num_threads(threads);
        }
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}
