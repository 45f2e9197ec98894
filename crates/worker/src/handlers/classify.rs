//! `classify`: zero-shot classification. The text (or a document, never both) and the labels
//! are embedded by the same encoder; scores are a softmax over cosine similarities divided by a
//! temperature (the config's, or the job's within 0.001 to 100). Label embeddings are cached.
//! With a logits `model` in the config, that model's outputs are scored against the configured
//! labels instead. Any truncation of the text is stated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use serde_json::{json, Map, Value};

use super::document;
use super::fetch::FetchPolicy;
use super::parser::ParserPool;
use super::{Handler, JobContext, Prepared};
use crate::model::{AnyBatcher, Batcher, Encoder, OnDevices, Ticket};
use crate::outcome::JobError;

/// Most labels in one job.
const MAX_LABELS: usize = 256;
/// Longest label, in characters.
const MAX_LABEL_CHARS: usize = 200;
/// Cached label embeddings before the cache is cleared.
const CACHE_LIMIT: usize = 10_000;
/// A job's `temperature` range: the one `handlers.<name>.temperature` is checked against.
const TEMPERATURES: std::ops::RangeInclusive<f64> = 0.001..=100.0;

/// A label's embedding, shared with the cache.
type LabelEmbedding = Arc<Vec<f32>>;

/// How labels are phrased for the encoder.
fn label_sentence(label: &str) -> String {
    format!("This text is a {label}.")
}

/// Where scores come from.
pub enum ClassifyMode {
    /// Cosine similarity between text and label embeddings.
    ZeroShot,
    /// A TorchScript model `(input_ids, attention_mask) -> logits [rows, labels]`, on each
    /// device's batcher.
    Logits(OnDevices<Batcher>),
}

/// The classification handler (the classifier, shared with its blocking threads).
pub struct ClassifyHandler(pub Arc<Classifier>);

/// What classifies.
pub struct Classifier {
    /// The shared encoder (and tokenizer, for the logits model), one per device.
    pub encoder: OnDevices<Arc<Encoder>>,
    /// Zero-shot or logits.
    pub mode: ClassifyMode,
    /// Labels used when a job gives none (the logits model's labels).
    pub default_labels: Vec<String>,
    /// Softmax temperature.
    pub temperature: f64,
    /// URL fetching limits.
    pub fetch: FetchPolicy,
    /// Where documents are parsed.
    pub parsers: ParserPool,
    /// label → embedding.
    pub cache: Mutex<HashMap<String, Arc<Vec<f32>>>>,
}

fn labels_of(input: &Map<String, Value>, defaults: &[String]) -> Result<Vec<String>, JobError> {
    let Some(value) = input.get("labels") else {
        if defaults.is_empty() {
            return Err(JobError::invalid_input(
                "input.labels is required (no default labels are configured)",
            ));
        }
        return Ok(defaults.to_vec());
    };
    let Some(items) = value.as_array() else {
        return Err(JobError::invalid_input(
            "input.labels must be an array of strings",
        ));
    };
    if items.is_empty() {
        return Err(JobError::invalid_input("input.labels is empty"));
    }
    if items.len() > MAX_LABELS {
        return Err(JobError::invalid_input(format!(
            "input.labels has {} labels, over the limit of {MAX_LABELS}",
            items.len()
        )));
    }
    let mut labels: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let Some(label) = item.as_str().map(str::trim) else {
            return Err(JobError::invalid_input("every label must be a string"));
        };
        if label.is_empty() {
            return Err(JobError::invalid_input("labels must not be empty"));
        }
        if label.chars().count() > MAX_LABEL_CHARS {
            return Err(JobError::invalid_input(format!(
                "a label is over {MAX_LABEL_CHARS} characters"
            )));
        }
        if !labels.iter().any(|l| l == label) {
            labels.push(label.to_owned());
        }
    }
    Ok(labels)
}

/// The job's `temperature`, else the configured one.
fn temperature_of(input: &Map<String, Value>, configured: f64) -> Result<f64, JobError> {
    match input.get("temperature") {
        None | Some(Value::Null) => Ok(configured),
        Some(value) => value
            .as_f64()
            .filter(|t| TEMPERATURES.contains(t))
            .ok_or_else(|| {
                JobError::invalid_input(format!(
                    "input.temperature must be a number from {} to {}",
                    TEMPERATURES.start(),
                    TEMPERATURES.end()
                ))
            }),
    }
}

