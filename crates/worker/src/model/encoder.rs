//! The sentence encoder: MiniLM as TorchScript (mean pooling and L2 normalisation in the graph)
//! plus its tokenizer. Texts are embedded in batches, padded to the longest in the batch.

use std::path::Path;
use std::sync::Arc;

use tch::{CModule, Device, Kind, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio_util::sync::CancellationToken;

use super::{load_module, LoadError};

/// Tokens per text the model is fed (all-MiniLM-L6-v2 was trained on 256).
pub const MAX_MODEL_TOKENS: usize = 256;
/// Texts per forward call.
pub const EMBED_BATCH: usize = 32;

/// Bytes of text tokenized at once (a cancellation is seen within one piece's time).
const TOKENIZE_PIECE: usize = 64 * 1024;

/// `text` in pieces of about `size` bytes, cut after a whitespace character where one is near
/// (else at a character boundary), each with its byte offset.
fn pieces(text: &str, size: usize) -> impl Iterator<Item = (usize, &str)> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= text.len() {
            return None;
        }
        let rest = &text[start..];
        let mut end = if rest.len() <= size {
            rest.len()
        } else {
            (size..=rest.len().min(size + size / 8))
                .find(|&i| rest.is_char_boundary(i) && rest[..i].ends_with(char::is_whitespace))
                .unwrap_or_else(|| {
                    (size..)
                        .find(|&i| rest.is_char_boundary(i))
                        .unwrap_or(rest.len())
                })
        };
        end = end.max(1);
        let piece = (start, &rest[..end]);
        start += end;
        Some(piece)
    })
}

/// A loaded encoder, shared by every job on its device.
pub struct Encoder {
    module: Arc<CModule>,
    /// Truncates at [`MAX_MODEL_TOKENS`] and pads to the longest in the batch.
    model_tokenizer: Tokenizer,
    /// No truncation, no padding: counts and cuts documents into chunks.
    chunk_tokenizer: Tokenizer,
    device: Device,
    dims: usize,
    name: String,
}

/// What the warm-up embeds: a sentence of an ordinary length.
const WARM_UP_TEXT: &str = "The worker warms its model before it takes the first job.";

