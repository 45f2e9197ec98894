//! Building handlers from their config tables, loading each model once: the MiniLM encoder is
//! shared by every extract and classify handler on the same device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tch::Device;

use super::classify::{Classifier, ClassifyHandler, ClassifyMode};
use super::extract::ExtractHandler;
use super::fetch::FetchPolicy;
use super::parser::{self, ParseLimits, ParserPool};
use super::torchscript::{check_input_names, zeros, TorchScriptHandler};
use super::torchscript_batch::BatchedModule;
use super::{EchoHandler, Handler};
use crate::config::{
    BatchingConfig, HandlerConfig, Size, DEFAULT_DOCUMENT_SIZE, DEFAULT_PAGES, DEFAULT_PARSE_CPU_S,
    DEFAULT_PARSE_MEMORY, DEFAULT_TEXT_CHARS,
};
use crate::model::{
    load_module, BatchLimits, Batcher, Encoder, LoadError, OnDevices, PaddedModule,
};
use docparse::wire::Limits;

/// Loads models on demand, once per (file, device).
pub(super) struct ModelLoader {
    dir: PathBuf,
    encoders: HashMap<String, Arc<Encoder>>,
    /// `[handler] parser`, if set.
    parser: Option<PathBuf>,
    /// The parser, once found and its handshake answered.
    checked_parser: Option<PathBuf>,
    /// `[batching]`.
    batching: BatchingConfig,
    /// Whether the handler being built is accounted as a GPU handler. On a simulated GPU its
    /// models compute on the CPU, beside the CPU handlers' copies, but get copies (and
    /// batchers) of their own: their passes book simulated GPU memory, a CPU handler's never.
    on_gpu: bool,
}

fn device_key(device: Device, on_gpu: bool) -> String {
    format!("{device:?}{}", if on_gpu { " (GPU handlers)" } else { "" })
}

impl ModelLoader {
    pub(super) fn new(dir: &Path, parser: Option<&Path>, batching: &BatchingConfig) -> Self {
        Self {
            dir: dir.to_path_buf(),
            encoders: HashMap::new(),
            parser: parser.map(Path::to_path_buf),
            checked_parser: None,
            batching: batching.clone(),
            on_gpu: false,
        }
    }

    /// The batch limits of a model computing on `device`.
    fn batch_limits(&self, device: Device) -> BatchLimits {
        BatchLimits {
            max_rows: self.batching.max_batch_rows,
            max_tokens: self.batching.tokens_for(matches!(device, Device::Cuda(_))),
            max_delay: Duration::from_micros(self.batching.max_batch_delay_us),
        }
    }

    /// The document parser executable (a start-up error when it is missing).
    /// The document parser, found and checked to answer as the parser does (once per load).
    fn parser(&mut self) -> Result<PathBuf, LoadError> {
        if let Some(checked) = &self.checked_parser {
            return Ok(checked.clone());
        }
        let exe = parser::locate(self.parser.as_deref()).map_err(LoadError::NoParser)?;
        parser::handshake(&exe).map_err(|why| {
            LoadError::NoParser(format!(
                "the document parser {} is not working: {why}",
                exe.display()
            ))
        })?;
        self.checked_parser = Some(exe.clone());
        Ok(exe)
    }

    fn encoder(&mut self, device: Device) -> Result<Arc<Encoder>, LoadError> {
        let key = device_key(device, self.on_gpu);
        if let Some(encoder) = self.encoders.get(&key) {
            return Ok(encoder.clone());
        }
        let encoder = Arc::new(Encoder::load(&self.dir, device, self.batch_limits(device))?);
        tracing::info!(
            "loaded {} ({} dims) from {} on {device:?}",
            encoder.name(),
            encoder.dims(),
            self.dir.display()
        );
        self.encoders.insert(key, encoder.clone());
        Ok(encoder)
    }

    /// The encoder on every device of `devices`.
    fn encoders(&mut self, devices: &[Device]) -> Result<OnDevices<Arc<Encoder>>, LoadError> {
        devices
            .iter()
            .map(|d| self.encoder(*d))
            .collect::<Result<_, _>>()
            .map(OnDevices)
    }

