//! What a run writes about itself: `metrics.jsonl` (a line per step and per epoch) and
//! `summary.json`, and the process figures they carry.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::RunError;
use crate::stepper::{HeldMemory, Migration, ParallelStepStats};

/// One line of `metrics.jsonl`: a step or an epoch.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsLine {
    Step(StepRecord),
    Epoch(EpochRecord),
}

/// A step's line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    pub skipped: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelStepStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// Per world rank, what it holds after the update (counted; on a mesh).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<HeldMemory>,
    /// The most the process's heap grew above its level at the step's start: activations,
    /// graphs and buffers of every rank in the process (measured by the counting allocator
    /// of the `meshrec` binary; absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap_step_peak_bytes: Option<u64>,
    /// Bytes the step copied between host memory and the device (both ways, counted at every
    /// crossing by `meshrec_model::transfer`; on a mesh, the leader rank's own). On the CPU
    /// backend these are the host loss's and host AdamW's copies; a device-resident step on
    /// a GPU moves only the batch and a few scalars.
    pub host_transfer_bytes: u64,
}

/// One membership change of an elastic run, with its timings (measured).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MembershipEvent {
    /// `loss` or `join`.
    pub kind: String,
    /// The step training continued from (the partial step dropped).
    pub step: u64,
    pub dp_before: usize,
    pub dp_after: usize,
    /// Who failed and why, by world rank and mesh coordinates (empty for a join).
    pub causes: Vec<String>,
    /// From the fault striking (where known: injected faults) to the survivors being told.
    pub detect_s: Option<f64>,
    /// From the survivors being told to the new membership agreed.
    pub agree_s: f64,
    /// From the survivors being told to training resumed (groups rebuilt, state rolled
    /// back or shared).
    pub recovery_s: Option<f64>,
    /// Updates one or more survivors had applied and rolled back (the partial step).
    pub rolled_back: bool,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    pub skipped_steps: u64,
    pub valid: BTreeMap<String, f64>,
    /// Means per step over the epoch, on a mesh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelStepStats>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub dataset: String,
    pub preset: String,
    pub device: String,
    pub params: u64,
    /// The model as `balance::shape` sees it (its formulas' inputs).
    pub shape: meshrec_balance::ModelShape,
    pub epochs_run: u64,
    pub best_epoch: u64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: u64,
    pub wall_seconds: f64,
    /// Steps whose gradient was not finite (the update was skipped).
    pub skipped_steps: u64,
    pub valid: BTreeMap<String, f64>,
    pub test: BTreeMap<String, f64>,
    /// Test metrics over the users whose target is a cold item (bottom popularity
    /// quintile of the training split), and how many users that is.
    #[serde(default)]
    pub test_cold: BTreeMap<String, f64>,
    #[serde(default)]
    pub test_cold_users: usize,
    pub checkpoint: PathBuf,
    /// Means per step over the run, on a mesh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelStepStats>,
    /// Per world rank, the most it held of each kind after any step's update (counted; on
    /// a mesh).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub memory_peak: Vec<HeldMemory>,
    /// The largest `heap_step_peak_bytes` of any step (measured; see `metrics.jsonl`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap_step_peak_bytes: Option<u64>,
    /// An elastic run's membership changes (replicas lost or joined), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub membership: Vec<MembershipEvent>,
}

/// `metrics.jsonl` of a run, written by the leader (the other ranks hold a writer that
/// writes nothing): a line per step and per epoch.
pub struct MetricsWriter {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl MetricsWriter {
    /// The leader's writer opens `run_dir/metrics.jsonl`, new or (resuming at
    /// `resume_step`) cut back to that step; the others' writes go nowhere.
    pub fn open(run_dir: &Path, resume_step: Option<u64>, leader: bool) -> Result<Self, RunError> {
        let path = run_dir.join("metrics.jsonl");
        let file = if leader {
            std::fs::create_dir_all(run_dir).map_err(|e| RunError::io(run_dir, e))?;
            Some(open_metrics(&path, resume_step)?)
        } else {
            None
        };
        Ok(Self { path, file })
    }

    pub fn write(&mut self, line: &MetricsLine) -> Result<(), RunError> {
        if let Some(f) = self.file.as_mut() {
            let text = serde_json::to_string(line).map_err(|e| RunError::io(&self.path, e))?;
            writeln!(f, "{text}").map_err(|e| RunError::io(&self.path, e))?;
        }
        Ok(())
    }
}

/// Writes `summary.json` into `run_dir`.
pub fn write_summary(run_dir: &Path, summary: &Summary) -> Result<(), RunError> {
    let path = run_dir.join("summary.json");
    let text = serde_json::to_string_pretty(summary).map_err(|e| RunError::io(&path, e))?;
    std::fs::write(&path, text).map_err(|e| RunError::io(&path, e))
}

/// The metrics file of a run: new, or (resuming) the old one cut back to the checkpoint's
/// step so that its lines continue without duplicates.
fn open_metrics(path: &Path, resume_step: Option<u64>) -> Result<std::fs::File, RunError> {
    let kept = match resume_step {
        Some(step) if path.is_file() => std::fs::read_to_string(path)
            .map_err(|e| RunError::io(path, e))?
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
        _ => String::new(),
    };
    std::fs::write(path, kept).map_err(|e| RunError::io(path, e))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| RunError::io(path, e))
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
