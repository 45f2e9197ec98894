//! The sentence encoder: MiniLM as TorchScript (mean pooling and L2 normalisation in the graph)
//! plus its tokenizer. Jobs tokenize on their own threads; every forward pass runs on the
//! encoder's [`Batcher`], with the rows of whatever other jobs are waiting.

use std::path::Path;
use std::sync::Arc;

use tch::Device;
use tokenizers::{Tokenizer, TruncationParams};
use tokio_util::sync::CancellationToken;

use super::batcher::{BatchLimits, Batcher, Ticket};
use super::padded::PaddedModule;
use super::{load_module, LoadError};
use crate::outcome::JobError;

/// Tokens per text the model is fed (all-MiniLM-L6-v2 was trained on 256).
pub const MAX_MODEL_TOKENS: usize = 256;
/// Texts a job hands to the batcher at once where it stops between calls (extract's chunks,
/// between which it streams and checks its cancellation).
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
    /// Truncates at [`MAX_MODEL_TOKENS`]; the batcher pads.
    model_tokenizer: Tokenizer,
    /// No truncation, no padding: counts and cuts documents into chunks.
    chunk_tokenizer: Tokenizer,
    /// Runs every forward pass of this model on this device.
    batcher: Batcher,
    /// `[CLS]` and `[SEP]`, which wrap a token-array input as they wrap a text's tokens.
    specials: (u32, u32),
    /// `[PAD]`.
    pad: u32,
    dims: usize,
    name: String,
}

/// What the warm-up embeds: a sentence of an ordinary length.
const WARM_UP_TEXT: &str = "The worker warms its model before it takes the first job.";

/// How a device is named in logs, `/health` and metrics: `cpu`, `cuda:0`.
pub fn device_label(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        _ => "cpu".to_owned(),
    }
}

impl Encoder {
    /// Loads `minilm.pt` and `tokenizer.json` from `dir` onto `device`, its batcher bounded by
    /// `limits`.
    pub fn load(dir: &Path, device: Device, limits: BatchLimits) -> Result<Self, LoadError> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(LoadError::Missing(tokenizer_path));
        }
        let unreadable = |reason: String| LoadError::Unreadable {
            path: tokenizer_path.clone(),
            reason,
        };
        // The tokenizer's JSON is read while libtorch loads the module: both are on the cold
        // start's path, and neither needs the other.
        let (module, tokenizer) = std::thread::scope(|scope| {
            let tokenizer = scope.spawn(|| Tokenizer::from_file(&tokenizer_path));
            let module = load_module(&dir.join("minilm.pt"), device);
            let tokenizer = tokenizer
                .join()
                .unwrap_or_else(|_| Err("the tokenizer's loader panicked".into()));
            (module, tokenizer)
        });
        let module = module?;
        let mut chunk_tokenizer = tokenizer.map_err(|e| unreadable(e.to_string()))?;
        // The file pads every encoding to 128 tokens and truncates there: override both.
        chunk_tokenizer.with_padding(None);
        chunk_tokenizer
            .with_truncation(None)
            .map_err(|e| unreadable(e.to_string()))?;
        let mut model_tokenizer = chunk_tokenizer.clone();
        model_tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_MODEL_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| unreadable(e.to_string()))?;
        let special = |token: &str| {
            model_tokenizer
                .token_to_id(token)
                .ok_or_else(|| unreadable(format!("the tokenizer has no {token} token")))
        };
        let specials = (special("[CLS]")?, special("[SEP]")?);
        let pad = model_tokenizer.token_to_id("[PAD]").unwrap_or(0);
        let name = "all-MiniLM-L6-v2".to_owned();
        let batcher = Batcher::start(
            Arc::new(PaddedModule::new(module, device, pad)),
            &name,
            device,
            limits,
        );
        let encoder = Self {
            model_tokenizer,
            chunk_tokenizer,
            batcher,
            specials,
            pad,
            dims: 0,
            name,
        };
        // One forward to learn the width and to fail at start-up rather than on a job.
        let probe = encoder
            .embed(&["warm-up".to_owned()], &Ticket::unbounded())
            .map_err(|e| LoadError::Unreadable {
                path: dir.join("minilm.pt"),
                reason: e.message,
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

    /// The id rows are padded with (a classify logits model shares the tokenizer).
    pub fn pad(&self) -> u32 {
        self.pad
    }

    /// The batcher every forward pass of this encoder runs on.
    pub fn batcher(&self) -> &Batcher {
        &self.batcher
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

    /// The ids the model is fed for each text: special tokens included, truncated at
    /// [`MAX_MODEL_TOKENS`], unpadded (the batcher pads each pass to its longest row).
    pub fn ids(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, JobError> {
        let encodings = self
            .model_tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| {
                JobError::invalid_input(format!("the text could not be tokenized: {e}"))
            })?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Runs the model as a job would, twice (TorchScript's profiling executor optimises the
    /// graph on its second call): see [`crate::handlers::Handler::warm_up`].
    pub fn warm_up(&self) -> Result<(), String> {
        let texts = vec![WARM_UP_TEXT.to_owned()];
        for _ in 0..2 {
            self.embed(&texts, &Ticket::unbounded())
                .map_err(|e| format!("{}: {}", self.name(), e.message))?;
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
    /// Blocking: call it from a blocking thread.
    pub fn embed_ids(&self, rows: &[Vec<u32>], ticket: &Ticket) -> Result<Vec<Vec<f32>>, JobError> {
        let (cls, sep) = self.specials;
        let rows = rows
            .iter()
            .map(|row| {
                std::iter::once(cls)
                    .chain(row.iter().copied())
                    .chain(std::iter::once(sep))
                    .collect()
            })
            .collect();
        self.batcher.run(rows, ticket)
    }

    /// Embeds `texts` (each truncated at [`MAX_MODEL_TOKENS`]), L2-normalised, with whatever
    /// else is waiting for the model. Blocking: call it from a blocking thread. The job's
    /// `ticket` drops its rows once it is cancelled.
    pub fn embed(&self, texts: &[String], ticket: &Ticket) -> Result<Vec<Vec<f32>>, JobError> {
        let rows = self.ids(texts)?;
        self.batcher.run(rows, ticket)
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
