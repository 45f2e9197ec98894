//! Per-kind keys of `[handlers.<name>]`: each is read by some kinds only, and is refused on the
//! others, so a key in the wrong table does not pass silently.

use super::error::{check, ConfigError};
use super::{Size, DEFAULT_PAGES, DEFAULT_PARSE_CPU_S, DEFAULT_PARSE_MEMORY, DEFAULT_TEXT_CHARS};

/// Keys that only some kinds read are refused elsewhere, so a typo'd table does not pass silently.
pub(super) fn validate_kind_keys(
    name: &str,
    kind: &str,
    h: &super::HandlerConfig,
) -> Result<(), ConfigError> {
    let misplaced = |key: &str, kinds: &str| ConfigError::OutOfRange {
        key: format!("handlers.{name}.{key}"),
        value: "(set)".into(),
        limit: format!("only {kinds} handlers read it; this one is kind {kind:?}"),
    };
    let is = |kinds: &[&str]| kinds.contains(&kind);
    if h.labels.is_some() && !is(&["classify"]) {
        return Err(misplaced("labels", "classify"));
    }
    if h.temperature.is_some() && !is(&["classify"]) {
        return Err(misplaced("temperature", "classify"));
    }
    if (h.chunk_tokens.is_some() || h.overlap.is_some()) && !is(&["extract"]) {
        return Err(misplaced("chunk_tokens/overlap", "extract"));
    }
    let document_keys = h.allow_private_urls.is_some()
        || h.max_document_size.is_some()
        || h.url_timeout_s.is_some()
        || h.max_parse_memory.is_some()
        || h.max_parse_cpu_s.is_some()
        || h.max_text_chars.is_some()
        || h.max_pages.is_some();
    if document_keys && !is(&["extract", "classify"]) {
        return Err(misplaced(
            "allow_private_urls/max_document_size/url_timeout_s/max_parse_memory/\
             max_parse_cpu_s/max_text_chars/max_pages",
            "extract and classify",
        ));
    }
    if h.inputs.is_some() && !is(&["torchscript"]) {
        return Err(misplaced("inputs", "torchscript"));
    }
    if h.batch.is_some() && !is(&["torchscript"]) {
        return Err(misplaced("batch", "torchscript"));
    }
    if h.warm_up.is_some() && !is(&["torchscript"]) {
        return Err(misplaced("warm_up", "torchscript"));
    }
    if let (Some(warm_up), Some(inputs)) = (&h.warm_up, &h.inputs) {
        let missing: Vec<&String> = inputs
            .iter()
            .filter(|i| !warm_up.contains_key(*i))
            .collect();
        let unknown: Vec<&String> = warm_up.keys().filter(|k| !inputs.contains(k)).collect();
        if !missing.is_empty() || !unknown.is_empty() {
            return Err(ConfigError::OutOfRange {
                key: format!("handlers.{name}.warm_up"),
                value: format!("{:?}", warm_up.keys().collect::<Vec<_>>()),
                limit: format!("one entry per input, {inputs:?}"),
            });
        }
        if let Some((input, bad)) = warm_up.iter().find(|(_, w)| w.shape.iter().any(|d| *d < 0)) {
            return Err(ConfigError::OutOfRange {
                key: format!("handlers.{name}.warm_up.{input}.shape"),
                value: format!("{:?}", bad.shape),
                limit: "dimensions of 0 or more".into(),
            });
        }
    }
    if h.model.is_some() && !is(&["classify", "torchscript"]) {
        return Err(misplaced("model", "classify and torchscript"));
    }
    if kind == "torchscript" && (h.model.is_none() || h.inputs.as_ref().is_none_or(Vec::is_empty)) {
        return Err(ConfigError::OutOfRange {
            key: format!("handlers.{name}"),
            value: "(kind torchscript)".into(),
            limit: "a torchscript handler needs `model` (a file in model_dir) and `inputs` (its input names)".into(),
        });
    }
    if kind == "classify" && h.model.is_some() && h.labels.as_ref().is_none_or(Vec::is_empty) {
        return Err(ConfigError::OutOfRange {
            key: format!("handlers.{name}.labels"),
            value: "(missing)".into(),
            limit: "a classify handler with a logits `model` needs `labels`, one per output".into(),
        });
    }
    if let Some(t) = h.temperature {
        if !(0.001..=100.0).contains(&t) {
            return Err(ConfigError::OutOfRange {
                key: format!("handlers.{name}.temperature"),
                value: t.to_string(),
                limit: "must be between 0.001 and 100".into(),
            });
        }
    }
    let chunk = h.chunk_tokens.unwrap_or(200);
    check(
        &format!("handlers.{name}.chunk_tokens"),
        chunk as u64,
        16,
        254,
    )?;
    check(
        &format!("handlers.{name}.overlap"),
        h.overlap.unwrap_or(32) as u64,
        0,
        chunk as u64 / 2,
    )?;
    check(
        &format!("handlers.{name}.url_timeout_s"),
        h.url_timeout_s.unwrap_or(20),
        1,
        600,
    )?;
    check(
        &format!("handlers.{name}.max_parse_memory"),
        h.max_parse_memory.unwrap_or(DEFAULT_PARSE_MEMORY).bytes(),
        64_000_000,
        Size::gb(64).bytes(),
    )?;
    check(
        &format!("handlers.{name}.max_parse_cpu_s"),
        h.max_parse_cpu_s.unwrap_or(DEFAULT_PARSE_CPU_S),
        1,
        3600,
    )?;
    check(
        &format!("handlers.{name}.max_text_chars"),
        h.max_text_chars.unwrap_or(DEFAULT_TEXT_CHARS) as u64,
        1_000,
        100_000_000,
    )?;
    check(
        &format!("handlers.{name}.max_pages"),
        h.max_pages.unwrap_or(DEFAULT_PAGES) as u64,
        1,
        100_000,
    )?;
    Ok(())
}
