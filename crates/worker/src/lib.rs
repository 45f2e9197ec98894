//! The worker: takes jobs from a RunPod-style queue and runs them on libtorch models, never
//! letting concurrent jobs exhaust GPU memory.
//!
//! # Layout
//!
//! - [`config`]: `runpod.toml`, its defaults and validation.
//! - [`queue`]: the worker's queue client (HTTP, backoff, the result spool); the wire types
//!   and URL rules are the `runpod-protocol` crate's.
//! - [`admission`]: how many jobs to take, the admit and reserve stages (`Admitter`: global
//!   slot, handler slot; then GPU memory against the ledger, measured and resident memory), and
//!   what finished jobs teach (`Lessons`: footprints, adaptive limits, device health).
//! - [`handlers`]: the `Handler` trait (`prepare`, CPU only, then `run`, the model work) and
//!   the handlers (echo, extract, classify, torchscript); documents are parsed in `runpod-parse`
//!   child processes (`handlers::ParserPool`, the `docparse` crate).
//! - [`runner`]: the job's life as stages (take → admit → prepare → reserve → execute →
//!   release → report, in `runner::job`, under one cancel arm, `runner::Bounds`, with a
//!   `HeldJob` guard on the heartbeat board), the take loop, heartbeat, stop channel, start-up,
//!   background tasks and the drain.
//! - [`load_balancing`]: load-balancing mode, where requests come to the worker's own HTTP
//!   server (`/runsync`, `/stream`, OpenAI's `/v1/*`) and run as jobs through the runner's
//!   `Submitter`, under the same admission; `429` with `Retry-After` where the queue mode answers
//!   the retry signal.
//! - [`observed`]: the state the runner shares with its readers (phase, counters, recent jobs).
//! - [`health`] and [`metrics`]: `/health`, `/ready`, `/ping`, `/metrics`, reading
//!   [`observed::Observed`] (they know nothing of the runner).
//! - [`gpu`]: what is known of the GPU (NVML, simulated, none), which NVML card is which CUDA
//!   ordinal, and what libtorch's CUDA can do on this host.
//! - [`model`]: the libtorch model runtime (TorchScript modules, the MiniLM encoder).
//! - [`outcome`]: error results in the seed's shape and the job-done body.
//! - [`redact`]: secrets in URLs (userinfo, token parameters) removed before they are logged.

pub mod admission;
pub mod config;
pub mod gpu;
pub mod handlers;
pub mod health;
pub mod load_balancing;
pub mod metrics;
pub mod model;
pub mod observed;
pub mod outcome;
pub mod queue;
pub mod redact;
pub mod runner;
pub mod shutdown;
pub mod telemetry;
pub mod torch_check;
