//! `runpod.toml`: the typed configuration tree, its built-in defaults, loading and validation.
//!
//! The seed's `[handler]` keys keep their names and meaning; `[gpu]`, `[server]`, `[queue]` and one
//! `[handlers.<name>]` table per handler are ours. Unknown keys are refused with their name, and
//! every number is checked against a stated limit in [`validate`].

mod env;
mod error;
mod kind_keys;
pub mod model_source;
mod reference;
mod size;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runpod_protocol::limits;
use serde::{Deserialize, Serialize};

pub use env::{EnvOverride, ENV_OVERRIDES, HOST_ENV, MODEL_NAME_ENV, PORT_ENV};
pub use error::ConfigError;
pub use model_source::{ModelLocation, ModelRef};
pub use size::{Size, SizeError, MAX_SIZE, WHOLE_BUDGET};
pub use validate::validate_budget;

/// Environment variable that names the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "RUNPOD_WORKER_CONFIG";
/// The file looked for in the working directory when neither `--config` nor the variable is set.
pub const DEFAULT_CONFIG_FILE: &str = "runpod.toml";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The seed's worker-wide keys.
    pub handler: HandlerDefaults,
    /// GPU selection, headroom and the simulated GPU.
    pub gpu: GpuConfig,
    /// The worker's own HTTP server (`/health`, `/ready`, `/metrics`).
    pub server: ServerConfig,
    /// How the worker talks to the job queue.
    pub queue: QueueConfig,
    /// How forward passes of the MiniLM models are batched across jobs.
    pub batching: BatchingConfig,
    /// One entry per handler, keyed by the `input.task` that selects it.
    pub handlers: BTreeMap<String, HandlerConfig>,
    /// Where `[handler] model` was found (set by [`Config::load`]; not a key of the file).
    #[serde(skip)]
    pub model_location: ModelLocation,
}

/// `[handler]`: the seed's keys, worker-wide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerDefaults {
    /// Jobs in the worker at once (running or waiting for their handler), across all handlers.
    pub max_concurrency: u32,
    /// Cold start budget in seconds: loading every handler must finish within it.
    pub timeout: u64,
    /// Per-job limit in seconds, counted from the moment the job starts running.
    pub execution_timeout: u64,
    /// GPU memory reserved per job for handlers on a GPU that do not declare their own
    /// (`"all"`: a device's whole budget for jobs).
    #[serde(with = "reservation")]
    pub gpu_memory_per_request: Size,
    /// How long a taken job may wait for its handler before it gets the retry signal.
    pub local_queue_max_wait_s: u64,
    /// Where models are found (the network volume in deployment); with `model`, the last
    /// place looked.
    pub model_dir: PathBuf,
    /// A Hugging Face repository (`org/name` or `org/name:revision`) whose files are the
    /// models, looked for in the platform's model caches before `model_dir`
    /// ([`model_source`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// SIGTERM: how long in-flight jobs may run on before they are answered `Interrupted`.
    pub drain_grace_s: u64,
    /// libtorch intra-op threads (0: libtorch's default, one per core).
    pub intra_op_threads: usize,
    /// After this many GPU out-of-memory failures in a row, the worker reports itself unhealthy,
    /// drains and asks to be replaced (`stopPod`) instead of failing every job.
    pub max_consecutive_ooms: u32,
    /// Ask the platform for a fresh worker after every job (the SDK's `refresh_worker`): the
    /// result carries `stopPod: true`, the worker drains and exits 0.
    pub refresh_worker: bool,
    /// Replace the worker the same way once its host memory (RSS) or its resident GPU memory
    /// has grown past this factor of its level after warm-up (a leak); 0 turns it off.
    pub recycle_memory_factor: f64,
    /// How often a long job (a large extraction) sends a progress update (`IN_PROGRESS`);
    /// 0: never.
    pub progress_interval_ms: u64,
    /// The handler OpenAI-compatible requests go to (jobs with `openai_route`): an `extract`
    /// handler; by default the first one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openai_handler: Option<String>,
    /// The document parser executable (`runpod-parse`) that extract and classify parse
    /// documents in; by default the one beside `runpod-worker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parser: Option<PathBuf>,
}

impl Default for HandlerDefaults {
    fn default() -> Self {
        Self {
            max_concurrency: 32,
            timeout: 300,
            execution_timeout: 120,
            gpu_memory_per_request: Size::gb(6),
            local_queue_max_wait_s: 30,
            model_dir: PathBuf::from("handler/models"),
            model: None,
            drain_grace_s: 60,
            intra_op_threads: 0,
            max_consecutive_ooms: 3,
            refresh_worker: false,
            recycle_memory_factor: 3.0,
            progress_interval_ms: 2000,
            openai_handler: None,
            parser: None,
        }
    }
}

