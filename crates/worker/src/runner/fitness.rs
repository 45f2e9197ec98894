//! Start-up fitness checks, with the official SDK's variables (`rp_system_fitness.py`): enough
//! memory and disk, a driver new enough, and a small allocation that works on every GPU. They
//! run before the first take, so a host that cannot serve is replaced at once instead of failing
//! jobs; a failure is the SDK's unhealthy ping with `check` and `reason`, then exit 1.
//!
//! | variable | default | skips or sets |
//! |---|---|---|
//! | `RUNPOD_MIN_MEMORY_GB` | 4 | memory available (the container's limit counted) |
//! | `RUNPOD_MIN_DISK_PERCENT` | 10 | free space on `/` and on the spool's file system |
//! | `RUNPOD_MIN_CUDA_VERSION` | 11.8 | the CUDA version the driver supports |
//! | `RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true` | | skips memory, disk and CUDA version |
//! | `RUNPOD_SKIP_GPU_CHECK=true` | | skips the allocation on each GPU |
//! | `RUNPOD_INIT_TIMEOUT` | | seconds; the cold start (models and warm-up) gets the smaller of it and `[handler] timeout` |

use std::path::Path;
use std::time::{Duration, Instant};

use super::StartupError;
use crate::gpu::cuda_runtime::CudaVersion;
use crate::gpu::GpuProbe;

/// The limits the checks hold the host to, and which checks run.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitness {
    /// Memory that must be available, in GB (10⁹ bytes, as the SDK's float).
    pub min_memory_gb: f64,
    /// Free disk, in percent of the file system's size.
    pub min_disk_percent: f64,
    /// The lowest CUDA version the driver may support.
    pub min_cuda: CudaVersion,
    /// Run the memory, disk and CUDA version checks.
    pub system_checks: bool,
    /// Allocate on each GPU.
    pub gpu_check: bool,
    /// `RUNPOD_INIT_TIMEOUT`: a bound on the cold start besides `[handler] timeout`.
    pub init_timeout: Option<Duration>,
}

impl Default for Fitness {
    /// The SDK's defaults, every check on.
    fn default() -> Self {
        Self {
            min_memory_gb: 4.0,
            min_disk_percent: 10.0,
            min_cuda: CudaVersion(11080),
            system_checks: true,
            gpu_check: true,
            init_timeout: None,
        }
    }
}

impl Fitness {
    /// No check at all (tests, `local`, `gpu-check`: a developer's machine is what it is).
    pub fn skipped() -> Self {
        Self {
            system_checks: false,
            gpu_check: false,
            ..Self::default()
        }
    }

    /// The limits from the SDK's variables; a value that does not parse is a config error.
    pub fn from_env() -> Result<Self, StartupError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The limits from `var` (the environment, or a test's map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, StartupError> {
        let defaults = Self::default();
        let number = |name: &str, default: f64| -> Result<f64, StartupError> {
            match var(name) {
                None => Ok(default),
                Some(text) => text
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .ok_or_else(|| bad_variable(name, &text, "a number ≥ 0")),
            }
        };
        let flag = |name: &str| var(name).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let min_cuda = match var("RUNPOD_MIN_CUDA_VERSION") {
            None => defaults.min_cuda,
            Some(text) => parse_cuda_version(&text)
                .ok_or_else(|| bad_variable("RUNPOD_MIN_CUDA_VERSION", &text, "MAJOR.MINOR"))?,
        };
        let init_timeout = match var("RUNPOD_INIT_TIMEOUT") {
            None => None,
            Some(text) => Some(
                text.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s > 0)
                    .map(Duration::from_secs)
                    .ok_or_else(|| bad_variable("RUNPOD_INIT_TIMEOUT", &text, "seconds > 0"))?,
            ),
        };
        Ok(Self {
            min_memory_gb: number("RUNPOD_MIN_MEMORY_GB", defaults.min_memory_gb)?,
            min_disk_percent: number("RUNPOD_MIN_DISK_PERCENT", defaults.min_disk_percent)?,
            min_cuda,
            system_checks: !flag("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"),
            gpu_check: !flag("RUNPOD_SKIP_GPU_CHECK"),
            init_timeout,
        })
    }

    /// The cold-start budget: `[handler] timeout`, or `RUNPOD_INIT_TIMEOUT` when smaller.
    pub fn cold_start_budget(&self, handler_timeout: Duration) -> Duration {
        self.init_timeout
            .map_or(handler_timeout, |init| init.min(handler_timeout))
    }
}

fn bad_variable(name: &str, value: &str, wanted: &str) -> StartupError {
    let shown: String = value.chars().take(40).collect();
    StartupError {
        check: "config",
        reason: format!("{name} = {shown:?} is not {wanted}"),
    }
}

