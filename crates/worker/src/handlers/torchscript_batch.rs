//! `batch = true` on a torchscript handler: a job's input tensors (their first dimension: its
//! rows) are one item of the model's batcher. Jobs whose inputs agree in dtype and in every
//! other dimension share a forward pass, their tensors concatenated along the first dimension,
//! and each gets its own rows of every output back. A job whose inputs make the model fail is
//! found by bisection and fails alone.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde_json::Value;
use tch::{CModule, Device, IValue};

use super::tensors::{output_tensors, tensor_json, to_tensor, JsonTensor};
use crate::model::{BatchItem, BatchModel};

/// One job's inputs, in `forward`'s order, each with the job's rows first.
pub(super) struct JobTensors(pub(super) Vec<JsonTensor>);

impl JobTensors {
    /// The job's rows (every input's first dimension, checked equal before it is submitted).
    fn rows(&self) -> i64 {
        self.0.first().map_or(0, JsonTensor::rows)
    }
}

impl BatchItem for JobTensors {
    fn size(&self) -> usize {
        self.0.iter().map(JsonTensor::elements).sum()
    }

    fn group(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        for tensor in &self.0 {
            let (kind, rest) = tensor.row_shape();
            format!("{kind:?}").hash(&mut hasher);
            rest.hash(&mut hasher);
        }
        hasher.finish()
    }
}

/// A TorchScript module whose first dimension is a batch, on its device.
pub(super) struct BatchedModule {
    pub(super) module: Arc<CModule>,
    pub(super) device: Device,
}

impl BatchModel<JobTensors, Vec<Value>> for BatchedModule {
    fn forward(&self, items: &[&JobTensors]) -> Result<Vec<Vec<Value>>, tch::TchError> {
        let inputs_per_job = items.first().map_or(0, |item| item.0.len());
        let inputs = (0..inputs_per_job)
            .map(|k| {
                let parts: Vec<&JsonTensor> = items.iter().map(|item| &item.0[k]).collect();
                to_tensor(&JsonTensor::concat(&parts), self.device).map(IValue::Tensor)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let _no_grad = tch::no_grad_guard();
        let outputs = output_tensors(self.module.forward_is(&inputs)?)?;
        let total: i64 = items.iter().map(|item| item.rows()).sum();
        if let Some(other) = outputs.iter().find(|o| o.size().first() != Some(&total)) {
            return Err(tch::TchError::Convert(format!(
                "with batch = true every output's first dimension must be the {total} rows given, \
                 not {:?}",
                other.size()
            )));
        }
        let mut offset = 0;
        items
            .iter()
            .map(|item| {
                let rows = item.rows();
                let values = outputs
                    .iter()
                    .map(|output| tensor_json(&output.f_narrow(0, offset, rows)?))
                    .collect::<Result<Vec<_>, _>>()?;
                offset += rows;
                Ok(values)
            })
            .collect()
    }
}
