//! What admission learns from each finished job: its duration and (when it ran alone on its
//! GPU) its real peak, which footprints are learned from; with `[gpu] adaptive`, the handler's
//! limit (halved on OOM, one more after a run of successes); and whether the device is still
//! fit to serve (repeated OOMs, a lost GPU).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::{AdaptiveRule, DeviceHealth, Limits, MemoryAdmission};
use crate::outcome::JobError;

/// A handler's limit, moved by a lesson.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitChange {
    /// Shrunk after an out-of-memory failure, to this.
    Shrunk(usize),
    /// Grown back after a run of successes, to this (of the configured maximum).
    Grew(usize, usize),
}

/// What one finished job taught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Learned {
    /// It ran out of GPU memory.
    pub oom: bool,
    /// Its handler's limit moved.
    pub limit: Option<LimitChange>,
    /// This result trips the worker: it must drain and be replaced.
    pub replace_worker: bool,
}

/// Learning from finished jobs.
pub struct Lessons {
    memory: Arc<MemoryAdmission>,
    limits: Arc<Limits>,
    /// Per handler, with `[gpu] adaptive`.
    adaptive: BTreeMap<String, AdaptiveRule>,
    device_health: DeviceHealth,
}

impl Lessons {
    /// Lessons over this admission state; `adaptive` holds a rule per handler whose limit may
    /// move, and the worker asks to be replaced after `max_consecutive_ooms`.
    pub fn new(
        memory: Arc<MemoryAdmission>,
        limits: Arc<Limits>,
        adaptive: BTreeMap<String, AdaptiveRule>,
        max_consecutive_ooms: u32,
    ) -> Self {
        Self {
            memory,
            limits,
            adaptive,
            device_health: DeviceHealth::new(max_consecutive_ooms),
        }
    }

    /// Learns from a finished job of `handler` that took `took` and peaked at `peak`.
    pub fn learn(
        &self,
        handler: &str,
        result: &Result<Value, JobError>,
        took: Duration,
        peak: Option<u64>,
    ) -> Learned {
        self.memory.record(handler, took, peak, result.is_ok());
        let oom = matches!(result, Err(e) if e.is_out_of_memory());
        Learned {
            oom,
            limit: self.adapt(handler, result, oom),
            replace_worker: self.device_health.record(result),
        }
    }

    fn adapt(
        &self,
        handler: &str,
        result: &Result<Value, JobError>,
        oom: bool,
    ) -> Option<LimitChange> {
        let (rule, current) = (self.adaptive.get(handler)?, self.limits.handler(handler)?);
        let wanted = match result {
            _ if oom => rule.on_oom(current.limit),
            Ok(_) if current.limit < current.max_limit => rule.on_success(current.limit),
            _ => current.limit,
        };
        if wanted == current.limit {
            return None;
        }
        let limit = self.limits.set_limit(handler, wanted);
        Some(if oom {
            LimitChange::Shrunk(limit)
        } else {
            LimitChange::Grew(limit, current.max_limit)
        })
    }

    /// Whether the worker has asked to be replaced.
    pub fn device_tripped(&self) -> bool {
        self.device_health.is_tripped()
    }
}
