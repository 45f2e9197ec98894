//! Untrusted documents to text, in a process of their own.
//!
//! PDF, HTML, markdown and compressed bodies come from anyone who can submit a job, and their
//! parsers can be made to use gigabytes or minutes. So the worker never parses them itself: it
//! starts `runpod-parse` (the binary around [`child::main`]), which caps its own address space
//! at start and answers one [`wire::Request`] after another over its stdin and stdout. The worker
//! bounds its CPU time and its wall time, and kills it when a job ends. This crate does not link
//! libtorch, so the child maps a few megabytes, not the worker's gigabytes of CUDA libraries.

pub mod child;
pub mod parse;
pub mod wire;
