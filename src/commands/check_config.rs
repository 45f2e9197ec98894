//! `check-config`: validates `runpod.toml` and prints the capacity plan: which handlers run how
//! many jobs at once on the detected GPU, or on a GPU of `--gpu-memory`.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{validate_budget, Config, ConfigSource, DeviceChoice, Size};
use crate::gpu;

/// Validates and prints; exit code 1 if the config is refused.
pub fn check_config(config_path: Option<&Path>, gpu_memory: Option<&str>) -> i32 {
    let (config, source) = match Config::load(config_path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let gpu = match gpu_memory {
        Some(text) => match text.parse::<Size>() {
            Ok(size) => Some((format!("a {size} GPU (--gpu-memory)"), size)),
            Err(e) => {
                eprintln!("--gpu-memory: {e}");
                return 1;
            }
        },
        None => gpu::detect(&config.gpu)
            .snapshot()
            .map(|g| (g.name.clone(), Size::from_bytes(g.total))),
    };
    if let Some((_, total)) = &gpu {
        if let Err(e) = validate_budget(&config, *total) {
            eprintln!("{e}");
            return 1;
        }
    }
    let origin = match source {
        ConfigSource::File(path) => path.display().to_string(),
        ConfigSource::Defaults => "built-in defaults (no runpod.toml found)".to_owned(),
    };
    println!("config OK: {origin}");
    match crate::torch_check::run() {
        Ok(report) => println!(
            "libtorch 2.11.0: CUDA {} ({} device(s))",
            if report.cuda_available {
                "available"
            } else {
                "not available"
            },
            report.cuda_devices
        ),
        Err(e) => println!("libtorch self-check failed: {e}"),
    }
    print!(
        "{}",
        capacity_plan(&config, gpu.as_ref().map(|(n, s)| (n.as_str(), *s)))
    );
    0
}

/// The plan as text: per handler, its device, reservation, and how many run at once.
pub fn capacity_plan(config: &Config, gpu: Option<(&str, Size)>) -> String {
    let mut out = String::new();
    let budget = gpu.map(|(_, total)| total.bytes().saturating_sub(config.gpu.headroom.bytes()));
    match gpu {
        Some((name, total)) => {
            let _ = writeln!(
                out,
                "GPU: {name}, {total} total ({:.1} GiB), headroom {}, budget {}",
                total.gib(),
                config.gpu.headroom,
                Size::from_bytes(budget.unwrap_or(0))
            );
        }
        None => {
            let _ = writeln!(
                out,
                "GPU: none detected (plan for one with --gpu-memory 24GB)"
            );
        }
    }
    let _ = writeln!(
        out,
        "worker: at most {} job(s) at once\n",
        config.handler.max_concurrency
    );
    let _ = writeln!(
        out,
        "{:<12} {:<12} {:<6} {:>8} {:>12} {:>10}",
        "handler", "kind", "device", "limit", "GPU mem/job", "at once"
    );
    let mut gpu_at_full_load = 0u64;
    for (name, handler) in &config.handlers {
        let on_gpu = gpu.is_some() && handler.device == DeviceChoice::Cuda;
        let reservation = handler.reservation(&config.handler, on_gpu);
        let limit = u64::from(handler.max_concurrency.min(config.handler.max_concurrency));
        let at_once = match budget {
            Some(budget) if reservation.bytes() > 0 => limit.min(budget / reservation.bytes()),
            _ => limit,
        };
        gpu_at_full_load += at_once * reservation.bytes();
        let device = match (handler.device, on_gpu) {
            (DeviceChoice::Cpu, _) => "cpu",
            (DeviceChoice::Cuda, true) => "cuda",
            (DeviceChoice::Cuda, false) => "cpu*",
        };
        let memory = if reservation.bytes() == 0 {
            "-".to_owned()
        } else {
            reservation.to_string()
        };
        let _ = writeln!(
            out,
            "{name:<12} {:<12} {device:<6} {:>8} {memory:>12} {at_once:>10}",
            handler.kind(name),
            handler.max_concurrency
        );
    }
    if config
        .handlers
        .values()
        .any(|h| h.device == DeviceChoice::Cuda)
        && gpu.is_none()
    {
        let _ = writeln!(
            out,
            "\n* asks for CUDA; without a GPU it runs on the CPU (reported as degraded)"
        );
    }
    if let Some(budget) = budget {
        let _ = writeln!(
            out,
            "\nAt full load the GPU handlers reserve {} of the {} budget{}",
            Size::from_bytes(gpu_at_full_load),
            Size::from_bytes(budget),
            if gpu_at_full_load > budget {
                ": jobs beyond it wait for memory"
            } else {
                ""
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_for_the_seed_profile_on_a_24gb_card() {
        let plan = capacity_plan(&Config::default(), Some(("RTX 4090", Size::gb(24))));
        assert!(plan.contains("budget"), "{plan}");
        let classify = plan.lines().find(|l| l.starts_with("classify")).unwrap();
        assert!(
            classify.contains("cuda")
                && classify.contains("6GB")
                && classify.trim_end().ends_with('1'),
            "{classify}"
        );
        let extract = plan.lines().find(|l| l.starts_with("extract")).unwrap();
        assert!(
            extract.contains("cpu") && extract.trim_end().ends_with('4'),
            "{extract}"
        );
    }

    #[test]
    fn memory_bounds_how_many_gpu_jobs_run_at_once() {
        let mut config = Config::default();
        config.handlers.get_mut("classify").unwrap().max_concurrency = 4;
        let plan = capacity_plan(&config, Some(("small", Size::gb(13))));
        // budget = 13GB - 1GiB ≈ 11.9GB: one 6GB job fits, not two.
        let classify = plan.lines().find(|l| l.starts_with("classify")).unwrap();
        assert!(classify.trim_end().ends_with('1'), "{classify}");
    }
}