impl Encoder {
    /// Loads `minilm.pt` and `tokenizer.json` from `dir` onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, LoadError> {
        let module = load_module(&dir.join("minilm.pt"), device)?;
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(LoadError::Missing(tokenizer_path));
        }
        let unreadable = |reason: String| LoadError::Unreadable {
            path: tokenizer_path.clone(),
            reason,
        };
        let mut chunk_tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| unreadable(e.to_string()))?;
        // The file pads every encoding to 128 tokens and truncates there: override both.
        chunk_tokenizer.with_padding(None);
        chunk_tokenizer
            .with_truncation(None)
            .map_err(|e| unreadable(e.to_string()))?;
        let mut model_tokenizer = chunk_tokenizer.clone();
        model_tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        model_tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_MODEL_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| unreadable(e.to_string()))?;
        let encoder = Self {
            module,
            model_tokenizer,
            chunk_tokenizer,
            device,
            dims: 0,
            name: "all-MiniLM-L6-v2".to_owned(),
        };
        // One forward to learn the width and to fail at start-up rather than on a job.
        let probe = encoder
            .embed(&["warm-up".to_owned()])
            .map_err(|e| LoadError::Unreadable {
                path: dir.join("minilm.pt"),
                reason: e.to_string(),
            })?;
        Ok(Self {
            dims: probe.first().map_or(0, Vec::len),
            ..encoder
        })
    }

    /// The embedding width (384).
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The model's name, for outputs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tokens of `text` without special tokens, with their byte offsets into `text`. A long
    /// text is tokenized a piece at a time, cut at whitespace (where the tokenizer splits
    /// anyway), and `cancel` is checked between pieces: `Ok(None)` when it was set.
    pub fn token_offsets(
        &self,
        text: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<(usize, usize)>>, String> {
        let mut offsets = Vec::new();
        for (start, piece) in pieces(text, TOKENIZE_PIECE) {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let encoding = self
                .chunk_tokenizer
                .encode(piece, false)
                .map_err(|e| e.to_string())?;
            offsets.extend(
                encoding
                    .get_offsets()
                    .iter()
                    .map(|&(a, b)| (start + a, start + b)),
            );
        }
        Ok(Some(offsets))
    }

    /// How many tokens the model sees of `text` (special tokens included), and how many the
    /// whole text has.
    pub fn token_counts(&self, text: &str) -> Result<(usize, usize), String> {
        let total = self
            .chunk_tokenizer
            .encode(text, true)
            .map_err(|e| e.to_string())?
            .len();
        Ok((total.min(MAX_MODEL_TOKENS), total))
    }

    /// The model inputs for one text (truncated at [`MAX_MODEL_TOKENS`]): ids and mask,
    /// `[1, tokens]`, on the encoder's device.
    pub fn model_inputs(&self, text: &str) -> Result<(Tensor, Tensor), tch::TchError> {
        let encoding = self
            .model_tokenizer
            .encode(text, true)
            .map_err(|e| tch::TchError::Convert(format!("tokenizer: {e}")))?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        let mask: Vec<i64> = encoding
            .get_attention_mask()
            .iter()
            .map(|&m| i64::from(m))
            .collect();
        let width = ids.len() as i64;
        let ids = Tensor::f_from_slice(&ids)?
            .f_view([1, width])?
            .f_to_device(self.device)?;
        let mask = Tensor::f_from_slice(&mask)?
            .f_view([1, width])?
            .f_to_device(self.device)?;
        Ok((ids, mask))
    }

    /// Runs the model as a job would, twice (TorchScript's profiling executor optimises the
    /// graph on its second call): see [`crate::handlers::Handler::warm_up`].
    pub fn warm_up(&self) -> Result<(), String> {
        let texts = vec![WARM_UP_TEXT.to_owned()];
        for _ in 0..2 {
            self.embed(&texts)
                .map_err(|e| format!("{}: {}", self.name(), super::first_line(&e.to_string())))?;
        }
        Ok(())
    }

    /// How many tokens of this model `text` is, special tokens left out (what OpenAI's
    /// `usage` counts).
    pub fn content_tokens(&self, text: &str) -> Result<usize, String> {
        Ok(self
            .chunk_tokenizer
            .encode(text, false)
            .map_err(|e| e.to_string())?
            .len())
    }

    /// Whether every id is one of this model's tokens; the first that is not, as an error.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), String> {
        let vocab = self.chunk_tokenizer.get_vocab_size(true);
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(bad) => Err(format!(
                "token {bad} is not in the model's vocabulary of {vocab}"
            )),
            None => Ok(()),
        }
    }

    /// Embeds rows of this model's token ids (OpenAI's token-array input) as they are, each
    /// between the model's `[CLS]` and `[SEP]` as a text's tokens are, L2-normalised as
    /// [`Encoder::embed`]'s. Rows must fit the model with those two (checked by the caller).
    /// Blocking.
    pub fn embed_ids(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, tch::TchError> {
        let special = |token: &str| {
            self.model_tokenizer.token_to_id(token).ok_or_else(|| {
                tch::TchError::Convert(format!("the tokenizer has no {token} token"))
            })
        };
        let (cls, sep) = (special("[CLS]")?, special("[SEP]")?);
        let pad = self.model_tokenizer.token_to_id("[PAD]").unwrap_or(0);
        let _no_grad = tch::no_grad_guard();
        let mut out = Vec::with_capacity(rows.len());
        for batch in rows.chunks(EMBED_BATCH) {
            let width = batch.iter().map(Vec::len).max().unwrap_or(0) + 2;
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            for row in batch {
                let tokens = std::iter::once(cls)
                    .chain(row.iter().copied())
                    .chain(std::iter::once(sep));
                let padding = width - row.len() - 2;
                ids.extend(
                    tokens
                        .chain(std::iter::repeat_n(pad, padding))
                        .map(i64::from),
                );
                mask.extend(
                    std::iter::repeat_n(1i64, row.len() + 2).chain(std::iter::repeat_n(0, padding)),
                );
            }
            out.extend(self.forward(ids, mask, batch.len(), width)?);
        }
        Ok(out)
    }

    /// The model on `rows` rows of `width` ids and their attention mask: one embedding a row.
    fn forward(
        &self,
        ids: Vec<i64>,
        mask: Vec<i64>,
        rows: usize,
        width: usize,
    ) -> Result<Vec<Vec<f32>>, tch::TchError> {
        let shape = [rows as i64, width as i64];
        let ids = Tensor::f_from_slice(&ids)?
            .f_view(shape)?
            .f_to_device(self.device)?;
        let mask = Tensor::f_from_slice(&mask)?
            .f_view(shape)?
            .f_to_device(self.device)?;
        let embeddings = self
            .module
            .forward_ts(&[ids, mask])?
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?;
        let flat = Vec::<f32>::try_from(embeddings.f_flatten(0, -1)?)?;
        let dims = flat.len() / rows.max(1);
        Ok(flat.chunks(dims.max(1)).map(<[f32]>::to_vec).collect())
    }

    /// Embeds `texts` (each truncated at [`MAX_MODEL_TOKENS`]), L2-normalised, in batches.
    /// Blocking: call it from a blocking thread. Callers that must stop at a job's cancellation
    /// embed a batch per call (see `extract`).
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, tch::TchError> {
        let _no_grad = tch::no_grad_guard();
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(EMBED_BATCH) {
            let encodings = self
                .model_tokenizer
                .encode_batch(batch.to_vec(), true)
                .map_err(|e| tch::TchError::Convert(format!("tokenizer: {e}")))?;
            let rows = encodings.len();
            let width = encodings.first().map_or(0, |e| e.len());
            let ids: Vec<i64> = encodings
                .iter()
                .flat_map(|e| e.get_ids().iter().map(|&i| i64::from(i)))
                .collect();
            let mask: Vec<i64> = encodings
                .iter()
                .flat_map(|e| e.get_attention_mask().iter().map(|&m| i64::from(m)))
                .collect();
            out.extend(self.forward(ids, mask, rows, width)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_text_and_cut_after_whitespace() {
        let text = "ab cd ef gh ij";
        let cut: Vec<(usize, &str)> = pieces(text, 4).collect();
        assert_eq!(cut.iter().map(|(_, p)| *p).collect::<String>(), text);
        assert_eq!(cut[0], (0, "ab c"));
        assert_eq!(pieces("aaa aaaa aaaa", 4).next(), Some((0, "aaa ")));
        let wide = "é".repeat(10);
        let cut: Vec<(usize, &str)> = pieces(&wide, 3).collect();
        assert_eq!(cut.iter().map(|(_, p)| *p).collect::<String>(), wide);
        assert!(cut
            .iter()
            .all(|(start, p)| &wide[*start..*start + p.len()] == *p));
    }
}
