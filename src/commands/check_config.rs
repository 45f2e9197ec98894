//! `check-config`: validates `runpod.toml` and prints the capacity plan: which handlers run how
//! many jobs at once on the detected GPU, or on a GPU of `--gpu-memory`, after the models'
//! resident memory. It refuses what `serve` would refuse: a GPU libtorch cannot use, devices
//! that cannot be mapped, models that leave no room for one job.

use std::fmt::Write as _;
use std::path::Path;

use worker::admission::resident;
use worker::config::{validate_budget, Config, ConfigSource, DeviceChoice, Size};
use worker::gpu::{self, GpuAccess};
use worker::handlers::HandlerSet;
use worker::queue::Spool;

/// The GPU a plan is made for.
pub struct PlannedGpu {
    /// Its name, or how it was given.
    pub name: String,
    /// Its total memory.
    pub total: Size,
    /// The resident memory planned on it.
    pub resident: resident::Estimate,
    /// How many such GPUs (the worker loads its models on each).
    pub count: usize,
}

/// Validates and prints; exit code 1 if the config is refused. Loads the handlers' models and
/// asks libtorch about CUDA, as `serve` would (the plan for another GPU, `--gpu-memory`, is
/// [`check_plan`], which needs no libtorch).
pub fn check_config(config_path: Option<&Path>) -> i32 {
    let Some((config, origin)) = load(config_path) else {
        return 1;
    };
    let gpu = match detected_gpu(&config) {
        Ok(gpu) => gpu,
        Err(message) => {
            eprintln!("{message}");
            return 1;
        }
    };
    if !refuse_what_serve_refuses(&config, gpu.as_ref()) {
        return 1;
    }
    // What `serve` does next: load every handler's models (a missing file, a TorchScript file
    // libtorch refuses).
    let simulated = config.gpu.simulate.is_some();
    if let Err(e) = HandlerSet::build(&config, gpu.is_some(), simulated) {
        eprintln!("serve would not start: {e}");
        return 1;
    }
    println!("config OK: {origin}");
    println!(
        "{}",
        config.model_location.describe(&config.handler.model_dir)
    );
    match worker::torch_check::run() {
        Ok(report) => println!(
            "libtorch {}: CUDA {} ({} device(s))",
            gpu::cuda_runtime::LIBTORCH_VERSION,
            if report.cuda_available {
                "available"
            } else {
                "not available"
            },
            report.cuda_devices
        ),
        Err(e) => println!("libtorch self-check failed: {e}"),
    }
    print!("{}", capacity_plan(&config, gpu.as_ref()));
    0
}

/// `check-config --gpu-memory`: the plan for `gpus` GPUs of that size, which this machine need
/// not have. No model is loaded and libtorch is never asked, so this runs without libtorch.
pub fn check_plan(config_path: Option<&Path>, gpu_memory: &str, gpus: usize) -> i32 {
    let Some((config, origin)) = load(config_path) else {
        return 1;
    };
    let gpu = match planned_gpu(&config, gpu_memory, gpus) {
        Ok(gpu) => gpu,
        Err(message) => {
            eprintln!("{message}");
            return 1;
        }
    };
    if !refuse_what_serve_refuses(&config, Some(&gpu)) {
        return 1;
    }
    println!("config OK: {origin}");
    // A plan for another machine: the model may be cached there, not here.
    println!(
        "{}",
        config.model_location.describe(&config.handler.model_dir)
    );
    print!("{}", capacity_plan(&config, Some(&gpu)));
    0
}