/// `[batching]`: one batcher per loaded model and device runs every forward pass of the
/// MiniLM encoder (classify, extract, the OpenAI embeddings route) and of a classify logits
/// model, with the rows of every job waiting for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Rows (texts, chunks, labels) in one forward pass; 1 turns batching across rows off.
    pub max_batch_rows: usize,
    /// Padded tokens (rows x the longest row) in one forward pass. Unset: 16384 on a GPU (where
    /// a pass costs about the same up to there), 2048 on the CPU (where cost follows padded
    /// tokens and larger passes measured no faster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<usize>,
    /// How long a pass that is not full waits for more rows, microseconds (0: it runs as soon
    /// as the model is free; rows that arrive meanwhile form the next one).
    pub max_batch_delay_us: u64,
}

/// Whether a handler kind runs its model work on batchers (classify, extract: every MiniLM
/// forward pass), so its jobs hold no GPU memory while they wait (see
/// `handlers::Handler::batchers`, which the running worker asks instead).
pub fn is_batched_kind(kind: &str) -> bool {
    matches!(kind, "classify" | "extract")
}

impl HandlerConfig {
    /// Whether this handler's model work runs on batchers: classify and extract always, a
    /// torchscript handler with `batch = true`.
    pub fn is_batched(&self, name: &str) -> bool {
        is_batched_kind(self.kind(name)) || self.batch == Some(true)
    }
}

/// `max_batch_tokens` on a GPU when unset.
pub const GPU_BATCH_TOKENS: usize = 16_384;
/// `max_batch_tokens` on the CPU when unset.
pub const CPU_BATCH_TOKENS: usize = 2_048;

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_rows: 64,
            max_batch_tokens: None,
            max_batch_delay_us: 0,
        }
    }
}

impl BatchingConfig {
    /// The padded-token limit for a model computing on a GPU or on the CPU.
    pub fn tokens_for(&self, on_cuda: bool) -> usize {
        self.max_batch_tokens.unwrap_or(if on_cuda {
            GPU_BATCH_TOKENS
        } else {
            CPU_BATCH_TOKENS
        })
    }
}

/// `[gpu]`: which GPU is used and how much of it may be promised to jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Memory kept free on every device for the CUDA context and fragmentation.
    pub headroom: Size,
    /// Pretend to have a GPU of this size (CUDA handlers then run on the CPU but are accounted
    /// as GPU jobs). Empty means: use the real GPU, if any.
    #[serde(with = "optional_size")]
    pub simulate: Option<Size>,
    /// With `simulate`: how many simulated devices.
    pub simulate_devices: usize,
    /// With `simulate`: a file holding the memory used by others, as a size string per device
    /// (comma-separated), re-read live.
    pub external_load_file: Option<PathBuf>,
    /// Admit against learned footprints and adapt handler limits to OOMs.
    pub adaptive: bool,
    /// How often GPU memory is measured (off the job path).
    pub sample_interval_ms: u64,
    /// A file-locked ledger shared by every worker process on this machine lives here (e.g.
    /// `/dev/shm`), so two processes never admit the same free memory. Empty: per process.
    pub host_ledger_dir: Option<PathBuf>,
    /// Bounds of the computed `retry_after`, seconds.
    pub retry_after_min_s: u64,
    /// Upper bound of the computed `retry_after`, seconds.
    pub retry_after_max_s: u64,
    /// Learned footprint = this percentile of recent peaks ...
    pub footprint_percentile: f64,
    /// ... plus this fraction.
    pub footprint_margin: f64,
    /// Peaks needed before the learned footprint is used.
    pub footprint_min_samples: usize,
    /// Successes in a row before an adapted limit grows by one.
    pub grow_after_successes: u32,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            headroom: Size::from_bytes(1 << 30),
            simulate: None,
            simulate_devices: 1,
            external_load_file: None,
            adaptive: false,
            sample_interval_ms: 200,
            host_ledger_dir: None,
            retry_after_min_s: 1,
            retry_after_max_s: 60,
            footprint_percentile: 95.0,
            footprint_margin: 0.1,
            footprint_min_samples: 5,
            grow_after_successes: 5,
        }
    }
}

/// `[server]`: where `/health`, `/ready` and `/metrics` are served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Bind address; `0.0.0.0` on the platform, loopback by default.
    pub host: String,
    /// Port; 0 picks a free one (printed as `listening on http://HOST:PORT`).
    pub port: u16,
    /// Load-balancing mode: requests that may wait for a slot beyond those running
    /// (`[handler] max_concurrency`); past them a request is refused at once (429).
    pub max_waiting: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 8080,
            max_waiting: 64,
        }
    }
}

