//! The phases of a rank's run a watchdog budgets apart, and the budgets.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a rank is doing, for the watchdog's budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Building the rank, meeting the others (before the first step).
    Setup,
    Step,
    Eval,
    Checkpoint,
    /// Agreeing on a new membership.
    Rendezvous,
}

pub(crate) const PHASES: [Phase; 5] = [
    Phase::Setup,
    Phase::Step,
    Phase::Eval,
    Phase::Checkpoint,
    Phase::Rendezvous,
];

impl Phase {
    pub(crate) fn index(self) -> usize {
        PHASES.iter().position(|p| *p == self).unwrap_or(0)
    }
}

/// How long phases may take before a rank counts as hung.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budgets {
    /// No phase's budget is shorter (`timeout_s / 2`, so that detection, polled every
    /// tenth of the timeout, stays within it).
    pub floor: Duration,
    /// A phase may take this many times its longest recent duration.
    pub factor: f64,
    /// A phase never measured yet may take this long.
    pub first: Duration,
}
