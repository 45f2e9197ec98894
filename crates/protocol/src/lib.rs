//! The RunPod job API as both sides see it: the job object a take returns and how a take's
//! body is read ([`job`]), the rules for job ids, the queue's URLs built from the SDK's
//! environment ([`endpoints`]), the API key ([`ApiKey`]), the platform's limits
//! ([`limits`]), OpenAI's error replies ([`openai`]) and the addresses no job may make either side call ([`address`]).
//!
//! No runtime, no HTTP client, no model code: the worker and the mock queue both build on it.

pub mod address;
mod api_key;
pub mod endpoints;
pub mod job;
pub mod limits;
pub mod openai;

pub use api_key::ApiKey;
pub use endpoints::{EndpointsError, QueueEndpoints};
pub use job::{BadJob, Job};
