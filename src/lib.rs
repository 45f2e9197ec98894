//! runpod-worker: a serverless GPU inference worker for RunPod-style job queues that never lets
//! concurrent jobs exhaust GPU memory.
//!
//! # Layout
//!
//! - [`config`]: `runpod.toml`, its defaults and validation.
//! - [`queue`]: the worker side of the job API (environment, URLs, HTTP client, backoff).
//! - [`mock_queue`]: a mock of the job API, for local use and tests.
//! - [`admission`]: how many jobs to take, the admit and reserve stages (`Admitter`: global
//!   slot, handler slot; then GPU memory against the ledger, measured and resident memory), and
//!   what finished jobs teach (`Lessons`: footprints, adaptive limits, device health).
//! - [`handlers`]: the `Handler` trait (`prepare`, CPU only, then `run`, the model work) and
//!   the handlers (echo, extract, classify, torchscript); documents are parsed in `runpod-parse`
//!   child processes (`handlers::ParserPool`, the `docparse` workspace crate).
//! - [`runner`]: the job's life as stages (take → admit → prepare → reserve → execute →
//!   release → report, in `runner::job`, under one cancel arm, `runner::Bounds`, with a
//!   `HeldJob` guard on the heartbeat board), the take loop, heartbeat, stop channel, start-up,
//!   background tasks and the drain.
//! - [`health`] and [`metrics`]: `/health`, `/ready`, `/metrics`, reading the `Observed` state
//!   the runner shares (health knows nothing of the runner).
//! - [`console`]: the live page at `/` of the worker's port (read-only) and of `local`.
//! - [`gpu`]: what is known of the GPU (NVML, simulated, none), which NVML card is which CUDA
//!   ordinal, and what libtorch's CUDA can do on this host.
//! - [`model`]: the libtorch model runtime (TorchScript modules, the MiniLM encoder).
//! - [`outcome`]: error results in the seed's shape and the job-done body.
//! - [`redact`]: secrets in URLs (userinfo, token parameters) removed before they are logged.
//! - [`commands`]: what each subcommand does; `main.rs` only parses arguments.
//! - [`bench`]: the benchmark harness (`runpod-worker bench`).
//! - [`gpu_check`]: `runpod-worker gpu-check`, the proof of the GPU paths on a real card.

pub mod admission;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod console;
pub mod gpu;
pub mod gpu_check;
pub mod handlers;
pub mod health;
mod http_server;
pub mod metrics;
pub mod mock_queue;
pub mod model;
pub mod outcome;
pub mod queue;
pub mod redact;
pub mod runner;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod torch_check;
