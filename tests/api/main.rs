//! Black-box tests: a real worker against the real mock queue on 127.0.0.1:0. One test binary
//! (each links libtorch), one module per area.

#![allow(unreachable_pub)] // test helpers are `pub` for the sibling modules, not for export
mod helpers;
mod local_process;

mod bad_input;
mod bodies;
mod cached_models;
mod chaos;
mod connection_flood;
mod console;
mod faults;
mod gpu_memory;
mod gpu_mig;
mod gpu_truth;
mod handler_inputs;
mod heartbeat;
mod hostile_documents;
mod job_ids;
mod libraries;
mod lifecycle;
mod limits;
mod load_balancing;
mod logs;
mod loose_ends;
mod mock_api;
mod mock_client;
mod mock_load;
mod mock_local;
mod mock_parity;
mod mock_retention;
mod mock_rules;
mod models;
mod parser;
mod pipelining;
mod process;
mod refresh;
mod resilience;
mod shutdown;
