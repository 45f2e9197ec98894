//! The worker's side of the RunPod job API: the HTTP client ([`client`]), the pacing of
//! retries ([`backoff`]) and the results kept on disk while the queue is away ([`spool`]).
//! The wire types, the id rules and the URLs built from the SDK's environment are the
//! `runpod-protocol` crate's, shared with the mock queue.

pub mod backoff;
pub mod client;
pub mod spool;

pub use backoff::Backoff;
pub use client::{QueueClient, QueueError, TakeResponse};
pub use runpod_protocol::{BadJob, EndpointsError, Job, QueueEndpoints};
pub use spool::{Spool, SpooledResult};
