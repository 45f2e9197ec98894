//! What libtorch's CUDA runtime reports (through the C++ shim built by `build.rs`), and the
//! diagnosis of a host where NVML sees a GPU but libtorch cannot use it: a driver older than
//! the wheel's CUDA needs, or libtorch's CUDA library not loaded.

// Calls into the shim's C ABI, which catches every C++ exception and writes only through the
// pointers and lengths it is given.
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr};

use super::identity::PciBusId;

extern "C" {
    fn tms_load_torch_cuda(message: *mut c_char, len: i32) -> i32;
    fn tms_torch_cuda_linked() -> i32;
    fn tms_cuda_runtime_version() -> i32;
    fn tms_cuda_device_count(count: *mut i32, message: *mut c_char, len: i32) -> i32;
    fn tms_cuda_pci_bus_id(device: i32, out: *mut c_char, len: i32) -> i32;
    fn tms_memory_info(device: i32, free: *mut i64, total: *mut i64) -> i32;
}

/// The libtorch this binary is built against (tch 0.24.0).
pub const LIBTORCH_VERSION: &str = "2.11.0";

/// A CUDA version as the runtime and NVML write it: 13000 is 13.0, 12020 is 12.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion(pub i32);

impl std::fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0 / 1000, (self.0 % 1000) / 10)
    }
}

/// What [`load_torch_cuda`] did at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaLoad {
    /// `libtorch_cuda.so` (and the CUDA libraries it needs) is loaded.
    Loaded,
    /// No NVIDIA driver (`libcuda.so.1` cannot be opened): nothing was loaded, CPU only.
    NoDriver,
    /// The driver is there but `libtorch_cuda.so` did not load: the loader's message.
    Failed(String),
    /// [`load_torch_cuda`] was not called (a command that runs no model).
    NotTried,
}

static CUDA_LOAD: std::sync::OnceLock<CudaLoad> = std::sync::OnceLock::new();

/// Loads libtorch's CUDA library when this host has an NVIDIA driver. Call it first thing in
/// `main`, before anything asks libtorch about CUDA: libtorch caches whether CUDA exists at
/// the first question. The binaries do not link `libtorch_cuda` (on a CPU host, loading it
/// and the CUDA libraries it needs was most of a start), so this is where CUDA comes in.
pub fn load_torch_cuda() -> &'static CudaLoad {
    CUDA_LOAD.get_or_init(|| {
        let mut message = [0 as c_char; 512];
        // SAFETY: `message` is valid and exclusive for 512 bytes; the shim NUL-terminates
        // within it. Loading libtorch_cuda runs its static initialisers, which only register
        // CUDA with libtorch's registries (nothing else runs yet).
        let status = unsafe { tms_load_torch_cuda(message.as_mut_ptr(), 512) };
        match status {
            1 => CudaLoad::Loaded,
            2 => CudaLoad::NoDriver,
            _ => {
                // SAFETY: NUL-terminated by the shim within the buffer.
                let text = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy();
                CudaLoad::Failed(text.into_owned())
            }
        }
    })
}

/// What [`load_torch_cuda`] did, if it was called.
pub fn cuda_load() -> CudaLoad {
    CUDA_LOAD.get().cloned().unwrap_or(CudaLoad::NotTried)
}

/// Whether libtorch's CUDA library (`libtorch_cuda.so`) is loaded in this process.
pub fn torch_cuda_linked() -> bool {
    // SAFETY: no arguments; the shim only asks the dynamic loader.
    unsafe { tms_torch_cuda_linked() == 1 }
}

/// The CUDA runtime version libtorch was built with (its cudart), if cudart is loaded.
pub fn runtime_version() -> Option<CudaVersion> {
    // SAFETY: no arguments; the shim catches everything.
    let version = unsafe { tms_cuda_runtime_version() };
    (version > 0).then_some(CudaVersion(version))
}