/// `[queue]`: pacing of the job-take loop and the result delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Pause after an empty take that came back in under a second (a queue that does not long-poll).
    pub empty_poll_floor_ms: u64,
    /// First wait after a failed request; doubled per failure, with jitter.
    pub backoff_initial_ms: u64,
    /// Ceiling of that wait.
    pub backoff_max_ms: u64,
    /// Wait after a 429.
    pub rate_limited_wait_s: u64,
    /// Client-side limit on one long-poll (the SDK uses 90 s).
    pub long_poll_timeout_s: u64,
    /// At shutdown, how long a take whose answer has not begun is still waited for: the queue
    /// may have handed its jobs out already, and they are answered only if it is read.
    pub take_answer_grace_ms: u64,
    /// Total time spent retrying one job-done or job-stream POST.
    pub delivery_retry_s: u64,
    /// Largest job accepted from the queue; larger ones get an `InvalidInput` result.
    pub max_job_size: Size,
    /// Largest result posted; larger ones become an `OutputTooLarge` error result (the
    /// platform would refuse them with 413 and the result would be lost).
    pub max_result_size: Size,
    /// Results being posted (or retried) at once. A result in delivery holds no job slot, so
    /// the next job starts meanwhile; while this many are in delivery, no take is asked.
    pub max_results_in_delivery: usize,
    /// Bytes of results being posted (or retried) at once; as `max_results_in_delivery`. A
    /// single larger result is posted alone.
    pub max_result_bytes_in_delivery: Size,
    /// Where results that could not be delivered are kept, to be re-sent at the next start
    /// (the network volume in deployment).
    pub spool_dir: PathBuf,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            empty_poll_floor_ms: 200,
            backoff_initial_ms: 250,
            backoff_max_ms: 30_000,
            rate_limited_wait_s: 5,
            long_poll_timeout_s: 90,
            take_answer_grace_ms: 500,
            delivery_retry_s: 30,
            max_job_size: Size::from_bytes(limits::MAX_RUNSYNC_BODY as u64),
            max_result_size: Size::from_bytes(limits::MAX_RESULT_BODY as u64),
            max_results_in_delivery: 64,
            max_result_bytes_in_delivery: Size::from_bytes(256_000_000),
            spool_dir: PathBuf::from("spool"),
        }
    }
}

/// Where a handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// Always the CPU; reserves no GPU memory.
    Cpu,
    /// The GPU when there is one (real or simulated), otherwise the CPU with a warning.
    Cuda,
}

/// `[handlers.<name>]`: one handler, selected by `input.task == <name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// What implements it: `echo`, `extract`, `classify` or `torchscript`. Defaults to the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Jobs of this handler running at once.
    pub max_concurrency: u32,
    /// Where it runs.
    pub device: DeviceChoice,
    /// GPU memory one job needs; defaults to `[handler].gpu_memory_per_request` on a GPU.
    /// `"all"` is a device's whole budget for jobs (one job at a time per GPU).
    #[serde(
        default,
        with = "optional_reservation",
        skip_serializing_if = "Option::is_none"
    )]
    pub gpu_memory: Option<Size>,
    /// The GPU memory its models hold for good (weights), booked as resident memory on a
    /// simulated GPU and used by `check-config` to plan for a GPU it is not running on. On a
    /// real GPU the resident memory is measured instead.
    #[serde(
        default,
        with = "optional_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub model_memory: Option<Size>,
    /// classify (logits mode) and torchscript: the TorchScript file, in `[handler].model_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// classify: the labels used when a job gives none (and the logits model's labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// classify: softmax temperature over cosine similarities (default 0.05).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// extract: tokens per chunk (default 200, at most 254).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_tokens: Option<usize>,
    /// extract: tokens shared by consecutive chunks (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<usize>,
    /// extract, classify: fetch URLs that resolve to private, loopback or link-local addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_private_urls: Option<bool>,
    /// extract, classify: largest document accepted (bytes after decoding; default 20MB).
    #[serde(
        default,
        with = "optional_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_document_size: Option<Size>,
    /// extract, classify: time limit for fetching a URL (default 20 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_timeout_s: Option<u64>,
    /// extract, classify: memory a document's parser process may use (default 1GB).
    #[serde(
        default,
        with = "optional_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_parse_memory: Option<Size>,
    /// extract, classify: CPU seconds one document's parsing may take (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parse_cpu_s: Option<u64>,
    /// extract, classify: most characters of text a document may yield (default 5,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_text_chars: Option<usize>,
    /// extract, classify: most pages a PDF may have (default 2,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pages: Option<usize>,
    /// torchscript: the names of the model's inputs, in the order `forward` takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<String>>,
    /// torchscript: the first dimension of every input and output is a batch, so jobs whose
    /// inputs agree in the other dimensions and dtypes share forward passes (`[batching]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<bool>,
    /// torchscript: the shape (and dtype, default float32) of each input for the warm-up
    /// forward passes run at start, as Triton's `model_warmup` (TorchScript profiles a graph's
    /// first calls and optimises it after; without this the first jobs pay for that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_up: Option<BTreeMap<String, WarmUpInput>>,
}

