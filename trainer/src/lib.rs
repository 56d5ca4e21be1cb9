//! meshrec trainer library: run configuration, the training run, metrics and checkpoints.

pub mod checkpoint;
pub mod config;
pub mod hybrid;
pub mod measure;
pub mod profile;
pub mod run;
pub mod simulate;