fn softmax(values: &[f64]) -> Vec<f64> {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = values.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

impl Classifier {
    /// The text's embedding and the labels', from one call to the encoder's batcher: the
    /// labels not in the cache go with the text, as rows of the same job.
    fn text_and_label_embeddings(
        &self,
        encoder: &Encoder,
        text: &str,
        labels: &[String],
        ticket: &Ticket,
    ) -> Result<(Vec<f32>, Vec<LabelEmbedding>), JobError> {
        let mut known: HashMap<String, Arc<Vec<f32>>> = {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            labels
                .iter()
                .filter_map(|l| Some((l.clone(), cache.get(l)?.clone())))
                .collect()
        };
        let missing: Vec<String> = labels
            .iter()
            .filter(|l| !known.contains_key(*l))
            .cloned()
            .collect();
        let texts: Vec<String> = std::iter::once(text.to_owned())
            .chain(missing.iter().map(|l| label_sentence(l)))
            .collect();
        let mut embedded = encoder.embed(&texts, ticket)?.into_iter();
        let text_embedding = embedded
            .next()
            .ok_or_else(|| JobError::internal("no embedding"))?;
        if !missing.is_empty() {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() + missing.len() > CACHE_LIMIT {
                cache.clear();
            }
            for (label, embedding) in missing.into_iter().zip(embedded) {
                let embedding = Arc::new(embedding);
                cache.insert(label.clone(), embedding.clone());
                // Kept here too: another job may clear the cache before we read it back.
                known.insert(label, embedding);
            }
        }
        let label_embeddings = labels
            .iter()
            .map(|l| {
                known
                    .get(l)
                    .cloned()
                    .ok_or_else(|| JobError::internal("label embedding missing"))
            })
            .collect::<Result<_, _>>()?;
        Ok((text_embedding, label_embeddings))
    }

    /// The logits model's scores for `text`, through its batcher.
    fn logits(
        batcher: &Batcher,
        encoder: &Encoder,
        text: &str,
        ticket: &Ticket,
    ) -> Result<Vec<f64>, JobError> {
        let ids = encoder.ids(&[text.to_owned()])?;
        let row = batcher
            .run(ids, ticket)?
            .pop()
            .ok_or_else(|| JobError::internal("no logits"))?;
        Ok(row.into_iter().map(f64::from).collect())
    }

    fn classify(
        &self,
        text: &str,
        labels: &[String],
        temperature: f64,
        device: Option<usize>,
        ticket: &Ticket,
    ) -> Result<Value, JobError> {
        let encoder = self.encoder.for_device(device)?;
        let (used, total) = encoder
            .token_counts(text)
            .map_err(|_| JobError::invalid_input("the text could not be tokenized"))?;
        let probabilities = match &self.mode {
            ClassifyMode::ZeroShot => {
                let (text_embedding, label_embeddings) =
                    self.text_and_label_embeddings(encoder, text, labels, ticket)?;
                let cosines: Vec<f64> = label_embeddings
                    .iter()
                    .map(|l| {
                        l.iter()
                            .zip(&text_embedding)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>()
                            / temperature
                    })
                    .collect();
                softmax(&cosines)
            }
            ClassifyMode::Logits(batchers) => {
                let logits = Self::logits(batchers.for_device(device)?, encoder, text, ticket)?;
                if logits.len() != labels.len() {
                    return Err(JobError::new(
                        crate::outcome::ErrorType::ModelError,
                        format!(
                            "the model gives {} scores for {} configured labels",
                            logits.len(),
                            labels.len()
                        ),
                    ));
                }
                softmax(&logits)
            }
        };
        crate::model::finite(&probabilities, "scores")?;
        let best = probabilities
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        let scores: Map<String, Value> = labels
            .iter()
            .cloned()
            .zip(probabilities.iter().map(|p| json!(p)))
            .collect();
        Ok(json!({
            "label": labels[best],
            "scores": scores,
            "truncated": total > used,
            "tokens": used,
            "tokens_total": total,
            "model": encoder.name(),
        }))
    }
}

/// What the prepare stage hands to the model work.
struct ClassifyJob {
    labels: Vec<String>,
    temperature: f64,
    text: String,
}

#[async_trait]
impl Handler for ClassifyHandler {
    async fn prepare(&self, ctx: &JobContext) -> Result<Prepared, JobError> {
        let classifier = &self.0;
        let (labels, temperature) = match &classifier.mode {
            ClassifyMode::Logits(_) if ctx.input.contains_key("labels") => {
                return Err(JobError::invalid_input(
                    "this classifier's labels are fixed by its model; leave input.labels out",
                ))
            }
            ClassifyMode::Logits(_) if ctx.input.contains_key("temperature") => {
                return Err(JobError::invalid_input(
                    "this classifier's scores come from its model; input.temperature applies \
                     to zero-shot classification only",
                ))
            }
            ClassifyMode::Logits(_) => (classifier.default_labels.clone(), 1.0),
            ClassifyMode::ZeroShot => (
                labels_of(&ctx.input, &classifier.default_labels)?,
                temperature_of(&ctx.input, classifier.temperature)?,
            ),
        };
        let source = document::source_of(&ctx.input, true, &classifier.fetch).await?;
        let text = document::read(source, &classifier.parsers).await?.text;
        Ok(Prepared::new(ClassifyJob {
            labels,
            temperature,
            text,
        }))
    }

    async fn run(&self, ctx: JobContext, prepared: Prepared) -> Result<Value, JobError> {
        let ClassifyJob {
            labels,
            temperature,
            text,
        } = prepared.take()?;
        let classifier = self.0.clone();
        let (device, ticket) = (ctx.device, ctx.ticket());
        ctx.run_blocking(move || classifier.classify(&text, &labels, temperature, device, &ticket))
            .await?
    }

    fn batchers(&self) -> Vec<Arc<dyn AnyBatcher>> {
        let classifier = &self.0;
        let mut batchers: Vec<Arc<dyn AnyBatcher>> = classifier
            .encoder
            .0
            .iter()
            .map(|e| Arc::new(e.batcher().clone()) as Arc<dyn AnyBatcher>)
            .collect();
        if let ClassifyMode::Logits(logits) = &classifier.mode {
            batchers.extend(
                logits
                    .0
                    .iter()
                    .map(|b| Arc::new(b.clone()) as Arc<dyn AnyBatcher>),
            );
        }
        batchers
    }

    fn warm_up(&self) -> Result<(), String> {
        let classifier = &self.0;
        for (device, encoder) in classifier.encoder.0.iter().enumerate() {
            encoder.warm_up()?;
            if let ClassifyMode::Logits(batchers) = &classifier.mode {
                let batcher = batchers.0.get(device).ok_or("no logits model copy")?;
                Classifier::logits(batcher, encoder, "warm up", &Ticket::unbounded())
                    .map_err(|e| format!("the logits model: {}", e.message))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked_and_deduplicated() {
        let input = |labels: Value| json!({ "labels": labels }).as_object().unwrap().clone();
        assert_eq!(
            labels_of(&input(json!(["a", " b ", "a"])), &[]).unwrap(),
            vec!["a", "b"]
        );
        assert!(labels_of(&input(json!([])), &[])
            .unwrap_err()
            .message
            .contains("empty"));
        assert!(labels_of(&input(json!(["a", 3])), &[])
            .unwrap_err()
            .message
            .contains("string"));
        assert!(labels_of(&input(json!(["", "b"])), &[])
            .unwrap_err()
            .message
            .contains("not be empty"));
        let huge: Vec<String> = (0..300).map(|i| i.to_string()).collect();
        assert!(labels_of(&input(json!(huge)), &[])
            .unwrap_err()
            .message
            .contains("limit of 256"));
        assert!(labels_of(&Map::new(), &[])
            .unwrap_err()
            .message
            .contains("required"));
        assert_eq!(
            labels_of(&Map::new(), &["x".to_owned()]).unwrap(),
            vec!["x"]
        );
    }

    #[test]
    fn a_jobs_temperature_must_be_a_number_in_range() {
        let input = |t: Value| json!({ "temperature": t }).as_object().unwrap().clone();
        assert_eq!(temperature_of(&Map::new(), 0.05).unwrap(), 0.05);
        assert_eq!(temperature_of(&input(json!(0.5)), 0.05).unwrap(), 0.5);
        for bad in [
            json!(0),
            json!(-1),
            json!(1000),
            json!("hot"),
            json!(0.0001),
        ] {
            let error = temperature_of(&input(bad.clone()), 0.05).unwrap_err();
            assert!(
                error.message.contains("from 0.001 to 100"),
                "{bad}: {}",
                error.message
            );
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[2] > p[1] && p[1] > p[0]);
    }
}
