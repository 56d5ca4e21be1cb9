//! DP × TP × PP training: one rank of the mesh as a stepper made of parts, and how a mesh
//! run starts (threads on the local engine, processes under `mpirun`).
//!
//! * [`model`] — the rank's share of the model and its optimizer; the layout-free state.
//! * [`dp_update`] — the DP mode's update policy (one replica, sync/async, local SGD).
//! * [`balancing`] — online pipeline rebalancing and the speed-proportional DP split.
//! * [`capture`] — `--timeline`'s per-rank events, drawn by the leader.
//! * [`rank`] — [`MeshRank`], the [`crate::stepper::Stepper`] composed of the above.
//! * [`launch`] — [`train_local`], [`train_mpi`], and the layout check before ranks start.

pub mod balancing;
pub mod capture;
pub mod dp_update;
pub mod launch;
pub mod model;
pub mod rank;

pub use launch::{train_local, train_mpi};
pub use rank::MeshRank;
