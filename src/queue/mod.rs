//! The worker's side of the RunPod job API: the SDK's environment and URL templates
//! ([`endpoints`]), the wire types shared with the mock ([`protocol`]), the HTTP client
//! ([`client`]) and the pacing of retries ([`backoff`]).

pub mod backoff;
pub mod client;
pub mod endpoints;
pub mod protocol;
pub mod spool;

pub use backoff::Backoff;
pub use client::{QueueClient, QueueError, TakeResponse};
pub use endpoints::{EndpointsError, QueueEndpoints};
pub use protocol::{BadJob, Job};
pub use spool::{Spool, SpooledResult};
