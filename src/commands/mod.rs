//! What each subcommand does. Each returns the process exit code.

mod check_config;
mod local;
mod mock;
mod serve;
mod test_input;

pub use check_config::{capacity_plan, check_config};
pub use local::{local, LOCAL_ENDPOINT};
pub use mock::{mock_queue, parse_fault, MockQueueArgs};
pub use serve::serve;
pub use test_input::test_input;
