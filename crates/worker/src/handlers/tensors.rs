//! JSON tensors in and out of the torchscript handler: `{"shape", "dtype", "data"}`, checked
//! before anything runs; floats JSON numbers cannot hold (±Inf, NaN) are the strings
//! `"Infinity"`, `"-Infinity"` and `"NaN"`, both ways, never `null`.

use serde::Serialize;
use serde_json::{json, Value};
use tch::{Device, IValue, Kind, Tensor};

use crate::outcome::JobError;

/// Largest tensor accepted, in elements.
const MAX_ELEMENTS: usize = 10_000_000;

/// A JSON tensor, checked.
#[derive(Debug)]
pub(super) struct JsonTensor {
    shape: Vec<i64>,
    kind: Kind,
    data: Vec<f64>,
}

pub(super) fn read_tensor(name: &str, value: &Value) -> Result<JsonTensor, JobError> {
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
    let floats = matches!(kind, Kind::Float | Kind::Double);
    let data: Vec<f64> = value
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("`data` must be a flat array of numbers"))?
        .iter()
        .map(|v| {
            v.as_f64()
                .or_else(|| v.as_bool().map(f64::from))
                .or_else(|| v.as_str().filter(|_| floats).and_then(non_finite))
        })
        .collect::<Option<_>>()
        .ok_or_else(|| {
            invalid(if floats {
                "`data` must hold only numbers (or \"Infinity\", \"-Infinity\", \"NaN\")"
            } else {
                "`data` must hold only numbers"
            })
        })?;
    if data.len() != elements {
        return Err(invalid(&format!(
            "`data` has {} values but `shape` needs {elements}",
            data.len()
        )));
    }
    Ok(JsonTensor { shape, kind, data })
}

/// A tensor of zeros of `shape` and `dtype`, for a warm-up forward pass; `Err` says why not.
pub(super) fn zeros(name: &str, shape: &[i64], dtype: &str) -> Result<JsonTensor, String> {
    let elements = shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(usize::try_from(*d).ok()?))
        .filter(|n| *n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            format!("warm_up.{name}: shape {shape:?} is over the limit of {MAX_ELEMENTS} elements")
        })?;
    let value = serde_json::json!({"shape": shape, "dtype": dtype, "data": vec![0; elements]});
    read_tensor(name, &value).map_err(|e| e.message.replace("input.inputs.", "warm_up."))
}

/// The float a non-finite marker string stands for.
fn non_finite(text: &str) -> Option<f64> {
    match text {
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => None,
    }
}

/// A float as JSON: a number when JSON can hold it, else the marker string (serde_json would
/// write `null`, which reads back as a missing value).
fn float_json<F: Into<f64> + Copy + Serialize>(value: F) -> Value {
    let wide: f64 = value.into();
    if wide.is_nan() {
        json!("NaN")
    } else if wide == f64::INFINITY {
        json!("Infinity")
    } else if wide == f64::NEG_INFINITY {
        json!("-Infinity")
    } else {
        json!(value)
    }
}

fn floats_json<F: Into<f64> + Copy + Serialize>(values: Vec<F>) -> Value {
    Value::Array(values.into_iter().map(float_json).collect())
}

impl JsonTensor {
    /// Its first dimension: the rows of a batched model's input.
    pub(super) fn rows(&self) -> i64 {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Its elements.
    pub(super) fn elements(&self) -> usize {
        self.data.len()
    }

    /// What must agree for two jobs' inputs to be concatenated: the dtype and every dimension
    /// after the first.
    pub(super) fn row_shape(&self) -> (Kind, &[i64]) {
        (self.kind, self.shape.get(1..).unwrap_or_default())
    }

    /// `parts` (of one row shape) one after the other along the first dimension.
    pub(super) fn concat(parts: &[&JsonTensor]) -> JsonTensor {
        let first = parts.first().map(|p| p.row_shape());
        let mut shape = vec![parts.iter().map(|p| p.rows()).sum()];
        shape.extend_from_slice(first.map_or(&[][..], |(_, rest)| rest));
        JsonTensor {
            shape,
            kind: first.map_or(Kind::Float, |(kind, _)| kind),
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        }
    }
}

/// The tensors a model returned (one, a tuple or a list of them), in order.
pub(super) fn output_tensors(value: IValue) -> Result<Vec<Tensor>, tch::TchError> {
    match value {
        IValue::Tensor(t) => Ok(vec![t]),
        IValue::Tuple(items) | IValue::GenericList(items) => items
            .into_iter()
            .map(output_tensors)
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.into_iter().flatten().collect()),
        IValue::TensorList(items) => Ok(items),
        _ => Err(tch::TchError::Convert(
            "the model returned something other than tensors".into(),
        )),
    }
}

pub(super) fn to_tensor(t: &JsonTensor, device: Device) -> Result<Tensor, tch::TchError> {
    Tensor::f_from_slice(&t.data)?
        .f_view(t.shape.as_slice())?
        .f_to_kind(t.kind)?
        .f_to_device(device)
}

pub(super) fn tensor_json(t: &Tensor) -> Result<Value, tch::TchError> {
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
        Kind::Double => (
            "float64",
            floats_json(Vec::<f64>::try_from(t.f_flatten(0, -1)?)?),
        ),
        _ => (
            "float32",
            floats_json(Vec::<f32>::try_from(
                t.f_to_kind(Kind::Float)?.f_flatten(0, -1)?,
            )?),
        ),
    };
    Ok(json!({ "shape": shape, "dtype": dtype, "data": data }))
}

pub(super) fn outputs_json(value: IValue) -> Result<Vec<Value>, tch::TchError> {
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
        let special = read_tensor(
            "x",
            &json!({"shape": [3], "data": ["Infinity", "-Infinity", "NaN"]}),
        )
        .unwrap();
        assert_eq!(special.data[..2], [f64::INFINITY, f64::NEG_INFINITY]);
        assert!(special.data[2].is_nan());
        assert!(
            bad(json!({"shape": [1], "dtype": "int64", "data": ["NaN"]})).contains("only numbers")
        );
    }

    #[test]
    fn non_finite_outputs_are_marker_strings_never_null() {
        let t = Tensor::from_slice(&[1.5f32, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        let json = tensor_json(&t).unwrap();
        assert_eq!(json["data"], json!([1.5, "Infinity", "-Infinity", "NaN"]));
        let t = Tensor::from_slice(&[0.25f64, f64::NAN]);
        assert_eq!(tensor_json(&t).unwrap()["data"], json!([0.25, "NaN"]));
    }
}
