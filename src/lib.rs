//! The `runpod-worker` binary's library: the command line ([`cli`]), what each subcommand does
//! ([`commands`]; `main.rs` only parses arguments), the live console ([`console`]) and the
//! proof of the GPU paths on a real card ([`gpu_check`]).
//!
//! The worker itself is the `worker` crate; the wire protocol is `runpod-protocol`, the mock
//! queue `mock-queue`, the benchmark harness `bench` (see ARCHITECTURE.md).

pub mod cli;
pub mod commands;
pub mod console;
pub mod gpu_check;
