//! The `Compressor` trait, the method configuration and the factory that builds them.

pub mod dense;
pub mod powersgd;
pub mod quant;
pub mod sparse;

use crate::error::{CompressError, SyncError};
use crate::wire::{self, Apply, DecodeScratch, MethodId, Payload};
use serde::{Deserialize, Serialize};

/// How the payloads of all ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aggregation {
    /// The compressed representation is a dense f32 vector whose sum over ranks is the
    /// compressed sum (same indices / same factors on every rank): `all_reduce` it.
    AllReduce,
    /// Payloads differ per rank (own indices, own scales): exchange them with
    /// `all_gatherv`, then every rank decodes and sums all of them.
    GatherThenSum,
}

/// Per-call context: seeds and per-tensor state a method may need.
#[derive(Debug, Default)]
pub struct Ctx<'a> {
    /// Identical on all ranks for this tensor and step (random-k indices, PowerSGD init).
    pub shared_seed: u64,
    /// Different on every rank (stochastic-rounding noise must be independent so it
    /// averages out across ranks).
    pub local_seed: u64,
    /// Matrix view of the tensor for PowerSGD; `None` picks a near-square view.
    pub shape: Option<(usize, usize)>,
    /// PowerSGD warm-start factor Q (cols x rank); filled on first use.
    pub warm: Option<&'a mut Vec<f32>>,
}

impl Ctx<'_> {
    /// A context with both seeds derived from one value (single-process use).
    pub fn seeded(seed: u64) -> Self {
        Ctx {
            shared_seed: seed,
            local_seed: crate::rng::mix(seed ^ 0x5EED),
            ..Ctx::default()
        }
    }
}

/// The all-reduce used by `Compressor::reduce`: sums a buffer over all ranks and
/// divides by the number of ranks, in place.
pub type AvgReduce<'a> = dyn FnMut(&mut [f32]) -> Result<(), SyncError> + 'a;

/// What an all-reduce-compatible protocol moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReduceInfo {
    /// Bytes of the compressed representation per rank (what a transport that reduces
    /// in the compressed dtype would move).
    pub payload_bytes: usize,
    /// Bytes handed to the f32 all-reduce per rank (what this transport moved).
    pub reduced_bytes: usize,
    /// The method fell back to a dense all-reduce (PowerSGD on a tensor too small to
    /// gain from it).
    pub skipped: bool,
}

/// A gradient compressor over flat f32 tensors (one tensor or one bucket).
///
/// Compressors hold configuration and reusable scratch buffers; per-tensor state
/// (residuals, PowerSGD's warm start) lives in `Memory` and reaches them via `Ctx`.
pub trait Compressor: Send {
    /// The wire method this compressor writes.
    fn method(&self) -> MethodId;
    /// The configuration it was built from.
    fn config(&self) -> &MethodConfig;
    /// How payloads of several ranks combine.
    fn aggregation(&self) -> Aggregation;

    /// Compresses `x` into `out`, replacing its contents and reusing its buffer.
    fn compress_into(
        &mut self,
        x: &[f32],
        ctx: &mut Ctx<'_>,
        out: &mut Payload,
    ) -> Result<(), CompressError>;

    /// Compresses into a fresh payload.
    fn compress(&mut self, x: &[f32], seed: u64) -> Result<Payload, CompressError> {
        let mut p = Payload::new();
        self.compress_into(x, &mut Ctx::seeded(seed), &mut p)?;
        Ok(p)
    }

    /// Decoder scratch owned by the compressor (reused across calls).
    fn scratch(&mut self) -> &mut DecodeScratch;

    /// Decodes a payload written by this method into `out`, combining as `apply` says.
    fn decompress_into(
        &mut self,
        payload: &[u8],
        out: &mut [f32],
        apply: Apply,
    ) -> Result<(), CompressError> {
        let found = wire::peek(payload)?.method;
        // PowerSGD writes a dense payload for tensors it does not compress.
        let ok = found == self.method()
            || (self.method() == MethodId::PowerSgd && found == MethodId::Identity);
        if !ok {
            return Err(CompressError::MethodMismatch {
                expected: self.method().name(),
                found: found.name(),
            });
        }
        wire::decode_into(payload, out, apply, self.scratch())?;
        Ok(())
    }

    /// The compressed all-reduce protocol of an `AllReduce` method.
    ///
    /// On entry `x` holds this rank's (compensated) gradient; on exit it holds the
    /// average over ranks of the compressed gradients. If `residual` is given it must
    /// hold a copy of `x` on entry (as `Memory::compensate` leaves it, which saves a
    /// pass) and receives `x_in - sent`, where `sent` is this rank's decompressed
    /// contribution (for PowerSGD, as in the paper and PyTorch's hook, the
    /// decompressed average).
    /// `avg` all-reduces a buffer to its mean; every rank calls it the same number of
    /// times with the same lengths.
    fn reduce(
        &mut self,
        x: &mut [f32],
        residual: Option<&mut [f32]>,
        ctx: &mut Ctx<'_>,
        avg: &mut AvgReduce<'_>,
    ) -> Result<ReduceInfo, SyncError> {
        let _ = (x, residual, ctx, avg);
        Err(SyncError::NotAllReduce(self.method().name()))
    }
}

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

/// `k = ceil(ratio * n)`, at least 1 for a non-empty tensor, at most n.
pub(crate) fn k_for(ratio: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((ratio * n as f64).ceil() as usize).clamp(1, n)
}

/// Tensors indexed by u32 on the wire.
pub(crate) fn check_u32_len(method: MethodId, n: usize) -> Result<(), CompressError> {
    if n > u32::MAX as usize + 1 {
        Err(CompressError::TooLarge {
            method: method.name(),
            what: format!("{n} elements exceed the u32 index range"),
        })
    } else {
        Ok(())
    }
}