/// `"12.2"` → 12020, as NVML writes versions.
fn parse_cuda_version(text: &str) -> Option<CudaVersion> {
    let mut parts = text.trim().splitn(2, '.');
    let major: i32 = parts.next()?.parse().ok()?;
    let minor: i32 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
    (major > 0 && (0..100).contains(&minor)).then_some(CudaVersion(major * 1000 + minor * 10))
}

/// One check that passed: its name, what it found, how long it took.
#[derive(Debug, Clone)]
pub struct Passed {
    /// The check's name (the `check` of a failure).
    pub name: &'static str,
    /// What it measured.
    pub found: String,
    /// How long it took.
    pub took: Duration,
}

/// Runs the host checks (memory, disk, CUDA version) that do not need libtorch.
pub fn check_host(
    fitness: &Fitness,
    probe: &dyn GpuProbe,
    spool_dir: &Path,
) -> Result<Vec<Passed>, StartupError> {
    let mut passed = Vec::new();
    if !fitness.system_checks {
        return Ok(passed);
    }
    passed.push(timed("memory", || check_memory(fitness.min_memory_gb))?);
    passed.push(timed("disk", || {
        check_disk(Path::new("/"), fitness.min_disk_percent)
    })?);
    // The spool holds results that could not be delivered: it must be able to take one.
    if let Some(spool) = existing_ancestor(spool_dir) {
        passed.push(timed("spool_disk", || {
            check_disk(&spool, fitness.min_disk_percent)
        })?);
    }
    if let Some(driver) = probe.driver() {
        passed.push(timed("cuda_version", || {
            if driver.cuda < fitness.min_cuda {
                return Err(format!(
                    "the driver ({}) supports CUDA {}, below RUNPOD_MIN_CUDA_VERSION {}",
                    driver.version, driver.cuda, fitness.min_cuda
                ));
            }
            Ok(format!("CUDA {} ≥ {}", driver.cuda, fitness.min_cuda))
        })?);
    }
    Ok(passed)
}

/// Allocates and reads back a small tensor on each CUDA device: a card that NVML lists but
/// that cannot compute (ECC errors, a wedged context) fails here, not in the first job.
pub fn check_gpus(fitness: &Fitness) -> Result<Vec<Passed>, StartupError> {
    if !fitness.gpu_check {
        return Ok(Vec::new());
    }
    let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    (0..count)
        .map(|device| timed("gpu_allocation", || allocate_on(device)))
        .collect()
}

/// Elements in the check's tensor (1 MiB of f32).
const CHECK_ELEMENTS: i64 = 256 * 1024;

fn allocate_on(device: usize) -> Result<String, String> {
    let options = (tch::Kind::Float, tch::Device::Cuda(device));
    let sum = tch::Tensor::f_ones([CHECK_ELEMENTS], options)
        .and_then(|t| t.f_sum(tch::Kind::Float))
        .and_then(|s| s.f_double_value(&[]))
        .map_err(|e| {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default().to_owned();
            format!("GPU {device}: a 1 MiB allocation failed ({first})")
        })?;
    if sum != CHECK_ELEMENTS as f64 {
        return Err(format!(
            "GPU {device}: a sum of {CHECK_ELEMENTS} ones gave {sum}: the card computes wrongly"
        ));
    }
    Ok(format!("GPU {device}"))
}

fn timed(
    name: &'static str,
    check: impl FnOnce() -> Result<String, String>,
) -> Result<Passed, StartupError> {
    let started = Instant::now();
    match check() {
        Ok(found) => Ok(Passed {
            name,
            found,
            took: started.elapsed(),
        }),
        Err(reason) => Err(StartupError {
            check: name,
            reason,
        }),
    }
}

/// The log line of the checks that passed, with their timings.
pub fn summary(passed: &[Passed]) -> Option<String> {
    if passed.is_empty() {
        return None;
    }
    let total: Duration = passed.iter().map(|p| p.took).sum();
    let each: Vec<String> = passed
        .iter()
        .map(|p| format!("{} {} ({} ms)", p.name, p.found, p.took.as_millis()))
        .collect();
    Some(format!(
        "start-up checks passed in {} ms: {}",
        total.as_millis(),
        each.join(", ")
    ))
}

const GB: f64 = 1e9;

fn check_memory(min_gb: f64) -> Result<String, String> {
    let available = available_memory().ok_or("cannot read /proc/meminfo")?;
    let available_gb = available as f64 / GB;
    if available_gb < min_gb {
        return Err(format!(
            "{available_gb:.2} GB of memory available, RUNPOD_MIN_MEMORY_GB = {min_gb} required"
        ));
    }
    Ok(format!("{available_gb:.1} GB available"))
}

