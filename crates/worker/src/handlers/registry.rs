//! The handlers of this worker, built from `[handlers.<name>]`, and routing by `input.task`.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::models::ModelLoader;
use super::Handler;
use crate::config::{Config, DeviceChoice, Size};
use crate::model::{AnyBatcher, LoadError};
use crate::outcome::JobError;
use runpod_protocol::job::kind_of;

/// A handler's identity in its [`HandlerSet`] (and in the `Limits` built from it): made only
/// by the set, so a job routed to a handler always finds it, with no lookup that could fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerId(usize);

impl HandlerId {
    /// The `index`-th handler, in name order (the set's and the limits' order): for tests of
    /// the limits alone.
    #[cfg(test)]
    pub(crate) fn at(index: usize) -> Self {
        Self(index)
    }

    /// Its position, in name order.
    pub fn index(self) -> usize {
        self.0
    }
}

/// One configured handler.
#[derive(Clone)]
pub struct HandlerEntry {
    /// Its identity in the set.
    pub id: HandlerId,
    /// The table name, which is the `input.task` that selects it.
    pub name: String,
    /// The implementation kind.
    pub kind: String,
    /// The implementation, or why there is none in this build.
    pub handler: Result<Arc<dyn Handler>, String>,
    /// Jobs running at once.
    pub limit: usize,
    /// Accounted as a GPU job (a real or a simulated GPU).
    pub on_gpu: bool,
    /// Asked for the GPU but there is none: runs on the CPU (the worker reports `degraded`).
    pub gpu_fallback: bool,
    /// GPU memory one job reserves (zero on the CPU).
    pub reservation: Size,
    /// Whether its model work all runs on batchers ([`super::Handler::batchers`]), whose
    /// batches book GPU memory themselves: its jobs reserve none at admission.
    pub batched: bool,
}

impl HandlerEntry {
    /// The seed's start line: `Extraction started (concurrent: 3/4)`, or
    /// `Classification started (GPU locked)` for a GPU handler that runs one job at a time.
    pub fn started_line(&self, active: usize) -> String {
        let title = match self.kind.as_str() {
            "extract" => "Extraction".to_owned(),
            "classify" => "Classification".to_owned(),
            _ => {
                let mut chars = self.name.chars();
                chars
                    .next()
                    .map(|c| c.to_uppercase().chain(chars).collect())
                    .unwrap_or_default()
            }
        };
        if self.on_gpu && self.limit == 1 {
            format!("{title} started (GPU locked)")
        } else {
            format!("{title} started (concurrent: {active}/{})", self.limit)
        }
    }
}

/// A job routed to its handler.
pub struct Routed<'a> {
    /// The handler.
    pub entry: &'a HandlerEntry,
    /// The job's input object.
    pub input: Map<String, Value>,
}

/// All handlers, in name order; a handler's [`HandlerId`] is its place in it.
#[derive(Clone, Default)]
pub struct HandlerSet {
    entries: Vec<HandlerEntry>,
    /// The handler OpenAI requests (`openai_route`) go to, if any.
    openai: Option<String>,
    /// Every batcher, with the handlers that use it.
    batchers: Vec<BatchUse>,
}

/// Notes that handler `id` runs on `used`.
fn add_uses(batchers: &mut Vec<BatchUse>, id: HandlerId, used: &[Arc<dyn AnyBatcher>]) {
    for batcher in used {
        match batchers
            .iter_mut()
            .find(|u| u.batcher.identity() == batcher.identity())
        {
            Some(known) => known.handlers.push(id),
            None => batchers.push(BatchUse {
                batcher: batcher.clone(),
                handlers: vec![id],
            }),
        }
    }
}

/// A batcher and the handlers whose work runs on it.
#[derive(Clone)]
pub struct BatchUse {
    /// The batcher.
    pub batcher: Arc<dyn AnyBatcher>,
    /// The handlers that use it.
    pub handlers: Vec<HandlerId>,
}

impl HandlerSet {
    /// Builds every `[handlers.<name>]`, loading their models (blocking: model files are read
    /// and a warm-up forward runs). `gpu_present` says whether CUDA handlers get a GPU (a real
    /// one, or the simulated one, `simulated`).
    pub fn build(config: &Config, gpu_present: bool, simulated: bool) -> Result<Self, LoadError> {
        if let Some(missing) = config.model_location.missing() {
            return Err(LoadError::ModelNotFound(missing));
        }
        tracing::info!(
            "{}",
            config.model_location.describe(&config.handler.model_dir)
        );
        crate::model::set_threads(config.handler.intra_op_threads);
        let mut loader = ModelLoader::new(
            &config.handler.model_dir,
            config.handler.parser.as_deref(),
            &config.batching,
        );
        let mut entries = Vec::new();
        let mut batchers: Vec<BatchUse> = Vec::new();
        // `config.handlers` is a BTreeMap: name order.
        for (name, table) in &config.handlers {
            let kind = table.kind(name).to_owned();
            let wants_gpu = table.device == DeviceChoice::Cuda;
            let on_gpu = wants_gpu && gpu_present;
            // A simulated GPU is accounted as a GPU but computes on the CPU.
            let devices = crate::model::devices_for(on_gpu && !simulated);
            let handler = loader.handler(&kind, table, &devices, on_gpu)?;
            let id = HandlerId(entries.len());
            let used = handler.batchers();
            add_uses(&mut batchers, id, &used);
            let entry = HandlerEntry {
                id,
                name: name.clone(),
                kind,
                handler: Ok(handler),
                limit: table.max_concurrency as usize,
                on_gpu,
                gpu_fallback: wants_gpu && !gpu_present,
                reservation: table.reservation(&config.handler, gpu_present),
                batched: !used.is_empty(),
            };
            entries.push(entry);
        }
        // `[handler] openai_handler` (checked to be an extract handler), else the first one.
        let openai = config.handler.openai_handler.clone().or_else(|| {
            entries
                .iter()
                .find(|e| e.kind == "extract")
                .map(|e| e.name.clone())
        });
        Ok(Self {
            entries,
            openai,
            batchers,
        })
    }