/// One input of a torchscript handler's warm-up: a tensor of zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmUpInput {
    /// Its shape, e.g. `[1, 4]`.
    pub shape: Vec<i64>,
    /// float32 (the default), float64, int64, int32 or bool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            kind: None,
            max_concurrency: 1,
            device: DeviceChoice::Cpu,
            gpu_memory: None,
            model_memory: None,
            model: None,
            labels: None,
            temperature: None,
            chunk_tokens: None,
            overlap: None,
            allow_private_urls: None,
            max_document_size: None,
            url_timeout_s: None,
            max_parse_memory: None,
            max_parse_cpu_s: None,
            max_text_chars: None,
            max_pages: None,
            inputs: None,
            batch: None,
            warm_up: None,
        }
    }
}

/// `max_parse_memory`'s default.
pub const DEFAULT_PARSE_MEMORY: Size = Size::gb(1);
/// `max_parse_cpu_s`'s default.
pub const DEFAULT_PARSE_CPU_S: u64 = 30;
/// `max_text_chars`'s default.
pub const DEFAULT_TEXT_CHARS: usize = 5_000_000;
/// `max_pages`'s default.
pub const DEFAULT_PAGES: usize = 2_000;
/// `max_document_size`'s default, in bytes.
pub const DEFAULT_DOCUMENT_SIZE: u64 = 20_000_000;

impl HandlerConfig {
    /// The implementation kind (`kind`, or the table's name).
    pub fn kind<'a>(&'a self, name: &'a str) -> &'a str {
        self.kind.as_deref().unwrap_or(name)
    }

    /// The memory one job reserves when the handler runs on `on_gpu`.
    pub fn reservation(&self, defaults: &HandlerDefaults, on_gpu: bool) -> Size {
        if on_gpu && self.device == DeviceChoice::Cuda {
            self.gpu_memory.unwrap_or(defaults.gpu_memory_per_request)
        } else {
            Size::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let handler = |max_concurrency, device| HandlerConfig {
            max_concurrency,
            device,
            ..HandlerConfig::default()
        };
        Self {
            handler: HandlerDefaults::default(),
            gpu: GpuConfig::default(),
            server: ServerConfig::default(),
            queue: QueueConfig::default(),
            batching: BatchingConfig::default(),
            handlers: BTreeMap::from([
                // Batched: a waiting job holds no GPU memory, and the more wait, the fuller
                // each forward pass (at 4, a pass holds at most 4 jobs' rows).
                ("classify".to_owned(), handler(32, DeviceChoice::Cuda)),
                ("echo".to_owned(), handler(4, DeviceChoice::Cpu)),
                // OpenAI embedding requests come here too and batch like classify's; documents
                // wait for a parser, one per core at once.
                ("extract".to_owned(), handler(32, DeviceChoice::Cpu)),
            ]),
            model_location: ModelLocation::Configured,
        }
    }
}

/// Where the configuration came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// Read from this file.
    File(PathBuf),
    /// No file: the built-in defaults.
    Defaults,
}

/// The largest config file read: a real one is a few kB; `--config /dev/zero` or a wrong path
/// to a large file must not be read without end.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1_000_000;

/// Reads a config file of at most [`MAX_CONFIG_FILE_BYTES`] as UTF-8.
fn read_config_file(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(format!(
            "larger than {MAX_CONFIG_FILE_BYTES} bytes: not a config file"
        ));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())
}

