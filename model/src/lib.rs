//! The LLM recommender on burn: data, model, fused loss, host optimizer, ranking metrics.

pub mod causal_softmax;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod device_loss;
pub mod device_optim;
pub mod dropout;
pub mod error;
#[cfg(feature = "flex")]
mod flex_op;
pub mod fusion;
pub mod gelu;
pub mod kernels;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod params;
pub mod step;
pub mod transfer;

pub use config::{ModelConfig, NormKind, Preset};
pub use error::{CheckpointError, ConfigError, DataError};
pub use fusion::{SideInputs, TextFeatures};
pub use model::Recommender;
