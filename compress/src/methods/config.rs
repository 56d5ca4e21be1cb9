//! `MethodConfig`: which compressor to build, its parameters and their validation.
//! Building lives in `methods/mod.rs`, the one file that knows every compressor.

use crate::error::CompressError;
use crate::wire::{self, MethodId};
use serde::{Deserialize, Serialize};

/// Which compressor to build and with what parameters; the `[compress]` section of a
/// run config deserialises into this, e.g. `method = "topk"` and `ratio = 0.01`. The
/// `method` tags are the names of `MethodId::name`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum MethodConfig {
    /// Dense f32, no compression.
    #[default]
    Identity,
    /// IEEE half precision (values beyond +-65504 saturate).
    Fp16,
    /// bfloat16.
    Bf16,
    /// Exact top-k by magnitude, `k = ceil(ratio * n)`.
    #[serde(rename = "topk")]
    TopK { ratio: f64 },
    /// DGC's approximate top-k: threshold estimated from a random sample of
    /// `sample_ratio * n` magnitudes; exact top-k among the selected when the estimate
    /// lets through more than twice k.
    #[serde(rename = "dgc_topk")]
    DgcTopK {
        ratio: f64,
        #[serde(default = "default_sample_ratio")]
        sample_ratio: f64,
    },
    /// Random-k with the index set drawn from a seed shared by all ranks; `unbiased`
    /// scales kept values by n / k (leave it off with error feedback).
    #[serde(rename = "randk")]
    RandK {
        ratio: f64,
        #[serde(default)]
        unbiased: bool,
    },
    /// Every element with |x| > threshold.
    Threshold { threshold: f32 },
    /// QSGD: `levels` quantisation levels per sign, one L2 norm per `bucket`
    /// elements, stochastic rounding (unbiased).
    #[serde(rename = "qsgd")]
    Qsgd {
        levels: u32,
        #[serde(default = "default_chunk")]
        bucket: usize,
    },
    /// TernGrad: {-s, 0, +s} per element, s = max |x| per `chunk`, unbiased.
    #[serde(rename = "terngrad")]
    TernGrad {
        #[serde(default = "default_chunk")]
        chunk: usize,
    },
    /// 1-bit sign with the mean magnitude of each `chunk` as scale (EF-signSGD).
    Sign {
        #[serde(default = "default_chunk")]
        chunk: usize,
    },
    /// PowerSGD of rank `rank` on the matrix view; tensors whose factors would not be
    /// `min_compression_rate` times smaller than the matrix go dense (PyTorch's rule;
    /// 0 compresses everything, 1 skips only where it would not save bytes).
    #[serde(rename = "powersgd")]
    PowerSgd {
        rank: usize,
        #[serde(default = "default_min_rate")]
        min_compression_rate: f64,
    },
}

// Defaults for omitted config keys: DGC's 1% sample, 512-element scale chunks, and
// PowerSGD skipping only where it would not save bytes.
fn default_sample_ratio() -> f64 {
    0.01
}
fn default_chunk() -> usize {
    512
}
fn default_min_rate() -> f64 {
    1.0
}

fn bad(method: &'static str, what: String) -> CompressError {
    CompressError::InvalidParam { method, what }
}

fn check_ratio(method: &'static str, name: &str, r: f64) -> Result<(), CompressError> {
    if r.is_finite() && r > 0.0 && r <= 1.0 {
        Ok(())
    } else {
        Err(bad(method, format!("{name} = {r} must be in (0, 1]")))
    }
}

fn check_chunk(method: &'static str, name: &str, c: usize) -> Result<(), CompressError> {
    if c > 0 && c <= u32::MAX as usize {
        Ok(())
    } else {
        Err(bad(method, format!("{name} = {c} must be in 1..=2^32-1")))
    }
}

impl MethodConfig {
    /// The wire method.
    pub fn method(&self) -> MethodId {
        match self {
            Self::Identity => MethodId::Identity,
            Self::Fp16 => MethodId::Fp16,
            Self::Bf16 => MethodId::Bf16,
            Self::TopK { .. } => MethodId::TopK,
            Self::DgcTopK { .. } => MethodId::DgcTopK,
            Self::RandK { .. } => MethodId::RandK,
            Self::Threshold { .. } => MethodId::Threshold,
            Self::Qsgd { .. } => MethodId::Qsgd,
            Self::TernGrad { .. } => MethodId::TernGrad,
            Self::Sign { .. } => MethodId::Sign,
            Self::PowerSgd { .. } => MethodId::PowerSgd,
        }
    }

    /// Parameters as a short human-readable string (statistics and benchmark rows).
    pub fn describe(&self) -> String {
        match self {
            Self::Identity | Self::Fp16 | Self::Bf16 => String::new(),
            Self::TopK { ratio } => format!("ratio={ratio}"),
            Self::DgcTopK {
                ratio,
                sample_ratio,
            } => format!("ratio={ratio},sample={sample_ratio}"),
            Self::RandK { ratio, unbiased } => format!("ratio={ratio},unbiased={unbiased}"),
            Self::Threshold { threshold } => format!("threshold={threshold}"),
            Self::Qsgd { levels, bucket } => format!("levels={levels},bucket={bucket}"),
            Self::TernGrad { chunk } => format!("chunk={chunk}"),
            Self::Sign { chunk } => format!("chunk={chunk}"),
            Self::PowerSgd {
                rank,
                min_compression_rate,
            } => format!("rank={rank},min_rate={min_compression_rate}"),
        }
    }

    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), CompressError> {
        let m = self.method().name();
        match *self {
            Self::Identity | Self::Fp16 | Self::Bf16 => Ok(()),
            Self::TopK { ratio } | Self::RandK { ratio, .. } => check_ratio(m, "ratio", ratio),
            Self::DgcTopK {
                ratio,
                sample_ratio,
            } => {
                check_ratio(m, "ratio", ratio)?;
                check_ratio(m, "sample_ratio", sample_ratio)
            }
            Self::Threshold { threshold } => {
                if threshold.is_finite() && threshold >= 0.0 {
                    Ok(())
                } else {
                    Err(bad(
                        m,
                        format!("threshold = {threshold} must be finite and >= 0"),
                    ))
                }
            }
            Self::Qsgd { levels, bucket } => {
                if levels == 0 || levels > wire::QSGD_MAX_LEVELS {
                    return Err(bad(
                        m,
                        format!("levels = {levels} must be in 1..={}", wire::QSGD_MAX_LEVELS),
                    ));
                }
                check_chunk(m, "bucket", bucket)
            }
            Self::TernGrad { chunk } | Self::Sign { chunk } => check_chunk(m, "chunk", chunk),
            Self::PowerSgd {
                rank,
                min_compression_rate,
            } => {
                if rank == 0 || rank > u32::MAX as usize {
                    return Err(bad(m, format!("rank = {rank} must be >= 1")));
                }
                if !(min_compression_rate.is_finite() && min_compression_rate >= 0.0) {
                    return Err(bad(
                        m,
                        format!(
                            "min_compression_rate = {min_compression_rate} must be finite and >= 0"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}