    /// The handler of `kind` for `table`, its model on each of `devices`.
    pub(super) fn handler(
        &mut self,
        kind: &str,
        table: &HandlerConfig,
        devices: &[Device],
        on_gpu: bool,
    ) -> Result<Arc<dyn Handler>, LoadError> {
        self.on_gpu = on_gpu;
        let max_document = table
            .max_document_size
            .map_or(DEFAULT_DOCUMENT_SIZE, Size::bytes);
        let max_document = usize::try_from(max_document).unwrap_or(usize::MAX);
        let fetch = FetchPolicy {
            allow_private: table.allow_private_urls.unwrap_or(false),
            max_bytes: max_document,
            timeout: Duration::from_secs(table.url_timeout_s.unwrap_or(20)),
        };
        let limits = ParseLimits {
            max_memory: table.max_parse_memory.unwrap_or(DEFAULT_PARSE_MEMORY),
            max_cpu: Duration::from_secs(table.max_parse_cpu_s.unwrap_or(DEFAULT_PARSE_CPU_S)),
            document: Limits {
                max_text_chars: table.max_text_chars.unwrap_or(DEFAULT_TEXT_CHARS),
                max_pages: table.max_pages.unwrap_or(DEFAULT_PAGES),
                max_decoded_bytes: max_document,
            },
        };
        let keep = table.max_concurrency as usize;
        Ok(match kind {
            "echo" => Arc::new(EchoHandler),
            "extract" => Arc::new(ExtractHandler {
                encoder: self.encoders(devices)?,
                chunk_tokens: table.chunk_tokens.unwrap_or(200),
                overlap: table.overlap.unwrap_or(32),
                fetch,
                parsers: ParserPool::new(self.parser()?, limits, keep),
            }),
            "classify" => {
                let mode = match &table.model {
                    Some(file) => {
                        let path = self.dir.join(file);
                        let mut batchers = Vec::new();
                        for &device in devices {
                            let pad = self.encoder(device)?.pad();
                            let module =
                                PaddedModule::new(load_module(&path, device)?, device, pad);
                            let limits = self.batch_limits(device);
                            batchers.push(Batcher::start(Arc::new(module), file, device, limits));
                        }
                        ClassifyMode::Logits(OnDevices(batchers))
                    }
                    None => ClassifyMode::ZeroShot,
                };
                Arc::new(ClassifyHandler(Arc::new(Classifier {
                    encoder: self.encoders(devices)?,
                    mode,
                    default_labels: table.labels.clone().unwrap_or_default(),
                    temperature: table.temperature.unwrap_or(0.05),
                    fetch,
                    parsers: ParserPool::new(self.parser()?, limits, keep),
                    cache: Mutex::new(HashMap::new()),
                })))
            }
            "torchscript" => {
                let path = self.dir.join(table.model.as_deref().unwrap_or_default());
                let modules: Vec<_> = devices
                    .iter()
                    .map(|d| load_module(&path, *d).map(|m| (m, *d)))
                    .collect::<Result<_, _>>()?;
                let inputs = table.inputs.clone().unwrap_or_default();
                // One copy is enough: every device holds the same model.
                if let Some((module, _)) = modules.first() {
                    check_input_names(module, &inputs).map_err(|reason| LoadError::Unreadable {
                        path: path.clone(),
                        reason,
                    })?;
                }
                let batchers = (table.batch == Some(true)).then(|| {
                    let name = table.model.as_deref().unwrap_or("torchscript");
                    OnDevices(
                        modules
                            .iter()
                            .map(|(module, device)| {
                                let model = BatchedModule {
                                    module: module.clone(),
                                    device: *device,
                                };
                                let limits = self.batch_limits(*device);
                                Batcher::start(Arc::new(model), name, *device, limits)
                            })
                            .collect(),
                    )
                });
                let warm_up = table
                    .warm_up
                    .as_ref()
                    .map(|given| {
                        inputs
                            .iter()
                            .map(|name| {
                                let input = given
                                    .get(name)
                                    .ok_or_else(|| format!("warm_up has no entry for {name:?}"))?;
                                let dtype = input.dtype.as_deref().unwrap_or("float32");
                                zeros(name, &input.shape, dtype)
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()
                    .map_err(|reason| LoadError::Unreadable {
                        path: path.clone(),
                        reason,
                    })?;
                Arc::new(TorchScriptHandler {
                    modules: OnDevices(modules),
                    inputs,
                    batchers,
                    warm_up,
                })
            }
            other => unreachable!("config validation admits only known kinds, not {other:?}"),
        })
    }
}
