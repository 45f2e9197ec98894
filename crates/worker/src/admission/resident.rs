//! The worker's own standing memory on each GPU: model weights, the CUDA context and what the
//! caching allocator keeps. It is booked in the device's ledger as `resident`, so jobs are
//! admitted only into what is left; a job's footprint is what it adds on top.
//!
//! Where it comes from:
//! - a real GPU whose NVML process list shows this process's pid: that figure (it is the whole
//!   truth: context, weights, pool);
//! - a real GPU inside a container whose pids NVML cannot match: libtorch's reserved bytes plus
//!   the CUDA context, measured once as the rise of NVML's used memory across CUDA's
//!   initialisation on the device;
//! - a simulated GPU: what the handlers declare with `model_memory`.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use crate::config::{Config, DeviceChoice};
use crate::gpu::allocator::{self, AllocatorStats};
use crate::gpu::{DeviceReading, GpuProbe};

/// How a resident figure was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidentSource {
    /// NVML's per-process figure for this pid.
    NvmlProcess,
    /// libtorch's reserved bytes plus the measured CUDA context.
    AllocatorAndContext,
    /// `model_memory` of the handlers (simulated GPU).
    Declared,
}

impl ResidentSource {
    /// For `/health` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NvmlProcess => "nvml_process",
            Self::AllocatorAndContext => "allocator_and_context",
            Self::Declared => "declared",
        }
    }
}

/// One measurement of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidentReading {
    /// Bytes this process holds on the device outside job reservations.
    pub bytes: u64,
    /// Where the figure comes from.
    pub source: ResidentSource,
}

/// What this process holds on a real device now (call it when no job runs there).
pub fn measure(
    reading: &DeviceReading,
    allocator: Option<AllocatorStats>,
    context_bytes: u64,
) -> ResidentReading {
    let pid = std::process::id();
    match reading.process_used.iter().find(|(p, _)| *p == pid) {
        Some((_, bytes)) => ResidentReading {
            bytes: *bytes,
            source: ResidentSource::NvmlProcess,
        },
        None => ResidentReading {
            bytes: allocator.map_or(0, |a| a.reserved) + context_bytes,
            source: ResidentSource::AllocatorAndContext,
        },
    }
}

/// Inside a container (NVML lists host pids, none of them ours), this process's CUDA context
/// on an idle device, where NVML lists one process only: that one is this process (it holds a
/// context there), and what it uses beyond libtorch's reserved bytes is the context.
pub fn context_of_lone_process(
    reading: &DeviceReading,
    allocator: Option<AllocatorStats>,
) -> Option<u64> {
    let pid = std::process::id();
    match reading.process_used.as_slice() {
        [(listed, bytes)] if *listed != pid => {
            Some(bytes.saturating_sub(allocator.map_or(0, |a| a.reserved)))
        }
        _ => None,
    }
}

/// The CUDA context's size on a device: the rise of NVML's used memory across CUDA's
/// initialisation there, less what the allocator reserved meanwhile.
pub fn context_bytes(used_before: u64, used_after: u64, allocator_reserved: u64) -> u64 {
    used_after
        .saturating_sub(used_before)
        .saturating_sub(allocator_reserved)
}

/// The contexts measured so far in this process (by UUID): a context is created once per
/// process and device, so a second worker in the same process reuses the first figure.
static CONTEXTS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Initialises CUDA on every device the probe sees and measures each context (by UUID).
/// Blocking; call it before any model is loaded, on a real GPU.
pub fn measure_contexts(probe: &dyn GpuProbe) -> BTreeMap<String, u64> {
    let mut known = CONTEXTS.lock().unwrap_or_else(PoisonError::into_inner);
    let before = probe.read();
    let new: Vec<&DeviceReading> = before
        .iter()
        .filter(|d| !known.contains_key(&d.uuid))
        .collect();
    for device in &new {
        let options = (tch::Kind::Float, tch::Device::Cuda(device.index));
        if let Err(e) = tch::Tensor::f_zeros([1], options) {
            tracing::warn!("GPU {}: CUDA initialisation failed ({e})", device.index);
        }
    }
    if !new.is_empty() {
        let after = probe.read();
        for b in new {
            let Some(a) = after.iter().find(|a| a.uuid == b.uuid) else {
                continue;
            };
            let reserved = allocator::stats(b.index).map_or(0, |s| s.reserved);
            known.insert(b.uuid.clone(), context_bytes(b.used, a.used, reserved));
        }
    }
    before
        .iter()
        .filter_map(|d| Some((d.uuid.clone(), *known.get(&d.uuid)?)))
        .collect()
}

/// What a CUDA context with libtorch's kernels and the allocator's first pool typically hold,
/// for planning without a GPU: on an H100 (torch 2.11, driver 580) a worker serving the 45 MB
/// fp16 MiniLM measured 801 MB resident after loading, so about 750 MB besides the model.
pub const CUDA_CONTEXT_ESTIMATE: u64 = 750_000_000;

