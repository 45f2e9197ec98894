//! `extract`: a document in, its text out, cut into chunks by tokenizer tokens (never silently
//! truncated), with an embedding per chunk: `{text, pages, chunks: [{index, text, embedding}],
//! model, dims}`. CPU-bound by default. The document is fetched and parsed in the prepare
//! stage; tokenizing and embedding stop at the job's cancellation, and an output that cannot
//! fit `max_result_size` is refused before it is built.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Value};

use super::document::{self, Document};
use super::fetch::FetchPolicy;
use super::parser::ParserPool;
use super::{Handler, JobContext, Prepared};
use crate::model::{torch_error, Encoder, OnDevices};
use crate::outcome::{ErrorType, JobError};

/// The extraction handler.
pub struct ExtractHandler {
    /// The shared encoder, one per device.
    pub encoder: OnDevices<Arc<Encoder>>,
    /// Tokens per chunk.
    pub chunk_tokens: usize,
    /// Tokens shared by consecutive chunks.
    pub overlap: usize,
    /// URL fetching limits.
    pub fetch: FetchPolicy,
    /// Where documents are parsed.
    pub parsers: ParserPool,
}

/// Cuts `text` into windows of `size` tokens sharing `overlap`, as byte ranges of the text.
pub fn chunk_ranges(
    offsets: &[(usize, usize)],
    size: usize,
    overlap: usize,
    text_len: usize,
) -> Vec<(usize, usize)> {
    if offsets.is_empty() {
        return vec![(0, text_len)];
    }
    let step = size.saturating_sub(overlap).max(1);
    let mut ranges = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + size).min(offsets.len());
        ranges.push((offsets[start].0, offsets[end - 1].1));
        if end == offsets.len() {
            return ranges;
        }
        start += step;
    }
}

fn option(ctx: &JobContext, key: &str, default: usize, max: usize) -> Result<usize, JobError> {
    match ctx.input.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .map(|n| n as usize)
            .filter(|n| (1..=max).contains(n) || (key == "overlap" && *n == 0))
            .ok_or_else(|| {
                JobError::invalid_input(format!("input.{key} must be a whole number up to {max}"))
            }),
    }
}

/// What the prepare stage hands to the model work.
struct ExtractJob {
    chunk_tokens: usize,
    overlap: usize,
    embed: bool,
    document: Document,
}

/// Bytes a JSON number of an embedding takes at the least (a digit and a comma). With these,
/// the chunk count gives a lower bound of the output's size before anything is embedded.
const MIN_BYTES_PER_FLOAT: u64 = 2;
/// Bytes of a chunk's JSON around its text at the least: `{"index":0,"text":""},` ...
const CHUNK_OVERHEAD: u64 = 22;
/// ... and around its numbers: `"embedding":[],`.
const EMBEDDING_OVERHEAD: u64 = 15;

/// The least the output can take, from what is known before it is built.
fn output_floor(text_len: usize, ranges: &[(usize, usize)], dims: usize, embed: bool) -> u64 {
    let chunk_texts: u64 = ranges.iter().map(|(a, b)| (b - a) as u64).sum();
    let numbers = if embed {
        ranges.len() as u64 * (dims as u64 * MIN_BYTES_PER_FLOAT + EMBEDDING_OVERHEAD)
    } else {
        0
    };
    text_len as u64 + chunk_texts + ranges.len() as u64 * CHUNK_OVERHEAD + numbers
}

