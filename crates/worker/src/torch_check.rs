//! A libtorch self-check: builds a tiny TorchScript module by tracing, runs it, and reports
//! what libtorch sees (CUDA devices). Proves the pinned build links and runs.

use tch::{CModule, Cuda, Device, Kind, Tensor};

/// What libtorch reports about this machine.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchReport {
    /// `Cuda::is_available()`.
    pub cuda_available: bool,
    /// `Cuda::device_count()`.
    pub cuda_devices: i64,
    /// Output of the traced module `relu(x · w)` for the check input.
    pub check_output: Vec<f32>,
}

/// Traces `relu(x · w)` into a TorchScript module and runs it on the CPU.
pub fn traced_module() -> Result<CModule, tch::TchError> {
    let weight = Tensor::f_from_slice(&[1.0f32, -1.0, 2.0, 0.5])?.f_view([2, 2])?;
    let example = Tensor::f_zeros([1, 2], (Kind::Float, Device::Cpu))?;
    let mut forward = move |inputs: &[Tensor]| vec![inputs[0].matmul(&weight).relu()];
    CModule::create_by_tracing("TorchCheck", "forward", &[example], &mut forward)
}

/// Runs the check on the CPU.
pub fn run() -> Result<TorchReport, tch::TchError> {
    let _no_grad = tch::no_grad_guard();
    let module = traced_module()?;
    let input = Tensor::f_from_slice(&[1.0f32, 2.0])?.f_view([1, 2])?;
    let output = module.forward_ts(&[input])?;
    let check_output = Vec::<f32>::try_from(output.f_flatten(0, -1)?)?;
    Ok(TorchReport {
        cuda_available: Cuda::is_available(),
        cuda_devices: Cuda::device_count(),
        check_output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traced_torchscript_module_runs_on_cpu_and_survives_save_and_load() {
        let report = run().unwrap();
        // [1, 2] · [[1, -1], [2, 0.5]] = [5, 0]; relu keeps both.
        assert_eq!(report.check_output, vec![5.0, 0.0]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("check.pt");
        traced_module().unwrap().save(&path).unwrap();
        let loaded = CModule::load_on_device(&path, Device::Cpu).unwrap();
        let input = Tensor::from_slice(&[-1.0f32, 1.0]).view([1, 2]);
        let out =
            Vec::<f32>::try_from(loaded.forward_ts(&[input]).unwrap().flatten(0, -1)).unwrap();
        // [-1, 1] · w = [1, 1.5]
        assert_eq!(out, vec![1.0, 1.5]);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let module = traced_module().unwrap();
        let wrong_shape = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3]);
        assert!(module.forward_ts(&[wrong_shape]).is_err());
    }
}