/// The resident memory planned for a GPU the worker is not running on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Estimate {
    /// Bytes: declared `model_memory`, model files, and (real GPUs) the CUDA context.
    pub bytes: u64,
    /// Model files that would be loaded on the GPU but are not here (their size is unknown).
    pub missing: Vec<std::path::PathBuf>,
    /// How the figure was made, for the plan.
    pub parts: Vec<String>,
}

/// Plans the resident memory: each GPU handler's declared `model_memory`, else the size of its
/// model files (each file once: extract and classify share MiniLM), plus the CUDA context on a
/// real GPU. Missing files are listed, not an error: a plan for another machine need not have
/// them.
pub fn estimate(config: &Config, real_gpu: bool) -> Estimate {
    let mut estimate = Estimate::default();
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    let dir = &config.handler.model_dir;
    for (name, handler) in &config.handlers {
        if handler.device != DeviceChoice::Cuda {
            continue;
        }
        if let Some(declared) = handler.model_memory {
            estimate.bytes += declared.bytes();
            estimate
                .parts
                .push(format!("{name}: {declared} declared (model_memory)"));
            continue;
        }
        let mut own = Vec::new();
        if matches!(handler.kind(name), "extract" | "classify") {
            own.push(dir.join("minilm.pt"));
        }
        if let Some(model) = &handler.model {
            own.push(dir.join(model));
        }
        files.extend(
            own.into_iter()
                .filter(|f| !files.contains(f))
                .collect::<Vec<_>>(),
        );
    }
    for file in files {
        match std::fs::metadata(&file) {
            Ok(meta) => {
                estimate.bytes += meta.len();
                estimate.parts.push(format!(
                    "{}: {} (file size)",
                    file.display(),
                    crate::config::Size::from_bytes(meta.len()).approx()
                ));
            }
            Err(_) => estimate.missing.push(file),
        }
    }
    let any_gpu_handler = config
        .handlers
        .values()
        .any(|h| h.device == DeviceChoice::Cuda);
    if real_gpu && any_gpu_handler {
        estimate.bytes += CUDA_CONTEXT_ESTIMATE;
        estimate.parts.push(format!(
            "CUDA context: {} (typical)",
            crate::config::Size::from_bytes(CUDA_CONTEXT_ESTIMATE).approx()
        ));
    }
    estimate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_process_figure_wins_where_the_pid_matches() {
        let mut reading = DeviceReading {
            process_used: vec![(1, 5), (std::process::id(), 700)],
            ..DeviceReading::default()
        };
        let stats = AllocatorStats {
            reserved: 400,
            ..AllocatorStats::default()
        };
        assert_eq!(
            measure(&reading, Some(stats), 300),
            ResidentReading {
                bytes: 700,
                source: ResidentSource::NvmlProcess
            }
        );
        reading.process_used = vec![(1, 5)];
        assert_eq!(
            measure(&reading, Some(stats), 300),
            ResidentReading {
                bytes: 700,
                source: ResidentSource::AllocatorAndContext
            },
            "host pids in a container: reserved + context"
        );
    }

    #[test]
    fn the_context_is_the_rise_in_used_memory_less_the_allocator() {
        assert_eq!(context_bytes(1000, 1600, 100), 500);
        assert_eq!(
            context_bytes(1000, 900, 100),
            0,
            "others released memory meanwhile"
        );
    }

    #[test]
    fn the_estimate_counts_shared_model_files_once_and_declared_sizes_instead_of_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("minilm.pt"), vec![0u8; 1000]).unwrap();
        let mut config = Config::from_toml(
            r#"
            [handlers.classify]
            max_concurrency = 1
            device = "cuda"
            [handlers.extract]
            max_concurrency = 1
            device = "cuda"
            [handlers.mine]
            kind = "torchscript"
            model = "mine.pt"
            inputs = ["x"]
            max_concurrency = 1
            device = "cuda"
            "#,
        )
        .unwrap();
        config.handler.model_dir = dir.path().to_path_buf();
        let plan = estimate(&config, false);
        assert_eq!(plan.bytes, 1000, "MiniLM once for classify and extract");
        assert_eq!(plan.missing, vec![dir.path().join("mine.pt")]);
        config.handlers.get_mut("mine").unwrap().model_memory = Some("2MB".parse().unwrap());
        let plan = estimate(&config, true);
        assert_eq!(plan.bytes, 1000 + 2_000_000 + CUDA_CONTEXT_ESTIMATE);
        assert!(plan.missing.is_empty());
    }

    #[test]
    fn declared_resident_memory_counts_gpu_handlers_only() {
        let config = Config::from_toml(
            r#"
            [handlers.classify]
            max_concurrency = 1
            device = "cuda"
            model_memory = "14GB"
            [handlers.extract]
            max_concurrency = 4
            device = "cpu"
            "#,
        )
        .unwrap();
        assert_eq!(config.declared_model_memory(), 14_000_000_000);
    }
}
