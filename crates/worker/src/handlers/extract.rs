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
use super::openai::{self, OpenAiRequest};
use super::parser::ParserPool;
use super::stream_out::{pack, ProgressClock, STREAM_MESSAGE_LIMIT};
use super::{Handler, JobContext, Prepared};
use crate::model::{Encoder, OnDevices, EMBED_BATCH};
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

/// What the prepare stage hands to the model work: a document, or an OpenAI request.
enum ExtractWork {
    Document(ExtractJob),
    OpenAi(OpenAiRequest),
}

/// A document to extract.
struct ExtractJob {
    chunk_tokens: usize,
    overlap: usize,
    embed: bool,
    /// Stream each batch of chunks through job-stream as it is embedded.
    stream: bool,
    /// With `stream`: the final output still holds every chunk (the SDK's
    /// `return_aggregate_stream`); without, only a summary.
    aggregate: bool,
    document: Document,
}

/// `input.<key>`: true or false, `default` when absent.
fn flag(ctx: &JobContext, key: &str, default: bool) -> Result<bool, JobError> {
    match ctx.input.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(JobError::invalid_input(format!(
            "input.{key} must be true or false"
        ))),
    }
}

/// Bytes a JSON number of an embedding takes at the least (a digit and a comma). With these,
/// the chunk count gives a lower bound of the output's size before anything is embedded.
const MIN_BYTES_PER_FLOAT: u64 = 2;
/// Bytes of a chunk's JSON around its text at the least: `{"index":0,"text":""},` ...
const CHUNK_OVERHEAD: u64 = 22;
/// ... and around its numbers: `"embedding":[],`.
const EMBEDDING_OVERHEAD: u64 = 15;

/// Refuses, after the first batch, an output whose embeddings will not fit: each takes about
/// as many bytes as the first batch's smallest did (10 to 13 a number, not the floor's 2), so
/// a document of many chunks fails now, not after all of its embeddings were computed.
fn projected_fits(
    first: &[(String, Option<Vec<f32>>)],
    ranges: &[(usize, usize)],
    text_len: usize,
    limit: u64,
) -> Result<(), JobError> {
    let Some(per_embedding) = first
        .iter()
        .filter_map(|(_, embedding)| embedding.as_ref())
        .filter_map(|embedding| serde_json::to_vec(embedding).ok())
        .map(|json| json.len() as u64 + EMBEDDING_OVERHEAD)
        .min()
    else {
        return Ok(());
    };
    let chunk_texts: u64 = ranges.iter().map(|(a, b)| (b - a) as u64).sum();
    let projected =
        text_len as u64 + chunk_texts + ranges.len() as u64 * (CHUNK_OVERHEAD + per_embedding);
    if projected <= limit {
        return Ok(());
    }
    Err(JobError::new(
        ErrorType::OutputTooLarge,
        format!(
            "the result would take about {projected} bytes ({} chunks, each embedding about \
             {per_embedding} bytes of JSON, projected from the first {}), over the limit of \
             {limit} bytes; send a shorter document, larger chunks, embed: false, or stream \
             the chunks (stream: true)",
            ranges.len(),
            first.len()
        ),
    ))
}

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
        if openai::is_openai(&ctx.input) {
            // Counting tokens of up to 2,048 inputs is CPU work: on a blocking thread. The
            // tokenizer is the same on every device's copy.
            let encoder = self.encoder.for_device(None)?.clone();
            let input = ctx.input.clone();
            let request = ctx
                .run_blocking(move || openai::parse(&input, &encoder))
                .await??;
            return Ok(Prepared::new(ExtractWork::OpenAi(request)));
        }
        let chunk_tokens = option(ctx, "chunk_tokens", self.chunk_tokens, 254)?;
        let overlap = option(ctx, "overlap", self.overlap, chunk_tokens / 2)?;
        let embed = flag(ctx, "embed", true)?;
        let stream = flag(ctx, "stream", false)?;
        let aggregate = flag(ctx, "return_aggregate_stream", false)?;
        let source = document::source_of(&ctx.input, false, &self.fetch).await?;
        let document = document::read(source, &self.parsers).await?;
        Ok(Prepared::new(ExtractWork::Document(ExtractJob {
            chunk_tokens,
            overlap,
            embed,
            stream,
            aggregate,
            document,
        })))
    }

    async fn run(&self, ctx: JobContext, prepared: Prepared) -> Result<Value, JobError> {
        match prepared.take()? {
            ExtractWork::Document(job) => self.extract(ctx, job).await,
            ExtractWork::OpenAi(request) => {
                let encoder = self.encoder.for_device(ctx.device)?.clone();
                let ticket = ctx.ticket();
                ctx.run_blocking(move || openai::answer(request, &encoder, &ticket))
                    .await?
            }
        }
    }

    fn batchers(&self) -> Vec<Arc<dyn crate::model::AnyBatcher>> {
        self.encoder
            .0
            .iter()
            .map(|e| Arc::new(e.batcher().clone()) as Arc<dyn crate::model::AnyBatcher>)
            .collect()
    }

    fn warm_up(&self) -> Result<(), String> {
        self.encoder
            .0
            .iter()
            .try_for_each(|encoder| encoder.warm_up())
    }
}

