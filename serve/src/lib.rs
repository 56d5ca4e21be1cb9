//! Online recommendation serving on the `model` crate: an inference engine (burn's forward
//! as offline evaluation runs it, or host kernels in f32 or int8), top-k by partial
//! selection, dynamic batching, a worker pool with a least-loaded dispatcher and an
//! autoscaler, an HTTP/JSON front on tokio + axum with Prometheus metrics, structured
//! pruning, and a load generator.
//!
//! This file only declares and re-exports. The files depend on each other in one direction:
//! `config`, `error`, `topk`, `quant`, `batcher`, `dispatch`, `metrics` are leaves;
//! `host_model` <- `quant`; `engine` <- `host_model`; `autoscale` <- `config`; `pool` <-
//! {`engine`, `batcher`, `dispatch`, `autoscale`, `metrics`}; `http` <- `pool`; `server` <-
//! `http`; `loadgen` <- `http`, `metrics`; `plot` <- `loadgen`; `prune` is on its own.

pub mod autoscale;
pub mod batcher;
pub mod config;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod host_model;
pub mod http;
pub mod loadgen;
pub mod metrics;
pub mod plot;
pub mod pool;
pub mod prune;
pub mod quant;
pub mod server;
pub mod topk;

pub use config::ServeConfig;
pub use engine::{Engine, EngineSettings, Query};
pub use error::ServeError;
pub use server::{RunningServer, Service};
