//! `kind = "torchscript"`: serves any TorchScript model named in the config, without Rust.
//! Inputs are JSON tensors, one per name the config declares (and no others):
//! `{"inputs": {"x": {"shape": [2, 4], "dtype": "float32", "data": [...]}}}`; outputs come back
//! the same way: `{"outputs": [{"shape", "dtype", "data"}]}`. Floats JSON numbers cannot hold
//! (±Inf, NaN) are the strings `"Infinity"`, `"-Infinity"` and `"NaN"`, both ways.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Value};
use tch::{CModule, Device, IValue};

pub(super) use super::tensors::zeros;
use super::tensors::{outputs_json, read_tensor, to_tensor, JsonTensor};
use super::torchscript_batch::JobTensors;
use super::{Handler, JobContext, Prepared};
use crate::model::{torch_error, AnyBatcher, Batcher, OnDevices};
use crate::outcome::{ErrorType, JobError};

/// The generic TorchScript handler.
pub struct TorchScriptHandler {
    /// The model and the device it is on, one per device.
    pub modules: OnDevices<(Arc<CModule>, Device)>,
    /// Input names, in `forward`'s order.
    pub inputs: Vec<String>,
    /// With `batch = true`: the model's batcher on each device.
    pub(super) batchers: Option<OnDevices<TensorBatcher>>,
    /// The warm-up inputs (`warm_up`), in `forward`'s order.
    pub(super) warm_up: Option<Vec<JsonTensor>>,
}

/// Warm-up forward passes per device: TorchScript's profiling executor records the first
/// call and optimises the graph at the next, so two calls leave the first job the fast path.
const WARM_UP_CALLS: usize = 2;

/// A batcher of jobs' tensors (`batch = true`).
pub(super) type TensorBatcher = Batcher<JobTensors, Vec<Value>>;

/// More arguments than any `forward` takes: calling with these fails libtorch's argument check
/// before anything runs, and its message states the method's declaration.
const PROBE_ARGUMENTS: usize = 256;

fn probe_arguments() -> Vec<IValue> {
    (0..PROBE_ARGUMENTS).map(|_| IValue::None).collect()
}

/// Checks the configured input names against `forward`'s declaration, as far as libtorch lets
/// us see it (tch has no schema API; libtorch's argument-count error quotes the declaration).
/// `Ok` when they match or the declaration cannot be read; `Err` says how they differ.
pub(super) fn check_input_names(module: &CModule, configured: &[String]) -> Result<(), String> {
    let probe = probe_arguments();
    let Err(error) = module.forward_is(&probe) else {
        return Ok(());
    };
    let Some(declared) = declared_arguments(&error.to_string()) else {
        tracing::debug!("the model's forward declaration could not be read; inputs not checked");
        return Ok(());
    };
    let names: Vec<&str> = declared.iter().map(|(name, _)| name.as_str()).collect();
    let in_order = configured.len() <= declared.len()
        && configured.iter().zip(&names).all(|(c, d)| c == d)
        && declared[configured.len()..]
            .iter()
            .all(|(_, default)| *default);
    if in_order {
        Ok(())
    } else {
        Err(format!(
            "inputs = {configured:?} does not match the model's forward({}): list its \
             arguments in order (those with defaults may be left off the end)",
            names.join(", ")
        ))
    }
}