/// The config and where it came from, or `None` after printing why it is refused.
fn load(config_path: Option<&Path>) -> Option<(Config, String)> {
    match Config::load(config_path) {
        Ok((config, source)) => {
            let origin = match source {
                ConfigSource::File(path) => path.display().to_string(),
                ConfigSource::Defaults => "built-in defaults (no runpod.toml found)".to_owned(),
            };
            Some((config, origin))
        }
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}

/// The budget's and the spool's checks, as `serve` makes them; false after printing why.
fn refuse_what_serve_refuses(config: &Config, gpu: Option<&PlannedGpu>) -> bool {
    if let Some(gpu) = gpu {
        if let Err(e) = validate_budget(config, gpu.total, gpu.resident.bytes) {
            eprintln!("{e}");
            return false;
        }
    }
    if let Err(e) = Spool::new(config.queue.spool_dir.clone()).check_writable() {
        eprintln!("serve would not start: {e}");
        return false;
    }
    true
}

/// A GPU of `--gpu-memory` (a GPU this machine need not have). `Err` is the message to print.
fn planned_gpu(config: &Config, text: &str, gpus: usize) -> Result<PlannedGpu, String> {
    let size = text
        .parse::<Size>()
        .map_err(|e| format!("--gpu-memory: {e}"))?;
    if gpus == 0 {
        return Err("--gpus: plan for at least one GPU".to_owned());
    }
    Ok(PlannedGpu {
        name: format!("a {size} GPU (--gpu-memory)"),
        total: size,
        resident: resident::estimate(config, true),
        count: gpus,
    })
}

/// The detected GPU, checked as `serve` checks it. `Err` is the message to print.
fn detected_gpu(config: &Config) -> Result<Option<PlannedGpu>, String> {
    let gpu::FoundGpu {
        probe: _,
        devices,
        access,
    } = gpu::find(&config.gpu).map_err(|e| format!("serve would not start: {e}"))?;
    if let GpuAccess::Broken(why) = &access {
        return Err(format!(
            "serve would not start: {why} (local and test-input run the CUDA handlers on the \
             CPU, degraded)"
        ));
    }
    let resident = if access == GpuAccess::Simulated {
        let declared = config.declared_model_memory();
        resident::Estimate {
            bytes: declared,
            parts: vec![format!(
                "{} declared (model_memory)",
                Size::from_bytes(declared)
            )],
            ..resident::Estimate::default()
        }
    } else {
        resident::estimate(config, true)
    };
    Ok(devices.first().map(|g| PlannedGpu {
        name: g.name.clone(),
        total: Size::from_bytes(g.total),
        resident,
        count: devices.len(),
    }))
}

/// The plan as text: per handler, its device, reservation, and how many run at once beside
/// the models' resident memory.
pub fn capacity_plan(config: &Config, gpu: Option<&PlannedGpu>) -> String {
    let mut out = String::new();
    let budget = gpu.map(|g| g.total.bytes().saturating_sub(config.gpu.headroom.bytes()));
    let resident = gpu.map_or(0, |g| g.resident.bytes);
    let for_jobs = budget.map(|b| b.saturating_sub(resident));
    match gpu {
        Some(gpu) => {
            let _ = writeln!(
                out,
                "GPU: {}{}, {} total ({:.1} GiB), headroom {}, budget {}",
                if gpu.count > 1 {
                    format!("{} x ", gpu.count)
                } else {
                    String::new()
                },
                gpu.name,
                gpu.total,
                gpu.total.gib(),
                config.gpu.headroom,
                Size::from_bytes(budget.unwrap_or(0)).approx()
            );
            let _ = writeln!(
                out,
                "resident (models and CUDA context, estimated): {}; left for jobs: {}",
                Size::from_bytes(resident).approx(),
                Size::from_bytes(for_jobs.unwrap_or(0)).approx()
            );
            for part in &gpu.resident.parts {
                let _ = writeln!(out, "  {part}");
            }
            for missing in &gpu.resident.missing {
                let _ = writeln!(
                    out,
                    "  {}: not here, size unknown (declare the handler's model_memory)",
                    missing.display()
                );
            }
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
        "{:<12} {:<12} {:<6} {:>8} {:>14} {:>10} {:>9}",
        "handler", "kind", "device", "limit", "GPU mem/job", "at once", "per pass"
    );
    let mut gpu_at_full_load = 0u64;
    let mut batched_on_gpu = Vec::new();
    for (name, handler) in &config.handlers {
        let on_gpu = gpu.is_some() && handler.device == DeviceChoice::Cuda;
        let reservation = handler.reservation(&config.handler, on_gpu);
        let limit = u64::from(handler.max_concurrency.min(config.handler.max_concurrency));
        let bytes = reservation.within(for_jobs.unwrap_or(0));
        let gpus = gpu.map_or(1, |g| g.count as u64);
        let fits = |devices: u64| match for_jobs {
            Some(room) if bytes > 0 => limit.min(room / bytes * devices),
            _ => limit,
        };
        // A batched handler's jobs hold no GPU memory: all run at once, and memory bounds
        // how many of them one forward pass on one GPU holds (until bytes per token are
        // learned).
        let batched = handler.is_batched(name);
        let (at_once, per_pass) = if batched && on_gpu {
            let per_pass = fits(1);
            batched_on_gpu.push((name.clone(), reservation, per_pass));
            gpu_at_full_load += per_pass * gpus * bytes;
            (limit, per_pass.to_string())
        } else {
            gpu_at_full_load += fits(gpus) * bytes;
            (fits(gpus), "-".to_owned())
        };
        let device = match (handler.device, on_gpu) {
            (DeviceChoice::Cpu, _) => "cpu",
            (DeviceChoice::Cuda, true) => "cuda",
            (DeviceChoice::Cuda, false) => "cpu*",
        };
        let memory = match (reservation.bytes(), reservation.is_whole_budget()) {
            (0, _) => "-".to_owned(),
            (_, true) if bytes > 0 => format!("all ({})", Size::from_bytes(bytes).approx()),
            _ => reservation.to_string(),
        };
        let _ = writeln!(
            out,
            "{name:<12} {:<12} {device:<6} {:>8} {memory:>14} {at_once:>10} {per_pass:>9}",
            handler.kind(name),
            handler.max_concurrency
        );
    }
    let batching = &config.batching;
    let _ = writeln!(
        out,
        "\nbatching: up to {} rows and {} padded tokens per forward pass on a GPU ({} on the CPU), {}",
        batching.max_batch_rows,
        batching.tokens_for(true),
        batching.tokens_for(false),
        match batching.max_batch_delay_us {
            0 => "no wait for more rows".to_owned(),
            us => format!("waiting up to {us} µs for more rows"),
        }
    );
    for (name, reservation, per_pass) in batched_on_gpu {
        let _ = writeln!(
            out,
            "  {name}: its jobs hold no GPU memory while they wait; a pass books {reservation} per \
             job in it until bytes per padded token are learned: at most {per_pass} job(s) a pass per GPU"
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
    if let Some(room) = for_jobs {
        // Left for jobs on every GPU together.
        let room = room * gpu.map_or(1, |g| g.count as u64);
        let _ = writeln!(
            out,
            "\nAt full load the GPU handlers reserve {} of the {} left for jobs{}",
            Size::from_bytes(gpu_at_full_load).approx(),
            Size::from_bytes(room).approx(),
            if gpu_at_full_load > room {
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

    fn card(name: &str, total: Size, resident: u64) -> PlannedGpu {
        PlannedGpu {
            name: name.into(),
            total,
            resident: resident::Estimate {
                bytes: resident,
                ..resident::Estimate::default()
            },
            count: 1,
        }
    }

    #[test]
    fn plan_for_the_seed_profile_on_a_24gb_card() {
        let plan = capacity_plan(&Config::default(), Some(&card("RTX 4090", Size::gb(24), 0)));
        assert!(plan.contains("budget"), "{plan}");
        let columns = |handler: &str| -> Vec<String> {
            let line = plan.lines().find(|l| l.starts_with(handler)).unwrap();
            line.split_whitespace().map(str::to_owned).collect()
        };
        // Batched: all 32 at once; a pass holds 3 jobs' declared 6GB of the 22.9GB left.
        let classify = columns("classify");
        assert_eq!(classify[2..], ["cuda", "32", "6GB", "32", "3"], "{plan}");
        assert_eq!(
            columns("extract")[2..],
            ["cpu", "32", "-", "32", "-"],
            "{plan}"
        );
        assert!(
            plan.contains("batching: up to 64 rows and 16384 padded tokens"),
            "{plan}"
        );
    }

    #[test]
    fn memory_bounds_how_many_batched_gpu_jobs_one_pass_holds() {
        let mut config = Config::default();
        config.handlers.get_mut("classify").unwrap().max_concurrency = 4;
        let plan = capacity_plan(&config, Some(&card("small", Size::gb(13), 0)));
        // budget = 13GB - 1GiB ≈ 11.9GB: one 6GB job fits, not two.
        let classify = plan.lines().find(|l| l.starts_with("classify")).unwrap();
        assert!(classify.trim_end().ends_with('1'), "{classify}");
    }

    #[test]
    fn the_seeds_14gb_classifier_leaves_room_for_one_6gb_job_on_a_24gb_card_not_three() {
        let mut config = Config::default();
        config.handlers.get_mut("classify").unwrap().max_concurrency = 4;
        let without = capacity_plan(&config, Some(&card("RTX 4090", Size::gb(24), 0)));
        let with = capacity_plan(
            &config,
            Some(&card("RTX 4090", Size::gb(24), 14_000_000_000)),
        );
        let at_once = |plan: &str| {
            let line = plan.lines().find(|l| l.starts_with("classify")).unwrap();
            line.split_whitespace().last().unwrap().to_owned()
        };
        assert_eq!(at_once(&without), "3", "{without}");
        assert_eq!(at_once(&with), "1", "{with}");
        assert!(
            with.contains("resident (models and CUDA context, estimated): 14.0GB"),
            "{with}"
        );
        assert!(
            validate_budget(&config, Size::gb(24), 20_000_000_000).is_err(),
            "20GB of models leave no room for one 6GB job"
        );
    }
}
