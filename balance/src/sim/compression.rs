//! How the simulator sees a gradient compressor: wire bytes per gradient byte, the compute
//! to compress and decompress, and whether payloads are all-reduced or gathered.

use meshrec_compress::MethodConfig;
use serde::{Deserialize, Serialize};

use crate::error::BalanceError;
use crate::shape::ModelShape;

/// How a compressor's payloads are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aggregation {
    /// Compressed payloads add up element-wise (fp16, rand-k with a shared seed, PowerSGD).
    AllReduce,
    /// Every rank's payload is gathered and summed after decoding (top-k, QSGD, sign).
    GatherThenSum,
}

/// A gradient compressor as the simulator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compression {
    /// Name for reports.
    pub name: String,
    /// Wire bytes / uncompressed gradient bytes.
    pub wire_ratio: f64,
    /// Compute per gradient element to compress and decompress (FLOPs).
    pub flops_per_element: f64,
    /// Passes over the gradient in memory to compress and decompress.
    pub memory_passes: f64,
    /// All-reduce or gather-then-sum.
    pub aggregation: Aggregation,
}

impl Compression {
    /// No compression.
    pub fn none() -> Self {
        Self {
            name: "none".into(),
            wire_ratio: 1.0,
            flops_per_element: 0.0,
            memory_passes: 0.0,
            aggregation: Aggregation::AllReduce,
        }
    }

    /// Top-k keeping `fraction` of the elements as (index gap varint, value) pairs with
    /// error feedback: selection ~8 FLOPs and 4 memory passes per element (modelled).
    pub fn top_k(fraction: f64, grad_bytes: u32) -> Self {
        let g = f64::from(grad_bytes.max(1));
        Self {
            name: format!("topk{}%", fraction * 100.0),
            wire_ratio: fraction * (sparse_index_bytes(fraction) + g) / g,
            flops_per_element: 8.0,
            memory_passes: 4.0,
            aggregation: Aggregation::GatherThenSum,
        }
    }

    /// PowerSGD of `rank` on square `d×d` matrices: wire `2·rank/d`, two thin matmuls and an
    /// orthogonalisation, ~`6·rank` FLOPs per element, error feedback (3 passes).
    pub fn power_sgd(rank: u32, d: u64) -> Self {
        Self {
            name: format!("powersgd-r{rank}"),
            wire_ratio: (2.0 * f64::from(rank) / d as f64).min(1.0),
            flops_per_element: 6.0 * f64::from(rank),
            memory_passes: 3.0,
            aggregation: Aggregation::AllReduce,
        }
    }

