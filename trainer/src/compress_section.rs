//! `[compress]`: the data-parallel gradient compressor applied per bucket, its DGC
//! corrections and selection options, and their validation against the run around them.

use crate::config_error::{invalid, ConfigError};
use serde::{Deserialize, Serialize};

/// `[compress]`: the data-parallel gradient compressor, applied per bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressSection {
    /// none, fp16, bf16, topk, dgc_topk, randk, threshold, qsgd, terngrad, sign, powersgd.
    pub method: String,
    /// Fraction kept by topk / dgc_topk / randk.
    pub ratio: f64,
    /// PowerSGD's rank.
    pub rank: usize,
    /// QSGD's levels.
    pub levels: u32,
    /// Elements per scale (qsgd, terngrad, sign).
    pub chunk: usize,
    /// threshold's cut.
    pub threshold: f32,
    /// Keep what compression dropped and add it back next step.
    pub error_feedback: bool,
    /// Fraction of the magnitudes dgc_topk samples to estimate its threshold.
    pub sample_ratio: f64,
    /// DGC's momentum correction (0: off; DGC uses 0.9): each rank accumulates the
    /// velocity `u = m u + g` and compresses that, clearing sent coordinates (momentum
    /// factor masking). The velocity is then the step's first moment, so AdamW must run
    /// with `train.beta1 = 0` (its second moment still normalises the update, and is
    /// scale-free, so the velocity's 1/(1-m) gain does not change the step size).
    pub momentum_correction: f32,
    /// DGC's local gradient clipping (0: off): each rank clips its gradient of each
    /// bucket to this L2 norm times `dp^-1/2` before accumulating it.
    pub local_clip: f32,
    /// DGC's sparsity warm-up (0: none): over this many steps the kept fraction of topk,
    /// dgc_topk and randk falls geometrically from 25% to `ratio`.
    pub warmup_steps: u64,
    /// topk, dgc_topk: every layer of a bucket keeps `ratio` of its own elements, as DGC
    /// selects layer by layer, instead of one selection over the bucket (false). On the
    /// ml-100k recipe the layer-wise form converged slower (see the convergence bench).
    pub layerwise: bool,
    /// topk, dgc_topk, threshold: rank coordinates by their accumulated value over the
    /// root of this rank's running mean of their squared gradient, with this decay (0:
    /// off, by magnitude), as Adam scales its update.
    pub normalized_selection: f32,
    /// topk, dgc_topk, threshold: the kept values travel as `f32` or `bf16` (2 bytes; the
    /// rounding error stays in the error-feedback residual).
    pub sparse_values: String,
}

impl Default for CompressSection {
    fn default() -> Self {
        Self {
            method: "none".into(),
            ratio: 0.01,
            rank: 4,
            levels: 15,
            chunk: 512,
            threshold: 1e-3,
            error_feedback: true,
            sample_ratio: 0.01,
            momentum_correction: 0.0,
            local_clip: 0.0,
            warmup_steps: 0,
            layerwise: false,
            normalized_selection: 0.0,
            sparse_values: "f32".into(),
        }
    }
}

impl CompressSection {
    /// The compressor this section names, validated.
    pub fn method_config(&self) -> Result<meshrec_compress::MethodConfig, ConfigError> {
        use meshrec_compress::MethodConfig as M;
        let m = match self.method.as_str() {
            "none" | "identity" => M::Identity,
            "fp16" => M::Fp16,
            "bf16" => M::Bf16,
            "topk" => M::TopK { ratio: self.ratio },
            "dgc_topk" => M::DgcTopK {
                ratio: self.ratio,
                sample_ratio: self.sample_ratio,
            },
            "randk" => M::RandK {
                ratio: self.ratio,
                unbiased: false,
            },
            "threshold" => M::Threshold {
                threshold: self.threshold,
            },
            "qsgd" => M::Qsgd {
                levels: self.levels,
                bucket: self.chunk,
            },
            "terngrad" => M::TernGrad { chunk: self.chunk },
            "sign" => M::Sign { chunk: self.chunk },
            "powersgd" => M::PowerSgd {
                rank: self.rank,
                min_compression_rate: 1.0,
            },
            other => {
                return Err(invalid(
                    "compress.method",
                    format!("`{other}`: expected none, fp16, bf16, topk, dgc_topk, randk, threshold, qsgd, terngrad, sign or powersgd"),
                ))
            }
        };
        m.validate()
            .map_err(|e| invalid("compress.method", e.to_string()))?;
        Ok(m)
    }

