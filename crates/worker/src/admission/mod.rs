//! Admission: deciding how many jobs to take, when a taken job may start, and what each
//! finished job teaches (footprints, adaptive limits, device health).
//!
//! Capacity is reserved before work is taken. Acquisition always follows one order: a global
//! slot (held from the take until the job is answered), then the handler's slot, then GPU
//! memory. A job never holds a later resource while it waits for an earlier one, so two jobs
//! cannot wait on each other.

mod admitter;
mod batch_memory;
mod booking;
mod device_health;
mod host_ledger;
mod learning;
mod ledger;
mod lessons;
mod limits;
mod memory;
pub mod resident;

pub use admitter::{Admitted, Admitter, PeakProbe, Refusal, RetrySignal};
pub use batch_memory::attach_batchers;
pub use device_health::DeviceHealth;
pub use host_ledger::{HostLedger, HostTotals, HostView};
pub use learning::{AdaptiveRule, DurationStats, Footprint};
pub use ledger::{Ledger, LedgerEntry, Reservation};
pub use lessons::{Learned, Lessons, LimitChange};
pub use limits::{GlobalSlot, HandlerPermit, HandlerSnapshot, Limits, QueuedTicket};
pub use memory::{MemoryAdmission, Shortage};
