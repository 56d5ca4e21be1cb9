//! `[fault]`: the failures a run injects into itself, for the tests and the soak that prove
//! it survives them, and the vocabulary of where and how a crash strikes.

use serde::{Deserialize, Serialize};

/// Where in a step (or around it) an injected crash strikes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultPoint {
    /// After backward, with the peers waiting in the step's reductions (an all-reduce).
    #[default]
    MidStep,
    /// After this rank applied the step's update, before the step's closing collectives:
    /// survivors may disagree on whether the step happened.
    AfterUpdate,
    /// While a checkpoint is being written (the state gathered or the shards written, the
    /// manifest and the rename not yet).
    Checkpoint,
}

impl std::fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MidStep => "mid_step",
            Self::AfterUpdate => "after_update",
            Self::Checkpoint => "checkpoint",
        })
    }
}

/// How an injected crash shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The rank's step fails with an error (under MPI: the process aborts).
    #[default]
    Error,
    /// The rank's thread panics.
    Panic,
    /// The rank stops making progress without dying: it blocks until an elastic run's
    /// watchdog evicts it (a thread cannot be killed; under MPI the supervisor kills the
    /// process).
    Hang,
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Error => "error",
            Self::Panic => "panic",
            Self::Hang => "hang",
        })
    }
}

impl Default for FaultSection {
    fn default() -> Self {
        Self {
            nan_step: None,
            nan_rank: 0,
            crash_step: None,
            crash_rank: 0,
            slow_ms: 0,
            slow_rank: 0,
            slow_compute: 1.0,
            slow_compute_rank: 0,
            crash_at: FaultPoint::default(),
            crash_kind: FaultKind::default(),
        }
    }
}

/// `[fault]`: failure injection, for the tests that prove a run survives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSection {
    /// Poison this world rank's gradient with NaN at this step.
    pub nan_step: Option<u64>,
    pub nan_rank: usize,
    /// Make this world rank die at this step (an error on the local engine, abort under MPI).
    pub crash_step: Option<u64>,
    pub crash_rank: usize,
    /// Where in the step it dies: `mid_step` (peers in the reductions), `after_update`,
    /// `checkpoint` (while a checkpoint is written).
    pub crash_at: FaultPoint,
    /// How: `error`, `panic`, or `hang` (stops progressing; needs `elastic.enabled`).
    pub crash_kind: FaultKind,
    /// Make this world rank a straggler: it sleeps this long in every step (0: off).
    pub slow_ms: u64,
    pub slow_rank: usize,
    /// Make this world rank a slower device: its forward and backward take this many
    /// times as long (1: off).
    pub slow_compute: f64,
    pub slow_compute_rank: usize,
}