/// The arguments (name, has a default) of the declaration quoted in a libtorch error such as
/// `... Declaration: forward(__torch__.M self, Tensor x, int k=3) -> Tensor`, `self` left out.
fn declared_arguments(message: &str) -> Option<Vec<(String, bool)>> {
    let declaration = &message[message.find("Declaration: ")? + "Declaration: ".len()..];
    let open = declaration.find('(')?;
    let mut arguments = Vec::new();
    let (mut depth, mut quote, mut start, mut closed) = (0usize, None, open + 1, false);
    for (i, c) in declaration.char_indices().skip(open + 1) {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '(' | '[' | '{') => depth += 1,
            (None, ')') if depth == 0 => {
                arguments.push(&declaration[start..i]);
                closed = true;
                break;
            }
            (None, ')' | ']' | '}') => depth = depth.checked_sub(1)?,
            (None, ',') if depth == 0 => {
                arguments.push(&declaration[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !closed {
        return None;
    }
    let parsed = arguments
        .into_iter()
        .map(str::trim)
        // `*` marks the keyword-only arguments that follow; empty is `forward()`.
        .filter(|a| !a.is_empty() && *a != "*")
        .map(|argument| {
            let (typed, default) = match argument.split_once('=') {
                Some((typed, _)) => (typed, true),
                None => (argument, false),
            };
            let name = typed.split_whitespace().last()?;
            Some((name.to_owned(), default))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(
        parsed
            .into_iter()
            .filter(|(name, _)| name != "self")
            .collect(),
    )
}

#[async_trait]
impl Handler for TorchScriptHandler {
    fn warm_up(&self) -> Result<(), String> {
        let Some(tensors) = &self.warm_up else {
            tracing::info!(
                "a torchscript handler (inputs {:?}) has no `warm_up` shapes: its first jobs \
                 pay for TorchScript's profiling runs",
                self.inputs
            );
            return Ok(());
        };
        let _no_grad = tch::no_grad_guard();
        for (module, device) in &self.modules.0 {
            let inputs = tensors
                .iter()
                .map(|t| to_tensor(t, *device).map(IValue::Tensor))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the warm_up inputs could not be made into tensors ({e})"))?;
            for _ in 0..WARM_UP_CALLS {
                module.forward_is(&inputs).map_err(|e| {
                    format!("the model failed on its warm_up inputs (check their shapes): {e}")
                })?;
            }
        }
        Ok(())
    }

    fn batchers(&self) -> Vec<Arc<dyn AnyBatcher>> {
        self.batchers.as_ref().map_or_else(Vec::new, |batchers| {
            batchers
                .0
                .iter()
                .map(|b| Arc::new(b.clone()) as Arc<dyn AnyBatcher>)
                .collect()
        })
    }

    async fn run(&self, ctx: JobContext, _prepared: Prepared) -> Result<Value, JobError> {
        let Some(given) = ctx.input.get("inputs").and_then(Value::as_object) else {
            return Err(JobError::invalid_input(format!(
                "input.inputs must be an object with the tensors {}",
                self.inputs.join(", ")
            )));
        };
        let unknown: Vec<&str> = given
            .keys()
            .map(String::as_str)
            .filter(|name| !self.inputs.iter().any(|known| known == name))
            .collect();
        if !unknown.is_empty() {
            let names: Vec<String> = unknown
                .iter()
                .map(|n| format!("input.inputs.{n}"))
                .collect();
            let verb = if names.len() == 1 {
                "is not an input"
            } else {
                "are not inputs"
            };
            return Err(JobError::invalid_input(format!(
                "{} {verb} of this model; it takes: {}",
                names.join(", "),
                self.inputs.join(", ")
            )));
        }
        let tensors = self
            .inputs
            .iter()
            .map(|name| {
                let value = given.get(name).ok_or_else(|| {
                    JobError::invalid_input(format!("input.inputs.{name} is missing"))
                })?;
                read_tensor(name, value)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(batchers) = &self.batchers {
            return self.run_batched(&ctx, batchers, tensors).await;
        }
        let (module, device) = self.modules.for_device(ctx.device)?.clone();
        ctx.run_blocking(move || {
            let _no_grad = tch::no_grad_guard();
            let inputs = tensors
                .iter()
                .map(|t| to_tensor(t, device).map(IValue::Tensor))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    JobError::invalid_input(format!(
                        "the inputs could not be made into tensors ({e})"
                    ))
                })?;
            let output = module.forward_is(&inputs).map_err(|e| {
                let error = torch_error(&e, 10);
                if error.error_type == ErrorType::ModelError {
                    JobError::new(
                        ErrorType::ModelError,
                        "the model failed on these inputs (check shapes and dtypes)",
                    )
                } else {
                    error
                }
            })?;
            let outputs = outputs_json(output).map_err(|e| torch_error(&e, 10))?;
            Ok(json!({ "outputs": outputs }))
        })
        .await?
    }
}

impl TorchScriptHandler {
    /// Hands the job's tensors to the model's batcher, once every input has the same first
    /// dimension (the job's rows).
    async fn run_batched(
        &self,
        ctx: &JobContext,
        batchers: &OnDevices<TensorBatcher>,
        tensors: Vec<JsonTensor>,
    ) -> Result<Value, JobError> {
        let rows: Vec<i64> = tensors.iter().map(JsonTensor::rows).collect();
        if rows.iter().any(|r| *r != rows[0]) || rows[0] == 0 {
            let shown: Vec<String> = self
                .inputs
                .iter()
                .zip(&rows)
                .map(|(name, r)| format!("{name} has {r}"))
                .collect();
            return Err(JobError::invalid_input(format!(
                "this model batches jobs: every input's first dimension is the job's rows, the \
                 same for all and at least 1 ({})",
                shown.join(", ")
            )));
        }
        let batcher = batchers.for_device(ctx.device)?.clone();
        let ticket = ctx.ticket();
        let mut outputs = ctx
            .run_blocking(move || batcher.run(vec![JobTensors(tensors)], &ticket))
            .await??;
        let outputs = outputs
            .pop()
            .ok_or_else(|| JobError::internal("no output"))?;
        Ok(json!({ "outputs": outputs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_arguments_are_read_from_libtorchs_message() {
        let args = |m: &str| declared_arguments(m).map(|a| a.into_iter().collect::<Vec<_>>());
        let own = |v: &[(&str, bool)]| {
            Some(
                v.iter()
                    .map(|(n, d)| (n.to_string(), *d))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            args("Expected at most 2 argument(s) for operator 'forward', but received 257 argument(s). Declaration: forward(__torch__.ExampleLinear self, Tensor x) -> Tensor"),
            own(&[("x", false)])
        );
        assert_eq!(
            args("Declaration: forward(__torch__.M self, Tuple[Tensor, Tensor] pair, Dict(str, Tensor) d, str sep=\",)\", int[2] k=[1, 2], *, bool flag=False) -> (Tensor, Tensor)"),
            own(&[("pair", false), ("d", false), ("sep", true), ("k", true), ("flag", true)])
        );
        assert_eq!(
            args("Declaration: forward(__torch__.M self) -> Tensor"),
            own(&[])
        );
        assert_eq!(args("forward() is missing value for argument 'x'"), None);
        assert_eq!(
            args("Declaration: forward(__torch__.M self, Tensor x"),
            None
        );
    }

    #[test]
    fn configured_input_names_are_checked_against_forward_at_load() {
        let module = crate::torch_check::traced_module().unwrap();
        let probe = probe_arguments();
        let message = module.forward_is(&probe).unwrap_err().to_string();
        let declared = declared_arguments(&message).expect("libtorch quotes the declaration");
        assert_eq!(declared.len(), 1, "{message}");
        let name = declared[0].0.clone();
        assert_eq!(
            check_input_names(&module, std::slice::from_ref(&name)),
            Ok(())
        );
        let wrong = check_input_names(&module, &["not_an_argument".to_owned()]).unwrap_err();
        assert!(
            wrong.contains("not_an_argument") && wrong.contains(&format!("forward({name})")),
            "{wrong}"
        );
        assert!(check_input_names(&module, &[name.clone(), name]).is_err());
    }
}