/// `cudaGetDeviceCount`: the count, or the runtime's error text.
pub fn device_count() -> Result<usize, String> {
    let mut count = 0i32;
    let mut message = [0 as c_char; 256];
    // SAFETY: `count` and `message` are valid and exclusive; the shim writes at most
    // `message.len()` bytes, NUL-terminated.
    let status = unsafe { tms_cuda_device_count(&mut count, message.as_mut_ptr(), 256) };
    match status {
        0 => Ok(usize::try_from(count).unwrap_or(0)),
        -2 => Err("the CUDA runtime is not loaded".to_owned()),
        code => {
            // SAFETY: the shim always NUL-terminates within the buffer.
            let text = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy();
            Err(format!("{text} (cudaError {code})"))
        }
    }
}

/// The PCI address of CUDA device `ordinal`, as the runtime reports it.
pub fn pci_bus_id(ordinal: usize) -> Option<PciBusId> {
    let ordinal = i32::try_from(ordinal).ok()?;
    let mut out = [0 as c_char; 64];
    // SAFETY: `out` is valid for 64 bytes; the runtime NUL-terminates within `len`.
    let written = unsafe { tms_cuda_pci_bus_id(ordinal, out.as_mut_ptr(), 64) };
    if written != 1 {
        return None;
    }
    // SAFETY: NUL-terminated by the runtime within the buffer (zeroed beforehand).
    let text = unsafe { CStr::from_ptr(out.as_ptr()) }.to_string_lossy();
    PciBusId::parse(&text)
}

/// Free and total memory of CUDA device `ordinal` as libtorch's allocator sees it.
pub fn memory_info(ordinal: usize) -> Option<(u64, u64)> {
    let ordinal = i32::try_from(ordinal).ok()?;
    let (mut free, mut total) = (0i64, 0i64);
    // SAFETY: two valid, exclusive pointers; the shim catches every C++ exception.
    let status = unsafe { tms_memory_info(ordinal, &mut free, &mut total) };
    (status == 1).then(|| {
        (
            u64::try_from(free).unwrap_or(0),
            u64::try_from(total).unwrap_or(0),
        )
    })
}

/// What the NVIDIA driver says of itself (NVML).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverInfo {
    /// `580.65.06`.
    pub version: String,
    /// The newest CUDA version the driver supports.
    pub cuda: CudaVersion,
}

/// What libtorch's side reports, gathered once (the inputs of [`diagnose`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchCuda {
    /// `libtorch_cuda.so` is loaded.
    pub linked: bool,
    /// cudart's version.
    pub runtime: Option<CudaVersion>,
    /// `cudaGetDeviceCount`.
    pub device_count: Result<usize, String>,
    /// The devices libtorch itself can use (`Cuda::device_count` when `Cuda::is_available`).
    pub torch_devices: usize,
}

impl TorchCuda {
    /// Reads this process's libtorch.
    pub fn read() -> Self {
        let torch_devices = if tch::Cuda::is_available() {
            usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
        } else {
            0
        };
        Self {
            linked: torch_cuda_linked(),
            runtime: runtime_version(),
            device_count: device_count(),
            torch_devices,
        }
    }

    /// Whether libtorch can run on a GPU here.
    pub fn usable(&self) -> bool {
        self.torch_devices > 0
    }
}

