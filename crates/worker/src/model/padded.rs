//! A TorchScript module that takes `(input_ids, attention_mask)`, both `[rows, width]`, and
//! gives one output row per input row (the MiniLM encoder's embeddings, a classify model's
//! logits), run on rows of token ids padded to the longest: what a batcher runs.

use std::sync::Arc;

use tch::{CModule, Device, Kind, Tensor};

use super::batcher::BatchModel;

/// A module, the device it is on, and the id it pads with.
pub struct PaddedModule {
    module: Arc<CModule>,
    device: Device,
    pad: u32,
}

impl PaddedModule {
    /// `module` on `device`, padding with `pad`.
    pub fn new(module: Arc<CModule>, device: Device, pad: u32) -> Self {
        Self {
            module,
            device,
            pad,
        }
    }
}

impl BatchModel<Vec<u32>, Vec<f32>> for PaddedModule {
    fn forward(&self, rows: &[&Vec<u32>]) -> Result<Vec<Vec<f32>>, tch::TchError> {
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len() * width);
        for row in rows {
            let padding = width - row.len();
            ids.extend(row.iter().map(|&id| i64::from(id)));
            ids.extend(std::iter::repeat_n(i64::from(self.pad), padding));
            mask.extend(std::iter::repeat_n(1i64, row.len()));
            mask.extend(std::iter::repeat_n(0i64, padding));
        }
        let shape = [rows.len() as i64, width as i64];
        let ids = Tensor::f_from_slice(&ids)?
            .f_view(shape)?
            .f_to_device(self.device)?;
        let mask = Tensor::f_from_slice(&mask)?
            .f_view(shape)?
            .f_to_device(self.device)?;
        let out = self
            .module
            .forward_ts(&[ids, mask])?
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?;
        let flat = Vec::<f32>::try_from(out.f_flatten(0, -1)?)?;
        let per_row = flat.len() / rows.len().max(1);
        Ok(flat.chunks(per_row.max(1)).map(<[f32]>::to_vec).collect())
    }
}