#[async_trait]
impl Handler for ExtractHandler {
    async fn prepare(&self, ctx: &JobContext) -> Result<Prepared, JobError> {
        let chunk_tokens = option(ctx, "chunk_tokens", self.chunk_tokens, 254)?;
        let overlap = option(ctx, "overlap", self.overlap, chunk_tokens / 2)?;
        let embed = match ctx.input.get("embed") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(JobError::invalid_input("input.embed must be true or false")),
        };
        let source = document::source_of(&ctx.input, false, &self.fetch).await?;
        let document = document::read(source, &self.parsers).await?;
        Ok(Prepared::new(ExtractJob {
            chunk_tokens,
            overlap,
            embed,
            document,
        }))
    }

    async fn run(&self, ctx: JobContext, prepared: Prepared) -> Result<Value, JobError> {
        let ExtractJob {
            chunk_tokens,
            overlap,
            embed,
            document: Document { text, pages },
        } = prepared.take()?;
        let encoder = self.encoder.for_device(ctx.device)?.clone();
        let cancel = ctx.cancel.clone();
        let max_output = ctx.max_output_bytes;
        ctx.run_blocking(move || {
            let cancelled = || JobError::internal("the job was cancelled");
            let offsets = encoder
                .token_offsets(&text, &cancel)
                .map_err(|_| JobError::invalid_input("the text could not be tokenized"))?
                .ok_or_else(cancelled)?;
            let ranges = chunk_ranges(&offsets, chunk_tokens, overlap, text.len());
            // Refused before the embeddings and the JSON exist, when it cannot fit anyway.
            let floor = output_floor(text.len(), &ranges, encoder.dims(), embed);
            if floor > max_output {
                return Err(JobError::new(
                    ErrorType::OutputTooLarge,
                    format!(
                        "the result would take at least {floor} bytes ({} chunks of text and \
                         embeddings), over the limit of {max_output} bytes; send a shorter \
                         document, or set embed to false",
                        ranges.len()
                    ),
                ));
            }
            let chunk_texts: Vec<String> =
                ranges.iter().map(|&(a, b)| text[a..b].to_owned()).collect();
            let embeddings = if embed {
                encoder
                    .embed_until(&chunk_texts, &cancel)
                    .map_err(|e| torch_error(&e, 10))?
            } else {
                Vec::new()
            };
            if cancel.is_cancelled() {
                return Err(cancelled());
            }
            let chunks: Vec<Value> = chunk_texts
                .into_iter()
                .zip(
                    embeddings
                        .into_iter()
                        .map(Some)
                        .chain(std::iter::repeat(None)),
                )
                .enumerate()
                .map(|(index, (text, embedding))| match embedding {
                    Some(embedding) => {
                        json!({ "index": index, "text": text, "embedding": embedding })
                    }
                    None => json!({ "index": index, "text": text }),
                })
                .collect();
            Ok(json!({
                "text": text,
                "pages": pages,
                "tokens": offsets.len(),
                "chunks": chunks,
                "model": encoder.name(),
                "dims": encoder.dims(),
            }))
        })
        .await?
    }

    fn warm_up(&self) -> Result<(), String> {
        self.encoder
            .0
            .iter()
            .try_for_each(|encoder| encoder.warm_up())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_floor_is_never_more_than_the_output() {
        let text = "a b";
        let ranges = [(0, 1), (2, 3)];
        for embed in [true, false] {
            let chunks: Vec<Value> = ranges
                .iter()
                .enumerate()
                .map(|(index, &(a, b))| {
                    // The shortest numbers JSON can hold.
                    let embedding = vec![0u8; 4];
                    if embed {
                        json!({"index": index, "text": &text[a..b], "embedding": embedding})
                    } else {
                        json!({"index": index, "text": &text[a..b]})
                    }
                })
                .collect();
            let output = json!({"text": text, "chunks": chunks});
            let size = serde_json::to_vec(&output).unwrap().len() as u64;
            let floor = output_floor(text.len(), &ranges, 4, embed);
            assert!(floor <= size, "embed {embed}: floor {floor} over {size}");
            assert!(
                floor * 2 > size,
                "embed {embed}: floor {floor} far under {size}"
            );
        }
    }

    #[test]
    fn chunks_cover_every_token_with_the_overlap() {
        let offsets: Vec<(usize, usize)> = (0..10).map(|i| (i * 2, i * 2 + 1)).collect();
        let ranges = chunk_ranges(&offsets, 4, 1, 20);
        assert_eq!(ranges, vec![(0, 7), (6, 13), (12, 19)]);
        assert_eq!(chunk_ranges(&[], 4, 1, 5), vec![(0, 5)]);
        assert_eq!(chunk_ranges(&offsets[..3], 4, 1, 20), vec![(0, 5)]);
    }
}