    /// The per-bucket compressor state options for a DP group of `dp` replicas (DGC's
    /// local clip is the configured norm times `dp^-1/2`, as the paper scales it).
    pub fn memory_options(&self, dp: usize, seed: u64) -> meshrec_compress::MemoryOptions {
        meshrec_compress::MemoryOptions {
            error_feedback: self.error_feedback,
            momentum: (self.momentum_correction > 0.0).then_some(self.momentum_correction),
            local_clip: (self.local_clip > 0.0)
                .then(|| self.local_clip / (dp.max(1) as f32).sqrt()),
            sparsity_warmup_steps: self.warmup_steps,
            layerwise_selection: self.layerwise,
            normalized_selection: (self.normalized_selection > 0.0)
                .then_some(self.normalized_selection),
            bf16_values: self.sparse_values == "bf16",
            seed,
        }
    }

    /// DGC's corrections checked against the method and the run around them.
    pub(crate) fn validate_dgc(
        &self,
        method: &meshrec_compress::MethodConfig,
        dp: usize,
        beta1: f32,
    ) -> Result<(), ConfigError> {
        use meshrec_compress::MethodConfig as M;
        let b = self.normalized_selection;
        if !(b.is_finite() && (0.0..1.0).contains(&b)) {
            return Err(invalid(
                "compress.normalized_selection",
                "must be in [0, 1) (0: off)",
            ));
        }
        let sparsifier = method.method().is_sparse();
        if b > 0.0 && !sparsifier {
            return Err(invalid(
                "compress.normalized_selection",
                "ranks what a sparsifier keeps: needs topk, dgc_topk or threshold",
            ));
        }
        match self.sparse_values.as_str() {
            "f32" => {}
            "bf16" if sparsifier => {}
            "bf16" => {
                return Err(invalid(
                    "compress.sparse_values",
                    "bf16 values are for a sparsifier's payload: topk, dgc_topk or threshold",
                ))
            }
            other => {
                return Err(invalid(
                    "compress.sparse_values",
                    format!("`{other}`: expected f32 or bf16"),
                ))
            }
        }
        let m = self.momentum_correction;
        if !(m.is_finite() && (0.0..1.0).contains(&m)) {
            return Err(invalid(
                "compress.momentum_correction",
                "must be in [0, 1) (0: off)",
            ));
        }
        if m > 0.0 {
            if !sparsifier {
                return Err(invalid(
                    "compress.momentum_correction",
                    "needs a sparsifier that sends its own indices: topk, dgc_topk or threshold",
                ));
            }
            if !self.error_feedback {
                return Err(invalid(
                    "compress.momentum_correction",
                    "accumulates in the error-feedback residual: set compress.error_feedback = true",
                ));
            }
            if dp < 2 {
                return Err(invalid(
                    "compress.momentum_correction",
                    "compression runs only between DP replicas: needs parallel.dp >= 2",
                ));
            }
            if beta1 != 0.0 {
                return Err(invalid(
                    "compress.momentum_correction",
                    "the compressed velocity is already the first moment: set train.beta1 = 0 so AdamW does not apply a second momentum",
                ));
            }
        }
        if !(self.local_clip.is_finite() && self.local_clip >= 0.0) {
            return Err(invalid(
                "compress.local_clip",
                "must be zero (off) or a positive norm",
            ));
        }
        if self.warmup_steps > 0
            && !matches!(method, M::TopK { .. } | M::DgcTopK { .. } | M::RandK { .. })
        {
            return Err(invalid(
                "compress.warmup_steps",
                "warms a kept fraction up: needs topk, dgc_topk or randk",
            ));
        }
        Ok(())
    }
}
