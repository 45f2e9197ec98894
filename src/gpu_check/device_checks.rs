//! Device identity (NVML against libtorch), allocator statistics, the booked resident memory,
//! and classify/extract on the GPU against the same model on the CPU.

use serde_json::{json, Value};

use super::harness::{self, Answer, Harness};
use super::{gib, Ctx, Table, Verdict};
use worker::config::{Config, DeviceChoice, HandlerConfig};
use worker::gpu::{self, cuda_runtime};

/// Labels and texts whose label is obvious.
pub(super) const LABELS: [&str; 5] = ["invoice", "recipe", "poem", "contract", "resume"];
const TEXTS: [&str; 5] = [
    "Invoice number 4471: amount due 1,250 USD for consulting services, payable within 30 days.",
    "Preheat the oven to 180 degrees, whisk two eggs with sugar, fold in the flour and bake.",
    "The autumn wind whispers through the silver trees, and the moon sings softly to the sea.",
    "This agreement is entered into by the parties, who agree to the terms and obligations herein.",
    "Senior software engineer with ten years of experience in Rust, Python and distributed systems.",
];

/// A config serving classify and extract on `device`.
pub(super) fn model_config(ctx: &Ctx, device: DeviceChoice) -> Config {
    let mut config = ctx.base.clone();
    config.handler.max_concurrency = 8;
    config.handlers.clear();
    let on_gpu = device == DeviceChoice::Cuda;
    for name in ["classify", "extract"] {
        config.handlers.insert(
            name.to_owned(),
            HandlerConfig {
                kind: Some(name.to_owned()),
                max_concurrency: 4,
                device,
                gpu_memory: on_gpu.then(|| "1GB".parse().unwrap_or_default()),
                // A simulated GPU books what is declared; a real one measures it.
                model_memory: (on_gpu && name == "classify" && ctx.simulated)
                    .then(|| "100MB".parse().unwrap_or_default()),
                ..HandlerConfig::default()
            },
        );
    }
    config
}

/// Runs the device rows, then the model rows on a GPU worker and a CPU worker.
pub(super) async fn run(ctx: &Ctx, table: &mut Table) {
    devices(ctx, table);
    let Ok(mock) = harness::mock_queue().await else {
        table.add(
            "classify and extract workers",
            "no mock queue",
            Verdict::Fail,
        );
        return;
    };
    let gpu = match Harness::start(mock.clone(), model_config(ctx, DeviceChoice::Cuda)).await {
        Ok(worker) => worker,
        Err(e) => {
            table.add("worker starts on the GPU", e, Verdict::Fail);
            return;
        }
    };
    let health = gpu.health().await;
    allocator(ctx, &health, table);
    resident(ctx, &health, table);
    match Harness::start(mock, model_config(ctx, DeviceChoice::Cpu)).await {
        Ok(cpu) => {
            same_labels(ctx, &gpu, &cpu, table).await;
            same_embeddings(ctx, &gpu, &cpu, table).await;
            cpu.stop().await;
        }
        Err(e) => table.add("worker starts on the CPU", e, Verdict::Fail),
    }
    gpu.stop().await;
}

fn devices(ctx: &Ctx, table: &mut Table) {
    if ctx.simulated {
        table.add(
            "NVML = libtorch devices",
            "simulated GPU: no NVML or CUDA to compare",
            Verdict::Skip,
        );
        return;
    }
    let Ok(probe) = gpu::detect(&ctx.base.gpu) else {
        return;
    };
    for device in probe.read() {
        let cuda_total = cuda_runtime::memory_info(device.index).map(|(_, total)| total);
        let cuda_pci = cuda_runtime::pci_bus_id(device.index);
        let show = |pci: Option<gpu::identity::PciBusId>| {
            pci.map_or_else(|| "?".to_owned(), |p| p.to_string())
        };
        // NVML counts memory the driver reserves for itself; CUDA does not: within 3%.
        let totals_agree =
            cuda_total.is_some_and(|t| t.abs_diff(device.total) * 100 <= 3 * device.total);
        let same_card = cuda_pci.is_some() && cuda_pci == device.pci_bus_id;
        table.add(
            "NVML = libtorch devices",
            format!(
                "CUDA {} = NVML {} {} {}: PCI {} (NVML) / {} (CUDA); total {} (NVML) / {} (CUDA)",
                device.index,
                device
                    .nvml_index
                    .map_or_else(|| "?".to_owned(), |i| i.to_string()),
                device.name,
                device.uuid,
                show(device.pci_bus_id),
                show(cuda_pci),
                gib(device.total),
                cuda_total.map_or_else(|| "unreadable".to_owned(), gib),
            ),
            Verdict::of(totals_agree && same_card),
        );
    }
}