    /// Every batcher of this worker, with the handlers that use it.
    pub fn batchers(&self) -> &[BatchUse] {
        &self.batchers
    }

    /// Replaces the implementation of handler `name` (tests and embedders).
    pub fn with_handler(mut self, name: &str, handler: Arc<dyn Handler>) -> Self {
        let Some(entry) = self.entries.iter_mut().find(|e| e.name == name) else {
            return self;
        };
        let used = handler.batchers();
        entry.batched = !used.is_empty();
        entry.handler = Ok(handler);
        let id = entry.id;
        for known in &mut self.batchers {
            known.handlers.retain(|h| *h != id);
        }
        self.batchers.retain(|u| !u.handlers.is_empty());
        add_uses(&mut self.batchers, id, &used);
        self
    }

    /// Every handler.
    pub fn entries(&self) -> impl Iterator<Item = &HandlerEntry> {
        self.entries.iter()
    }

    /// One handler by name.
    pub fn get(&self, name: &str) -> Option<&HandlerEntry> {
        let found = self.entries.binary_search_by(|e| e.name.as_str().cmp(name));
        found.ok().map(|index| &self.entries[index])
    }

    /// The handler a job was routed to.
    pub fn entry(&self, id: HandlerId) -> &HandlerEntry {
        &self.entries[id.0]
    }

    /// Finds the handler for a job's input (`input.task`), or says why there is none.
    pub fn route(&self, input: &Value) -> Result<Routed<'_>, JobError> {
        let Value::Object(input) = input else {
            return Err(JobError::invalid_input(format!(
                "input must be a JSON object with a \"task\" key, got {}",
                kind_of(input)
            )));
        };
        if super::openai::is_openai(input) {
            // The platform's OpenAI route: routed by `openai_route`, whatever the task.
            let entry = self
                .openai
                .as_ref()
                .and_then(|name| self.get(name))
                .ok_or_else(|| {
                    JobError::invalid_input(
                        "this worker serves no OpenAI routes: it has no extract handler",
                    )
                })?;
            return Ok(Routed {
                entry,
                input: input.clone(),
            });
        }
        let task = match input.get("task") {
            Some(Value::String(task)) => task,
            Some(other) => {
                return Err(JobError::invalid_input(format!(
                    "input.task must be a string, got {}",
                    kind_of(other)
                )))
            }
            None => {
                return Err(JobError::invalid_input(format!(
                    "input.task is required: one of {}",
                    self.names()
                )))
            }
        };
        let entry = self.get(task).ok_or_else(|| {
            let shown: String = task.chars().take(64).collect();
            JobError::invalid_input(format!(
                "unknown task {shown:?}: this worker serves {}",
                self.names()
            ))
        })?;
        Ok(Routed {
            entry,
            input: input.clone(),
        })
    }

    fn names(&self) -> String {
        self.entries
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::ErrorType;
    use serde_json::json;

    /// The default handler names, all as echo (no model files needed).
    fn echo_config() -> Config {
        let mut config = Config::default();
        for table in config.handlers.values_mut() {
            table.kind = Some("echo".into());
        }
        config
    }

    fn set() -> HandlerSet {
        HandlerSet::build(&echo_config(), false, false).unwrap()
    }

    #[test]
    fn routing_errors_name_the_problem() {
        let set = set();
        let err = |input: Value| set.route(&input).err().unwrap();
        assert!(err(json!("hi")).message.contains("got a string"));
        assert!(err(json!({}))
            .message
            .contains("input.task is required: one of classify, echo, extract"));
        assert!(err(json!({"task": 3})).message.contains("must be a string"));
        let unknown = err(json!({"task": "dance"}));
        assert_eq!(unknown.error_type, ErrorType::InvalidInput);
        assert!(unknown.message.contains("unknown task \"dance\""));
        assert_eq!(
            set.route(&json!({"task": "echo"})).ok().unwrap().entry.name,
            "echo"
        );
    }

    #[test]
    fn start_lines_follow_the_seed() {
        let entry = |kind: &str, on_gpu: bool, limit: usize| HandlerEntry {
            id: HandlerId(0),
            name: kind.into(),
            kind: kind.into(),
            handler: Err(String::new()),
            limit,
            on_gpu,
            gpu_fallback: false,
            reservation: Size::default(),
            batched: false,
        };
        assert_eq!(
            entry("extract", false, 4).started_line(3),
            "Extraction started (concurrent: 3/4)"
        );
        assert_eq!(
            entry("classify", true, 1).started_line(1),
            "Classification started (GPU locked)"
        );
        assert_eq!(
            entry("classify", false, 1).started_line(1),
            "Classification started (concurrent: 1/1)"
        );
        let cpu = HandlerSet::build(&echo_config(), false, false).unwrap();
        let classify = cpu.get("classify").unwrap();
        assert!(classify.gpu_fallback && !classify.on_gpu);
        assert_eq!(
            cpu.get("echo").unwrap().started_line(2),
            "Echo started (concurrent: 2/4)"
        );
        let gpu = HandlerSet::build(&echo_config(), true, true).unwrap();
        assert!(gpu.get("classify").unwrap().on_gpu);
    }
}
