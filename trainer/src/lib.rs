//! meshrec trainer library: the run configuration, the training loop and the steppers it
//! drives (one device, one rank of a mesh), checkpoints, metrics and measurements.
//!
//! * [`config`] — the TOML run configuration.
//! * [`setup`] — dataset, model config, seeded model, optimizer settings, random streams.
//! * [`stepper`] — the loop's view of whatever runs the steps; [`single`] and [`hybrid`]
//!   implement it.
//! * [`train`] — the loop, composed of [`early_stop`], [`checkpoint_policy`], [`metrics`]
//!   and [`progress`].
//! * [`checkpoint`] — the layout-free training state on disk; [`model_io`] — the best model.
//! * [`faults`] — fault injection behind one trait (`[fault]`).
//! * [`elastic`] — training through the loss and the arrival of replicas (`[elastic]`),
//!   liveness and progress kept apart, the local rendezvous and `meshrec launch`.
//! * [`serving`] — the reductions serving uses: pruning with a fine-tune, distillation.
//! * [`measure`], [`profile`], [`simulate`], [`report`] — measurements, per-layer profiles,
//!   the simulator's view of a run, and a finished run's curves.

pub mod checkpoint;
pub mod checkpoint_policy;
pub mod checkpoint_shard;
pub mod compress_section;
pub mod config;
pub mod config_error;
pub mod early_stop;
pub mod elastic;
pub mod error;
pub mod fault_section;
pub mod faults;
pub mod features;
pub mod heap;
pub mod hybrid;
pub mod measure;
pub mod metrics;
pub mod model_io;
pub mod profile;
pub mod progress;
pub mod report;
pub mod serving;
pub mod setup;
pub mod simulate;
pub mod single;
pub mod stepper;
pub mod train;