impl ExtractHandler {
    /// A document cut into chunks, embedded, streamed or returned whole.
    async fn extract(&self, ctx: JobContext, job: ExtractJob) -> Result<Value, JobError> {
        let ExtractJob {
            chunk_tokens,
            overlap,
            embed,
            stream,
            aggregate,
            document: Document { text, pages },
        } = job;
        let encoder = self.encoder.for_device(ctx.device)?.clone();
        let cancelled = || JobError::internal("the job was cancelled");
        let (cancel, tokenizer) = (ctx.cancel.clone(), encoder.clone());
        let (text, offsets) = ctx
            .run_blocking(move || {
                let offsets = tokenizer.token_offsets(&text, &cancel);
                (text, offsets)
            })
            .await?;
        let offsets = offsets
            .map_err(|_| JobError::invalid_input("the text could not be tokenized"))?
            .ok_or_else(cancelled)?;
        let ranges = chunk_ranges(&offsets, chunk_tokens, overlap, text.len());
        let keep_all = !stream || aggregate;
        // Refused before the embeddings and the JSON exist, when it cannot fit anyway.
        let floor = output_floor(text.len(), &ranges, encoder.dims(), embed);
        if keep_all && floor > ctx.max_output_bytes {
            return Err(JobError::new(
                ErrorType::OutputTooLarge,
                format!(
                    "the result would take at least {floor} bytes ({} chunks of text and \
                     embeddings), over the limit of {} bytes; send a shorter document, set \
                     embed to false, or stream the chunks (stream: true)",
                    ranges.len(),
                    ctx.max_output_bytes
                ),
            ));
        }
        let total = ranges.len();
        let mut pending = ranges
            .iter()
            .map(|&(a, b)| text[a..b].to_owned())
            .collect::<Vec<String>>()
            .into_iter();
        let mut chunks = Vec::with_capacity(if keep_all { total } else { 0 });
        let mut clock = ProgressClock::start(ctx.progress_every);
        let mut done = 0;
        loop {
            let batch: Vec<String> = pending.by_ref().take(EMBED_BATCH).collect();
            if batch.is_empty() {
                break;
            }
            if ctx.cancel.is_cancelled() {
                return Err(cancelled());
            }
            let embeddings = if embed {
                let (embedding, ticket) = (encoder.clone(), ctx.ticket());
                let (texts, embeddings) = ctx
                    .run_blocking(move || {
                        let embeddings = embedding.embed(&batch, &ticket);
                        (batch, embeddings)
                    })
                    .await?;
                let embeddings = embeddings?;
                for embedding in &embeddings {
                    crate::model::finite(embedding, "embeddings")?;
                }
                texts
                    .into_iter()
                    .zip(embeddings.into_iter().map(Some))
                    .collect()
            } else {
                batch
                    .into_iter()
                    .map(|text| (text, None))
                    .collect::<Vec<_>>()
            };
            if keep_all && embed && done == 0 {
                projected_fits(&embeddings, &ranges, text.len(), ctx.max_output_bytes)?;
            }
            let mut values: Vec<Value> = embeddings
                .into_iter()
                .enumerate()
                .map(|(i, (text, embedding))| chunk_value(done + i, text, embedding))
                .collect();
            done += values.len();
            if stream {
                let streamed = if keep_all {
                    values.clone()
                } else {
                    std::mem::take(&mut values)
                };
                for message in pack("chunks", streamed, STREAM_MESSAGE_LIMIT) {
                    ctx.stream(message).await?;
                }
            }
            chunks.extend(values);
            maybe_progress(&ctx, &mut clock, done, total).await;
        }
        let mut output = json!({
            "pages": pages,
            "tokens": offsets.len(),
            "model": encoder.name(),
            "dims": encoder.dims(),
        });
        if keep_all {
            output["text"] = Value::String(text);
            output["chunks"] = Value::Array(chunks);
        } else {
            output["chunks_streamed"] = json!(total);
        }
        Ok(output)
    }
}

/// One chunk of the output.
fn chunk_value(index: usize, text: String, embedding: Option<Vec<f32>>) -> Value {
    match embedding {
        Some(embedding) => json!({ "index": index, "text": text, "embedding": embedding }),
        None => json!({ "index": index, "text": text }),
    }
}

/// A progress update (`chunks_done` of `chunks_total`) when one is due.
async fn maybe_progress(ctx: &JobContext, clock: &mut ProgressClock, done: usize, total: usize) {
    if clock.due() {
        ctx.progress(json!({ "chunks_done": done, "chunks_total": total }))
            .await;
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