/// Memory available to this process: the kernel's `MemAvailable`, or less where a cgroup
/// (the container's memory limit) leaves less.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let host = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        * 1024;
    let read = |file: &str| {
        std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(file))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let in_cgroup = read("memory.max")
        .zip(read("memory.current"))
        .map(|(max, current)| max.saturating_sub(current));
    Some(in_cgroup.map_or(host, |c| c.min(host)))
}

fn check_disk(path: &Path, min_percent: f64) -> Result<String, String> {
    let (free, total) = disk_space(path)
        .ok_or_else(|| format!("cannot read the free space of {}", path.display()))?;
    let percent = if total == 0 {
        0.0
    } else {
        100.0 * free as f64 / total as f64
    };
    if percent < min_percent {
        return Err(format!(
            "{} has {:.2} GB free ({percent:.1}%), RUNPOD_MIN_DISK_PERCENT = {min_percent}% required",
            path.display(),
            free as f64 / GB
        ));
    }
    Ok(format!(
        "{} {:.1} GB free ({percent:.0}%)",
        path.display(),
        free as f64 / GB
    ))
}

/// Free (for an unprivileged user) and total bytes of the file system holding `path`.
fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let stat = rustix::fs::statvfs(path).ok()?;
    let unit = stat.f_frsize;
    Some((stat.f_bavail * unit, stat.f_blocks * unit))
}

/// `path`, or its nearest existing parent (the spool directory is created on first use).
fn existing_ancestor(path: &Path) -> Option<std::path::PathBuf> {
    let absolute = std::path::absolute(path).ok()?;
    absolute
        .ancestors()
        .find(|p| p.exists())
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Fitness, StartupError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Fitness::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn the_sdks_variables_set_the_limits_and_bad_values_are_config_errors() {
        assert_eq!(from(&[]).unwrap(), Fitness::default());
        let fitness = from(&[
            ("RUNPOD_MIN_MEMORY_GB", "8.5"),
            ("RUNPOD_MIN_DISK_PERCENT", "20"),
            ("RUNPOD_MIN_CUDA_VERSION", "12.2"),
            ("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "True"),
            ("RUNPOD_SKIP_GPU_CHECK", "false"),
            ("RUNPOD_INIT_TIMEOUT", "30"),
        ])
        .unwrap();
        assert_eq!(fitness.min_memory_gb, 8.5);
        assert_eq!(fitness.min_disk_percent, 20.0);
        assert_eq!(fitness.min_cuda, CudaVersion(12020));
        assert!(!fitness.system_checks && fitness.gpu_check);
        assert_eq!(
            fitness.cold_start_budget(Duration::from_secs(600)),
            Duration::from_secs(30)
        );
        assert_eq!(
            fitness.cold_start_budget(Duration::from_secs(10)),
            Duration::from_secs(10),
            "the smaller of the two"
        );
        for (name, value) in [
            ("RUNPOD_MIN_MEMORY_GB", "lots"),
            ("RUNPOD_MIN_DISK_PERCENT", "-1"),
            ("RUNPOD_MIN_CUDA_VERSION", "twelve"),
            ("RUNPOD_INIT_TIMEOUT", "0"),
        ] {
            let error = from(&[(name, value)]).unwrap_err();
            assert_eq!(error.check, "config");
            assert!(error.reason.contains(name), "{}", error.reason);
        }
    }

    #[test]
    fn cuda_versions_parse_as_nvml_writes_them() {
        assert_eq!(parse_cuda_version("11.8"), Some(CudaVersion(11080)));
        assert_eq!(parse_cuda_version("13"), Some(CudaVersion(13000)));
        assert_eq!(parse_cuda_version("12.x"), None);
        assert!(CudaVersion(12020) < CudaVersion(13000));
    }

    #[test]
    fn memory_and_disk_pass_with_no_minimum_and_fail_past_what_the_host_has() {
        let passed = check_memory(0.0).unwrap();
        assert!(passed.ends_with("GB available"), "{passed}");
        let failed = check_memory(1e9).unwrap_err();
        assert!(failed.contains("RUNPOD_MIN_MEMORY_GB"), "{failed}");

        assert!(check_disk(Path::new("/"), 0.0).is_ok());
        let failed = check_disk(Path::new("/"), 100.1).unwrap_err();
        assert!(failed.contains("RUNPOD_MIN_DISK_PERCENT"), "{failed}");
    }

    #[test]
    fn a_spool_directory_not_yet_created_is_checked_where_it_will_be() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("not/yet/spool");
        assert_eq!(existing_ancestor(&spool).unwrap(), dir.path());
    }
}
