//! OpenAI-compatible embeddings. The platform forwards `…/v2/{endpoint}/openai/v1/*` to a
//! worker as a job whose input carries `openai_route` (`/v1/embeddings`, `/v1/models`) and
//! `openai_input` (the request body), the way the popular embedding worker templates serve the
//! official `openai` client. Such a job is routed by `openai_route`, whatever its `task`, to the
//! handler `[handler] openai_handler` names (an `extract` handler: its encoder, its limits, its
//! GPU memory), and answers in OpenAI's shape. Refusals are `InvalidInput` results with OpenAI's
//! wording; the queue's OpenAI route turns them into OpenAI's error object.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::model::{Encoder, Ticket, MAX_MODEL_TOKENS};
use crate::outcome::JobError;

/// Most inputs one request may embed (OpenAI's limit).
const MAX_INPUTS: usize = 2048;
/// Most tokens one request may embed, all inputs together (OpenAI's limit).
const MAX_REQUEST_TOKENS: usize = 300_000;

/// One input of an embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbeddingInput {
    /// A text, tokenized as any text is.
    Text(String),
    /// This model's token ids, embedded as they are (not decoded and tokenized again).
    Tokens(Vec<u32>),
}

/// Whether a job's input is an OpenAI request.
pub fn is_openai(input: &Map<String, Value>) -> bool {
    input.contains_key("openai_route")
}

/// One OpenAI request, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum OpenAiRequest {
    /// `POST /v1/embeddings`.
    Embeddings {
        /// The inputs, in order.
        inputs: Vec<EmbeddingInput>,
        /// `encoding_format: "base64"`: little-endian f32 bytes, base64 (the `openai` client's
        /// default).
        base64: bool,
        /// Tokens across the inputs, special tokens left out, as OpenAI counts them (`usage`).
        prompt_tokens: usize,
    },
    /// `GET /v1/models`.
    Models,
}

fn invalid(message: impl Into<String>) -> JobError {
    JobError::invalid_input(message)
}

/// Reads and checks the request against `encoder` (its model name, its token limit).
pub fn parse(input: &Map<String, Value>, encoder: &Encoder) -> Result<OpenAiRequest, JobError> {
    let route = input
        .get("openai_route")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("input.openai_route must be a string such as \"/v1/embeddings\""))?;
    let path = route
        .split('?')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/');
    let path = path.strip_prefix("/v1").unwrap_or(path);
    match path {
        "/embeddings" => embeddings(input.get("openai_input"), encoder),
        "/models" => Ok(OpenAiRequest::Models),
        _ => {
            let shown: String = route.chars().take(80).collect();
            Err(invalid(format!(
                "Invalid URL ({shown}): this worker serves /v1/embeddings and /v1/models"
            )))
        }
    }
}

fn embeddings(body: Option<&Value>, encoder: &Encoder) -> Result<OpenAiRequest, JobError> {
    let Some(Value::Object(body)) = body else {
        return Err(invalid(
            "input.openai_input must be the request's JSON object",
        ));
    };
    match body.get("model").and_then(Value::as_str) {
        None => return Err(invalid("you must provide a model parameter")),
        Some(model) if !names_the_model(model, encoder.name()) => {
            let shown: String = model.chars().take(80).collect();
            return Err(invalid(format!(
                "The model `{shown}` does not exist: this worker serves `{}`",
                encoder.name()
            )));
        }
        Some(_) => {}
    }
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => return Err(invalid("encoding_format must be \"float\" or \"base64\"")),
    };
    if let Some(dimensions) = body.get("dimensions").filter(|d| !d.is_null()) {
        if dimensions.as_u64() != Some(encoder.dims() as u64) {
            return Err(invalid(format!(
                "This model does not support specifying dimensions other than {}",
                encoder.dims()
            )));
        }
    }
    let inputs = inputs_of(body.get("input"), encoder)?;
    let mut prompt_tokens = 0;
    for input in &inputs {
        // What the model sees has its `[CLS]` and `[SEP]` too; `usage` leaves them out.
        let (content, seen) = match input {
            EmbeddingInput::Text(text) => {
                let (_, seen) = encoder.token_counts(text).map_err(invalid)?;
                (encoder.content_tokens(text).map_err(invalid)?, seen)
            }
            EmbeddingInput::Tokens(ids) => (ids.len(), ids.len() + 2),
        };
        if seen > MAX_MODEL_TOKENS {
            return Err(invalid(format!(
                "This model's maximum context length is {MAX_MODEL_TOKENS} tokens, however you \
                 requested {seen} tokens ({seen} in your prompt). Please reduce your prompt."
            )));
        }
        prompt_tokens += content;
    }
    if prompt_tokens > MAX_REQUEST_TOKENS {
        return Err(invalid(format!(
            "Requested {prompt_tokens} tokens, max {MAX_REQUEST_TOKENS} tokens per request"
        )));
    }
    Ok(OpenAiRequest::Embeddings {
        inputs,
        base64,
        prompt_tokens,
    })
}

