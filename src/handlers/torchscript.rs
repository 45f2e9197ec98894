//! `kind = "torchscript"`: serves any TorchScript model named in the config, without Rust.
//! Inputs are JSON tensors, one per name the config declares:
//! `{"inputs": {"x": {"shape": [2, 4], "dtype": "float32", "data": [...]}}}`; outputs come back
//! the same way: `{"outputs": [{"shape", "dtype", "data"}]}`.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Value};
use tch::{CModule, Device, IValue, Kind, Tensor};

use super::{Handler, JobContext};
use crate::model::{torch_error, OnDevices};
use crate::outcome::{ErrorType, JobError};

/// Largest tensor accepted, in elements.
const MAX_ELEMENTS: usize = 10_000_000;

/// The generic TorchScript handler.
pub struct TorchScriptHandler {
    /// The model and the device it is on, one per device.
    pub modules: OnDevices<(Arc<CModule>, Device)>,
    /// Input names, in `forward`'s order.
    pub inputs: Vec<String>,
}

/// A JSON tensor, checked.
#[derive(Debug)]
struct JsonTensor {
    shape: Vec<i64>,
    kind: Kind,
    data: Vec<f64>,
}

fn read_tensor(name: &str, value: &Value) -> Result<JsonTensor, JobError> {
    let invalid = |what: &str| JobError::invalid_input(format!("input.inputs.{name}: {what}"));
    let shape: Vec<i64> = value
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("`shape` must be an array of sizes"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| i64::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| invalid("`shape` must hold whole numbers"))?;
    if shape.is_empty() || shape.len() > 8 {
        return Err(invalid("`shape` must have 1 to 8 dimensions"));
    }
    let elements = shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d as usize))
        .unwrap_or(usize::MAX);
    if elements > MAX_ELEMENTS {
        return Err(invalid(&format!(
            "{elements} elements is over the limit of {MAX_ELEMENTS}"
        )));
    }
    let kind = match value
        .get("dtype")
        .and_then(Value::as_str)
        .unwrap_or("float32")
    {
        "float32" => Kind::Float,
        "float64" => Kind::Double,
        "int64" => Kind::Int64,
        "int32" => Kind::Int,
        "bool" => Kind::Bool,
        other => {
            return Err(invalid(&format!(
                "dtype {other:?} is not one of float32, float64, int64, int32, bool"
            )))
        }
    };
    let data: Vec<f64> = value
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("`data` must be a flat array of numbers"))?
        .iter()
        .map(|v| v.as_f64().or_else(|| v.as_bool().map(f64::from)))
        .collect::<Option<_>>()
        .ok_or_else(|| invalid("`data` must hold only numbers"))?;
    if data.len() != elements {
        return Err(invalid(&format!(
            "`data` has {} values but `shape` needs {elements}",
            data.len()
        )));
    }
    Ok(JsonTensor { shape, kind, data })
}

fn to_tensor(t: &JsonTensor, device: Device) -> Result<Tensor, tch::TchError> {
    Tensor::f_from_slice(&t.data)?
        .f_view(t.shape.as_slice())?
        .f_to_kind(t.kind)?
        .f_to_device(device)
}

fn tensor_json(t: &Tensor) -> Result<Value, tch::TchError> {
    let t = t.f_to_device(Device::Cpu)?;
    let shape = t.size();
    let (dtype, data) = match t.kind() {
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 => (
            "int64",
            json!(Vec::<i64>::try_from(
                t.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?
            )?),
        ),
        Kind::Bool => ("bool", json!(Vec::<bool>::try_from(t.f_flatten(0, -1)?)?)),
        Kind::Double => ("float64", json!(Vec::<f64>::try_from(t.f_flatten(0, -1)?)?)),
        _ => (
            "float32",
            json!(Vec::<f32>::try_from(
                t.f_to_kind(Kind::Float)?.f_flatten(0, -1)?
            )?),
        ),
    };
    Ok(json!({ "shape": shape, "dtype": dtype, "data": data }))
}

fn outputs_json(value: IValue) -> Result<Vec<Value>, tch::TchError> {
    match value {
        IValue::Tensor(t) => Ok(vec![tensor_json(&t)?]),
        IValue::Tuple(items) | IValue::GenericList(items) => items
            .into_iter()
            .map(outputs_json)
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.concat()),
        IValue::TensorList(items) => items.iter().map(tensor_json).collect(),
        _ => Err(tch::TchError::Convert(
            "the model returned something other than tensors".into(),
        )),
    }
}

#[async_trait]
impl Handler for TorchScriptHandler {
    async fn run(&self, ctx: JobContext) -> Result<Value, JobError> {
        let Some(given) = ctx.input.get("inputs").and_then(Value::as_object) else {
            return Err(JobError::invalid_input(format!(
                "input.inputs must be an object with the tensors {}",
                self.inputs.join(", ")
            )));
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_tensors_are_checked_before_anything_runs() {
        let ok = read_tensor(
            "x",
            &json!({"shape": [2, 2], "dtype": "float32", "data": [1, 2, 3, 4]}),
        )
        .unwrap();
        assert_eq!((ok.shape, ok.kind), (vec![2, 2], Kind::Float));
        let bad = |v: Value| read_tensor("x", &v).unwrap_err().message;
        assert!(bad(json!({"shape": [3], "data": [1, 2]})).contains("2 values but `shape` needs 3"));
        assert!(bad(json!({"shape": [1], "dtype": "complex", "data": [1]})).contains("not one of"));
        assert!(bad(json!({"shape": [100000, 100000], "data": []})).contains("over the limit"));
        assert!(bad(json!({"shape": [1], "data": ["x"]})).contains("only numbers"));
    }
}