fn allocator(ctx: &Ctx, health: &Value, table: &mut Table) {
    if ctx.simulated {
        table.add(
            "allocator statistics",
            "simulated GPU: libtorch has no CUDA allocator here",
            Verdict::Skip,
        );
        return;
    }
    let allocated = health["allocated_vram_gb"].as_f64().unwrap_or(0.0);
    let reserved = health["reserved_vram_gb"].as_f64().unwrap_or(0.0);
    table.add(
        "allocator statistics",
        format!("after MiniLM loads: allocated {allocated:.2} GiB, reserved {reserved:.2} GiB"),
        Verdict::of(allocated > 0.0 && reserved >= allocated),
    );
}

fn resident(ctx: &Ctx, health: &Value, table: &mut Table) {
    let device = &health["gpus"][0];
    let booked = device["resident_gb"].as_f64().unwrap_or(0.0);
    let source = device["resident_source"].as_str().unwrap_or("none");
    if ctx.simulated {
        table.add(
            "resident memory booked",
            format!("{booked:.2} GiB booked ({source}: classify's model_memory = 100MB)"),
            Verdict::of((booked - 0.09).abs() < 0.01 && source == "declared"),
        );
        return;
    }
    let pid = std::process::id();
    let nvml = gpu::detect(&ctx.base.gpu).ok().and_then(|probe| {
        probe
            .read()
            .first()?
            .process_used
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, bytes)| *bytes)
    });
    let nvml_text = nvml.map_or_else(
        || "NVML lists no figure for this pid (container)".to_owned(),
        |b| format!("NVML for pid {pid} now: {}", gib(b)),
    );
    table.add(
        "resident memory booked",
        format!("{booked:.2} GiB booked ({source}); {nvml_text}"),
        Verdict::of(booked > 0.0),
    );
}

async fn same_labels(ctx: &Ctx, gpu: &Harness, cpu: &Harness, table: &mut Table) {
    let mut equal = 0;
    let mut right = 0;
    let mut max_delta = 0.0f64;
    let mut failures = Vec::new();
    for (i, text) in TEXTS.iter().enumerate() {
        let input = json!({ "task": "classify", "text": text, "labels": LABELS });
        let (a, b) = (
            gpu.run(&format!("classify-gpu-{i}"), input.clone()).await,
            cpu.run(&format!("classify-cpu-{i}"), input).await,
        );
        let (Ok(a), Ok(b)) = (&a, &b) else {
            failures.push(format!(
                "{} / {}",
                harness::kind_of(&a),
                harness::kind_of(&b)
            ));
            continue;
        };
        equal += usize::from(a["label"] == b["label"]);
        right += usize::from(a["label"] == LABELS[i]);
        for label in LABELS {
            let delta = (a["scores"][label].as_f64().unwrap_or(0.0)
                - b["scores"][label].as_f64().unwrap_or(1.0))
            .abs();
            max_delta = max_delta.max(delta);
        }
    }
    let place = if ctx.simulated {
        " (simulated: both compute on the CPU)"
    } else {
        ""
    };
    table.add(
        "classify CUDA = CPU",
        format!(
            "{equal}/{} labels equal, {right}/{} right, max Δp {max_delta:.4}{place}{}",
            TEXTS.len(),
            TEXTS.len(),
            if failures.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", failures.join(", "))
            }
        ),
        Verdict::of(equal == TEXTS.len() && failures.is_empty()),
    );
}

fn embeddings(answer: &Answer) -> Vec<Vec<f64>> {
    let Ok(output) = answer else {
        return Vec::new();
    };
    output["chunks"]
        .as_array()
        .map(|chunks| {
            chunks
                .iter()
                .map(|c| {
                    c["embedding"]
                        .as_array()
                        .map(|e| e.iter().filter_map(Value::as_f64).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(f64::MIN_POSITIVE)
}

async fn same_embeddings(ctx: &Ctx, gpu: &Harness, cpu: &Harness, table: &mut Table) {
    let document: String = (0..80)
        .map(|i| {
            format!(
                "Paragraph {i} reports that division {} grew by {i} percent.",
                i % 9
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let input = json!({ "task": "extract", "document": { "text": document }, "chunk_tokens": 120 });
    let a = embeddings(&gpu.run("extract-gpu", input.clone()).await);
    let b = embeddings(&cpu.run("extract-cpu", input).await);
    let min = a
        .iter()
        .zip(&b)
        .map(|(x, y)| cosine(x, y))
        .fold(f64::INFINITY, f64::min);
    let place = if ctx.simulated {
        " (simulated: both compute on the CPU)"
    } else {
        ""
    };
    let ok = !a.is_empty() && a.len() == b.len() && min >= 0.999;
    table.add(
        "extract CUDA = CPU",
        format!(
            "{} chunks on each; min cosine {}{place}",
            a.len(),
            if a.is_empty() {
                "-".to_owned()
            } else {
                format!("{min:.6}")
            }
        ),
        Verdict::of(ok),
    );
}
