//! The cost side of meshrec: cost profiles, stage partitioner, rebalancer, cluster simulator, planner.
//!
//! Plain Rust over numbers (no burn). The mesh, schedules, DP modes and timelines it
//! simulates are `meshrec-pipeline`'s, the very ones the executor runs. The trainer feeds it measurements; the model crate
//! turns its config into a [`shape::ModelShape`], the single home of the FLOP, parameter
//! and activation formulas.
//!
//! How the pieces fit:
//! - [`shape`] → FLOPs, parameters, activation bytes of a model;
//! - [`device`], [`cluster`] → what it runs on (link formulas from `meshrec_comm::cost`);
//! - [`cost`] → per-layer [`CostProfile`]s, measured or roofline-modelled, TP-sharded;
//! - [`partition`] → optimal contiguous stages ([`PartitionProblem::solve`]);
//! - [`rebalance`] → online [`Rebalancer`] and heterogeneous DP [`split_batch`];
//! - [`sim`] → discrete-event simulation of training steps ([`simulate`]);
//! - [`mod@plan`] → layout search ranked by simulated throughput ([`plan()`]), rendered by
//!   [`plan::render_report`];
//! - [`report`] → `meshrec simulate`: a run as plain numbers and names ([`SimSpec`]) to a
//!   text report and timeline ([`simulate_spec`], [`SimReport`]).
//!
//! Everything the simulator and planner report is *simulated*, and says so.

pub mod accuracy;
pub mod cluster;
pub mod cost;
pub mod device;
pub mod error;
pub mod partition;
pub mod plan;
pub mod rebalance;
pub mod report;
pub mod shape;
pub mod sim;

pub use accuracy::{AccuracyEntry, AccuracyTable, Verdict};
pub use cluster::Cluster;
pub use cost::{CostProfile, LayerCost, ProfileSource};
pub use device::{DeviceSpec, LossPlacement};
pub use error::BalanceError;
pub use partition::{Partition, PartitionPlan, PartitionProblem, StageSpec};
pub use plan::{
    plan, render_report, Candidate, Comparison, LayoutClass, LayoutScore, PaperRow, Plan,
    PlanRequest,
};
pub use rebalance::{
    split_batch, Decision, DpBalancer, DpSplit, KeepReason, Proposal, RebalanceConfig, Rebalancer,
};
pub use report::{simulate_config, simulate_spec, SimReport, SimSpec};
pub use shape::{
    ActivationPolicy, LayerKind, MlpKind, ModelShape, Positions, Precision, StateBytes,
};
pub use sim::{
    simulate, simulate_steps, Aggregation, CommBytes, Compression, MultiStepResult, SimConfig,
    SimResult, StepBreakdown, StepPart,
};