/// `model` as a client names it: the model's name, with or without its organisation.
fn names_the_model(model: &str, name: &str) -> bool {
    model == name || model.rsplit('/').next() == Some(name)
}

/// `input`: a string, a list of strings, a token array or a list of token arrays. Each names
/// its own problem: an empty list, an empty string, an empty token array.
fn inputs_of(input: Option<&Value>, encoder: &Encoder) -> Result<Vec<EmbeddingInput>, JobError> {
    let shape = "input must be a string, an array of strings, an array of tokens or an array \
                 of token arrays";
    let inputs = match input {
        Some(Value::String(text)) => vec![text_input(text)?],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(invalid("input cannot be an empty array"))
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![tokens_input(items, encoder)?]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text_input(text),
                Value::Array(tokens) => tokens_input(tokens, encoder),
                _ => Err(invalid(shape)),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(invalid(shape)),
    };
    if inputs.len() > MAX_INPUTS {
        return Err(invalid(format!(
            "input must hold from 1 to {MAX_INPUTS} items, not {}",
            inputs.len()
        )));
    }
    Ok(inputs)
}

fn text_input(text: &str) -> Result<EmbeddingInput, JobError> {
    if text.is_empty() {
        return Err(invalid("input cannot contain an empty string"));
    }
    Ok(EmbeddingInput::Text(text.to_owned()))
}

/// Token ids of this model's vocabulary, kept as ids.
fn tokens_input(tokens: &[Value], encoder: &Encoder) -> Result<EmbeddingInput, JobError> {
    if tokens.is_empty() {
        return Err(invalid("input cannot contain an empty token array"));
    }
    let ids = tokens
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| invalid("a token array holds whole numbers only"))?;
    encoder.check_ids(&ids).map_err(invalid)?;
    Ok(EmbeddingInput::Tokens(ids))
}

/// Answers the request (blocking: it runs the model).
pub fn answer(
    request: OpenAiRequest,
    encoder: &Encoder,
    ticket: &Ticket,
) -> Result<Value, JobError> {
    match request {
        OpenAiRequest::Models => Ok(json!({
            "object": "list",
            "data": [{
                "id": encoder.name(),
                "object": "model",
                "created": 0,
                "owned_by": "runpod-worker",
            }],
        })),
        OpenAiRequest::Embeddings {
            inputs,
            base64,
            prompt_tokens,
        } => {
            let embeddings = embed_in_order(&inputs, encoder, ticket)?;
            for embedding in &embeddings {
                crate::model::finite(embedding, "embeddings")?;
            }
            let data: Vec<Value> = embeddings
                .into_iter()
                .enumerate()
                .map(|(index, embedding)| {
                    let embedding = if base64 {
                        let bytes: Vec<u8> =
                            embedding.iter().flat_map(|f| f.to_le_bytes()).collect();
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    } else {
                        json!(embedding)
                    };
                    json!({ "object": "embedding", "index": index, "embedding": embedding })
                })
                .collect();
            Ok(json!({
                "object": "list",
                "data": data,
                "model": encoder.name(),
                "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
            }))
        }
    }
}

/// The inputs' embeddings, in the inputs' order: the texts in one call, the token arrays in
/// another.
fn embed_in_order(
    inputs: &[EmbeddingInput],
    encoder: &Encoder,
    ticket: &Ticket,
) -> Result<Vec<Vec<f32>>, JobError> {
    let (mut texts, mut rows) = (Vec::new(), Vec::new());
    for input in inputs {
        match input {
            EmbeddingInput::Text(text) => texts.push(text.clone()),
            EmbeddingInput::Tokens(ids) => rows.push(ids.clone()),
        }
    }
    let mut texts = encoder.embed(&texts, ticket)?.into_iter();
    let mut rows = encoder.embed_ids(&rows, ticket)?.into_iter();
    Ok(inputs
        .iter()
        .filter_map(|input| match input {
            EmbeddingInput::Text(_) => texts.next(),
            EmbeddingInput::Tokens(_) => rows.next(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_named_with_or_without_its_organisation() {
        assert!(names_the_model("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"));
        assert!(names_the_model(
            "sentence-transformers/all-MiniLM-L6-v2",
            "all-MiniLM-L6-v2"
        ));
        assert!(!names_the_model(
            "text-embedding-3-small",
            "all-MiniLM-L6-v2"
        ));
    }
}