/// Why a host whose NVML sees GPUs cannot run CUDA with this libtorch; `None` when it can.
/// Only a libtorch that sees no device is diagnosed: versions explain a failure, they do not
/// predict one (CUDA's minor-version compatibility runs newer runtimes on older drivers).
pub fn diagnose(torch: &TorchCuda, driver: Option<&DriverInfo>) -> Option<String> {
    if torch.usable() {
        return None;
    }
    // An old driver explains everything else; cudart is loaded with libtorch_cpu, so its
    // version is known even when libtorch_cuda did not load.
    if let (Some(driver), Some(runtime)) = (driver, torch.runtime) {
        if driver.cuda < runtime {
            return Some(format!(
                "NVIDIA driver {} supports CUDA up to {}, but libtorch {LIBTORCH_VERSION} needs \
                 CUDA {runtime}{}: update the driver or restrict the endpoint to hosts that have it",
                driver.version,
                driver.cuda,
                if runtime.0 >= 13000 {
                    " (driver 580 or newer)"
                } else {
                    ""
                }
            ));
        }
    }
    if !torch.linked {
        let why = match cuda_load() {
            CudaLoad::Failed(message) => format!("libtorch_cuda.so did not load: {message}"),
            CudaLoad::NoDriver => "the NVIDIA driver's libcuda.so.1 cannot be opened (is the \
                                   container started with the GPU's driver libraries?)"
                .to_owned(),
            CudaLoad::Loaded | CudaLoad::NotTried => "libtorch_cuda is not loaded".to_owned(),
        };
        return Some(format!(
            "NVML sees a GPU but libtorch {LIBTORCH_VERSION} cannot use CUDA: {why}"
        ));
    }
    match &torch.device_count {
        Ok(_) => Some(format!(
            "NVML sees a GPU but libtorch {LIBTORCH_VERSION}'s CUDA runtime finds none"
        )),
        Err(reason) => Some(format!(
            "NVML sees a GPU but libtorch {LIBTORCH_VERSION}'s CUDA runtime cannot use it: \
             {reason}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver(version: &str, cuda: i32) -> DriverInfo {
        DriverInfo {
            version: version.into(),
            cuda: CudaVersion(cuda),
        }
    }

    #[test]
    fn an_old_driver_is_named_with_what_libtorch_needs() {
        let torch = TorchCuda {
            linked: true,
            runtime: Some(CudaVersion(13000)),
            device_count: Err("CUDA driver version is insufficient (cudaError 35)".into()),
            torch_devices: 0,
        };
        let why = diagnose(&torch, Some(&driver("535.104.05", 12020))).unwrap();
        assert!(
            why.contains("535.104.05") && why.contains("12.2") && why.contains("13.0"),
            "{why}"
        );
        assert!(why.contains("580"), "{why}");
    }

    #[test]
    fn missing_libtorch_cuda_is_named() {
        let torch = TorchCuda {
            linked: false,
            runtime: Some(CudaVersion(13000)),
            device_count: Ok(0),
            torch_devices: 0,
        };
        let why = diagnose(&torch, Some(&driver("580.65.06", 13000))).unwrap();
        assert!(why.contains("libtorch_cuda is not loaded"), "{why}");
    }

    #[test]
    fn a_new_enough_driver_with_a_failing_runtime_gives_the_runtime_error() {
        let torch = TorchCuda {
            linked: true,
            runtime: Some(CudaVersion(13000)),
            device_count: Err("no CUDA-capable device is detected (cudaError 100)".into()),
            torch_devices: 0,
        };
        let why = diagnose(&torch, Some(&driver("580.65.06", 13000))).unwrap();
        assert!(why.contains("no CUDA-capable device"), "{why}");
    }

    #[test]
    fn a_libtorch_that_sees_the_gpu_is_never_refused_for_its_versions() {
        // cudart 13.1 on a driver that says 13.0: minor-version compatibility runs it.
        let torch = TorchCuda {
            linked: true,
            runtime: Some(CudaVersion(13010)),
            device_count: Ok(1),
            torch_devices: 1,
        };
        assert_eq!(diagnose(&torch, Some(&driver("580.65.06", 13000))), None);
    }

    #[test]
    fn this_machine_reads_the_runtime_without_throwing() {
        // The wheel's cudart is loaded everywhere (libtorch_cpu needs it); without a GPU the
        // count is an error or zero, never a crash. (That `libtorch_cuda` is linked is checked
        // where build.rs links it: the worker binary and the integration tests.)
        let torch = TorchCuda::read();
        assert!(torch.runtime.is_some_and(|v| v.0 >= 12000), "{torch:?}");
        if !tch::Cuda::is_available() {
            assert!(!torch.usable());
            assert_eq!(pci_bus_id(0), None);
            assert_eq!(memory_info(0), None);
        }
        assert_eq!(CudaVersion(13000).to_string(), "13.0");
        assert_eq!(CudaVersion(12020).to_string(), "12.2");
    }
}
