//! The vocabulary of a parallel training step, below both the executor (`meshrec-parallel`)
//! and the cluster simulator (`meshrec-balance`), so that both speak it and neither keeps a
//! copy:
//!
//! * [`mesh`] — the `dp × tp × pp` grid: axes, coordinates, rank order, and the checks of a
//!   layout against a model's dimensions.
//! * [`schedule`] — GPipe, 1F1B and interleaved 1F1B as data, checked complete and
//!   deadlock-free; [`schedule::Schedule::walk`] visits its actions in dependency order,
//!   which is how the simulator plays the very schedule the executor runs.
//! * [`dp`] — how data-parallel replicas combine their work (sync, async, local SGD) and
//!   how ZeRO shards their state.
//! * [`recompute`] — activation recomputation: none, selective (attention scores), full.
//! * [`timeline`] — events of a step, utilization and bubble, a Gantt chart in SVG.
//!
//! Plain Rust: no burn, no communication.

pub mod dp;
pub mod mesh;
pub mod recompute;
pub mod schedule;
pub mod timeline;

pub use dp::{zero_shard, zero_shard_stride, DpMode, ZeroStage, ZeroStageError};
pub use mesh::{Axis, Coord, Mesh, MeshError, ModelDims};
pub use recompute::{Recompute, RecomputeError};
pub use schedule::{Action, Schedule, ScheduleError, ScheduleKind, ScheduleSpec};
pub use timeline::{Event, EventKind, Recorder, StageTimeline};
