//! Admission: deciding how many jobs to take and when a taken job may start.
//!
//! Capacity is reserved before work is taken. Acquisition always follows one order: a global
//! slot (held from the take until the job is answered), then the handler's slot. A job never
//! holds a handler slot while it waits for a global one, so two jobs cannot wait on each other.

mod host_ledger;
mod learning;
mod ledger;
mod limits;

pub use host_ledger::HostLedger;
pub use learning::{AdaptiveRule, DurationStats, Footprint};
pub use ledger::{Ledger, LedgerEntry, Reservation};
pub use limits::{GlobalSlot, HandlerPermit, HandlerSnapshot, Limits, QueuedTicket};
