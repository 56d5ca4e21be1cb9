//! Gradient compressors: the trait, the configuration, one file per family, and the
//! factory that turns a configuration into a compressor.
//!
//! `api` and `config` are shared by every family and depend on none of them; only this
//! file, the factory, names the families, so nothing points back at it.

mod api;
mod config;
pub mod dense;
pub mod powersgd;
pub mod quant;
pub mod sparse;

pub use api::{avg_as, warmed_ratio, Aggregation, AvgReduce, Compressor, Ctx, ReduceInfo};
pub use config::MethodConfig;

use crate::error::CompressError;

// Beside the families rather than in `config.rs`: building needs every family, and each
// family needs `MethodConfig`.
impl MethodConfig {
    /// Builds the compressor.
    pub fn build(&self) -> Result<Box<dyn Compressor>, CompressError> {
        self.validate()?;
        Ok(match *self {
            Self::Identity => Box::new(dense::Identity::new()),
            Self::Fp16 => Box::new(dense::Cast::<half::f16>::new(self.clone())),
            Self::Bf16 => Box::new(dense::Cast::<half::bf16>::new(self.clone())),
            Self::TopK { .. } | Self::DgcTopK { .. } | Self::Threshold { .. } => {
                Box::new(sparse::Sparsifier::new(self.clone()))
            }
            Self::RandK { ratio, unbiased } => Box::new(sparse::RandK::new(ratio, unbiased)),
            Self::Qsgd { .. } | Self::TernGrad { .. } | Self::Sign { .. } => {
                Box::new(quant::Quantizer::new(self.clone()))
            }
            Self::PowerSgd {
                rank,
                min_compression_rate,
            } => Box::new(powersgd::PowerSgd::new(rank, min_compression_rate)),
        })
    }
}