    /// The simulator's view of a `meshrec-compress` method:
    ///
    /// | method | wire (per gradient element) | aggregation |
    /// |---|---|---|
    /// | identity | the gradient | all-reduce |
    /// | fp16, bf16 | 2 bytes | all-reduce |
    /// | topk, dgc_topk | `ratio` × (index gap varint + value) | gather |
    /// | randk | `ratio` × value (shared seed) | all-reduce |
    /// | qsgd | sign + level bits, one f32 norm per 512 | gather |
    /// | terngrad | 2 bits, one f32 scale per 512 | gather |
    /// | sign | 1 bit, one f32 scale per 512 | gather |
    /// | powersgd | `2·rank/d` of a `d×d` matrix | all-reduce |
    ///
    /// `threshold` keeps a data-dependent fraction the simulator cannot know: it is refused
    /// (model it as `topk` with the fraction you expect). Compute costs are modelled (FLOPs
    /// and memory passes per element), not measured.
    pub fn of(method: &MethodConfig, shape: &ModelShape) -> Result<Self, BalanceError> {
        method.validate().map_err(|e| BalanceError::InvalidLayout {
            layout: format!("compressor {}", method.method().name()),
            reason: e.to_string(),
        })?;
        let g = f64::from(shape.precision.grad_bytes.max(1));
        let quantised = |name: String, bits: f64, flops: f64| Self {
            name,
            wire_ratio: ((bits / 8.0 + 4.0 / 512.0) / g).min(1.0),
            flops_per_element: flops,
            memory_passes: 3.0,
            aggregation: Aggregation::GatherThenSum,
        };
        Ok(match *method {
            MethodConfig::Identity => Self::none(),
            MethodConfig::Fp16 | MethodConfig::Bf16 => Self {
                name: method.method().name().to_string(),
                wire_ratio: (2.0 / g).min(1.0),
                flops_per_element: 1.0,
                memory_passes: 2.0,
                aggregation: Aggregation::AllReduce,
            },
            MethodConfig::TopK { ratio } => Self::top_k(ratio, shape.precision.grad_bytes),
            MethodConfig::DgcTopK { ratio, .. } => Self {
                name: format!("dgc_topk{}%", ratio * 100.0),
                // A sampled threshold instead of a selection: 2 passes.
                memory_passes: 2.0,
                flops_per_element: 2.0,
                ..Self::top_k(ratio, shape.precision.grad_bytes)
            },
            MethodConfig::RandK { ratio, .. } => Self {
                name: format!("randk{}%", ratio * 100.0),
                wire_ratio: (ratio * 4.0 / g).min(1.0),
                flops_per_element: 1.0,
                memory_passes: 3.0,
                aggregation: Aggregation::AllReduce,
            },
            MethodConfig::Qsgd { levels, .. } => {
                let bits = 1.0 + (f64::from(levels) + 1.0).log2().ceil();
                quantised(format!("qsgd-l{levels}"), bits, 6.0)
            }
            MethodConfig::TernGrad { .. } => quantised("terngrad".into(), 2.0, 4.0),
            MethodConfig::Sign { .. } => quantised("sign".into(), 1.0, 2.0),
            MethodConfig::PowerSgd { rank, .. } => {
                Self::power_sgd(u32::try_from(rank).unwrap_or(u32::MAX), shape.d_model)
            }
            MethodConfig::Threshold { .. } => {
                return Err(BalanceError::InvalidLayout {
                    layout: "compressor threshold".into(),
                    reason: "the fraction a threshold keeps depends on the gradients, which the simulator does not have: simulate it as topk with the fraction you expect".into(),
                })
            }
        })
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(self.wire_ratio.is_finite() && self.wire_ratio > 0.0) {
            return Err(format!(
                "compression {}: wire_ratio {} must be positive",
                self.name, self.wire_ratio
            ));
        }
        if !(self.flops_per_element >= 0.0 && self.memory_passes >= 0.0) {
            return Err(format!("compression {}: costs must be >= 0", self.name));
        }
        Ok(())
    }
}

/// Expected bytes of one index of a sparse payload, whose indices travel as LEB128
/// varints of the gaps between them (`meshrec-compress`'s wire format), MODELLED with the
/// kept elements spread uniformly at density `fraction`: a gap is geometric, and a varint
/// takes a further byte for each power of 128 the gap reaches, so the expectation is
/// `1 + Σ_j (1 − fraction)^(128^j)`. Top-k of real gradients clusters (rows of an
/// embedding table), which makes gaps shorter than this.
pub fn sparse_index_bytes(fraction: f64) -> f64 {
    let miss = (1.0 - fraction.clamp(0.0, 1.0)).ln();
    1.0 + (1..5).map(|j| (miss * 128f64.powi(j)).exp()).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::sparse_index_bytes;
    use meshrec_compress::wire::varint_len;

    #[test]
    fn index_bytes_follow_the_wire_format_on_uniform_positions() {
        // Every position kept with probability `fraction` (a uniform draw from a fixed
        // LCG): the mean varint length of the gaps the encoder would write.
        for fraction in [0.5, 0.05, 0.01, 0.002, 0.0005] {
            let (mut state, mut prev, mut bytes, mut kept) = (12345u64, 0u64, 0usize, 0usize);
            for i in 0..4_000_000u64 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if ((state >> 11) as f64) < fraction * (1u64 << 53) as f64 {
                    bytes += varint_len((i - prev) as u32);
                    prev = i + 1;
                    kept += 1;
                }
            }
            let measured = bytes as f64 / kept as f64;
            let modelled = sparse_index_bytes(fraction);
            assert!(
                (measured / modelled - 1.0).abs() < 0.02,
                "fraction {fraction}: measured {measured}, modelled {modelled}"
            );
        }
        assert_eq!(sparse_index_bytes(1.0), 1.0);
        assert_eq!(sparse_index_bytes(0.0), 5.0);
    }
}