impl Config {
    /// The resident memory the configuration declares for each GPU: the sum of `model_memory`
    /// over the handlers on `device = "cuda"` (models are loaded on every GPU). Handlers that
    /// share a model (extract and classify share MiniLM) should declare it on one of them.
    pub fn declared_model_memory(&self) -> u64 {
        self.handlers
            .values()
            .filter(|h| h.device == DeviceChoice::Cuda)
            .filter_map(|h| h.model_memory)
            .map(|s| s.bytes())
            .sum()
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Loads `path`, else `$RUNPOD_WORKER_CONFIG`, else `./runpod.toml`, else the defaults.
    /// A file that was named explicitly must exist.
    pub fn load(path: Option<&Path>) -> Result<(Self, ConfigSource), ConfigError> {
        let env_path = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let explicit = path.map(Path::to_path_buf).or(env_path);
        let path = match explicit {
            Some(p) => p,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => PathBuf::from(DEFAULT_CONFIG_FILE),
            None => {
                let config = Self::default()
                    .with_env_overrides(|name| std::env::var(name).ok())?
                    .locate_models(|name| std::env::var(name).ok());
                return Ok((config, ConfigSource::Defaults));
            }
        };
        let text = read_config_file(&path).map_err(|reason| ConfigError::Read {
            path: path.clone(),
            reason,
        })?;
        let config = Self::from_toml(&text).map_err(|e| e.in_file(&path))?;
        let config = config.relative_to(&text, path.parent().unwrap_or(Path::new("")));
        let config = config
            .with_env_overrides(|name| std::env::var(name).ok())?
            .locate_models(|name| std::env::var(name).ok());
        Ok((config, ConfigSource::File(path)))
    }

    /// Relative paths the file `text` names resolved against `dir`, the file's directory: a
    /// config means the same files whatever directory the worker starts in. Paths left to
    /// their defaults stay relative to the working directory.
    fn relative_to(mut self, text: &str, dir: &Path) -> Self {
        let Ok(table) = text.parse::<toml::Table>() else {
            return self;
        };
        let written = |section: &str, key: &str| {
            table
                .get(section)
                .and_then(|s| s.get(key))
                .and_then(toml::Value::as_str)
                .map(Path::new)
                .filter(|p| p.is_relative())
                .map(|p| dir.join(p))
        };
        if let Some(path) = written("handler", "model_dir") {
            self.handler.model_dir = path;
        }
        if let Some(path) = written("handler", "parser") {
            self.handler.parser = Some(path);
        }
        if let Some(path) = written("queue", "spool_dir") {
            self.queue.spool_dir = path;
        }
        if let Some(path) = written("gpu", "external_load_file") {
            self.gpu.external_load_file = Some(path);
        }
        if let Some(path) = written("gpu", "host_ledger_dir") {
            self.gpu.host_ledger_dir = Some(path);
        }
        self
    }

    /// `[handler] model`, where set, looked for in the model caches and `model_dir`
    /// ([`model_source`]; the caches' roots from `var`): `model_dir` becomes where it was found,
    /// and [`Config::model_location`] says how (or, found nowhere, every place tried: the
    /// models then fail to load, naming them).
    pub fn locate_models(mut self, var: impl Fn(&str) -> Option<String>) -> Self {
        let Some(model) = self.handler.model.as_deref() else {
            self.model_location = ModelLocation::Configured;
            return self;
        };
        // `validate` checked the form.
        let Ok(model) = ModelRef::parse(model) else {
            return self;
        };
        let (found, location) = model_source::locate(&model, &self.handler.model_dir, var);
        if let Some(dir) = found {
            self.handler.model_dir = dir;
        }
        self.model_location = location;
        self
    }

    /// Checks every value against its limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::validate(self)
    }

    /// `[handler].execution_timeout` as a duration.
    pub fn execution_timeout(&self) -> Duration {
        Duration::from_secs(self.handler.execution_timeout)
    }

    /// `[handler].local_queue_max_wait_s` as a duration.
    pub fn local_queue_max_wait(&self) -> Duration {
        Duration::from_secs(self.handler.local_queue_max_wait_s)
    }
}

/// Serde glue for a reservation: a size, or `"all"` ([`WHOLE_BUDGET`]).
mod reservation {
    use super::{Size, WHOLE_BUDGET};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Size, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub(super) fn parse(text: &str) -> Result<Size, super::SizeError> {
        if text.trim().eq_ignore_ascii_case("all") {
            return Ok(WHOLE_BUDGET);
        }
        text.parse()
    }
}

/// Serde glue for an optional reservation (empty: not set).
mod optional_reservation {
    use super::Size;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Size>, s: S) -> Result<S::Ok, S::Error> {
        super::optional_size::serialize(v, s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Size>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        super::reservation::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// Serde glue for `Option<Size>` where an empty string also means "not set".
mod optional_size {
    use super::Size;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Size>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(size) => s.collect_str(size),
            None => s.serialize_str(""),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Size>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(serde::de::Error::custom)
    }
}
