//! `ModelShape`: the one place where meshrec's parameter, FLOP and activation formulas live.
//!
//! The model crate converts its config into a [`ModelShape`] and calls these; the cost model,
//! the simulator and the planner use nothing else. Conventions (as in Megatron-LM's
//! "Efficient Large-Scale Language Model Training", Narayanan et al. 2021):
//!
//! * a multiply-add counts as **2 FLOPs**; `d` = `d_model`, `f` = `d_ff`, `s` = `seq_len`,
//!   `a` = `n_heads`, `V` = `vocab` (the whole item catalogue, padding included);
//! * forward FLOPs **per token**:
//!   - embedding: a gather, 0 FLOPs (it moves `d` values);
//!   - transformer block: Q, K, V and output projections `8·d²`; attention scores `QKᵀ`
//!     and the weighted sum `PV` `4·s·d` (the full `s×s` square, as Megatron counts it,
//!     although causal masking skips half); MLP `6·d·f` for SwiGLU (gate, up, down) or
//!     `4·d·f` for GELU (up, down); norms, softmax and residuals are `O(d + a·s)` and
//!     counted only as memory traffic by the cost model;
//!   - output head: logits `2·d·V` plus [`SOFTMAX_FLOPS_PER_LOGIT`] per logit for the
//!     softmax cross-entropy over the whole catalogue;
//! * backward = 2 × forward (input gradient and weight gradient, each as costly as the
//!   forward product); the embedding's backward is a scatter-add of `d` values per token;
//! * activations stashed for backward per token per block (the element counts of
//!   Korthikanti et al. 2022, "Reducing Activation Recomputation", without dropout masks):
//!   residual inputs and norm outputs `4·d`, Q/K/V `3·d`, attention scores and
//!   probabilities `2·a·s`, attention context `d`, MLP intermediates `4·f` (SwiGLU: gate,
//!   up, silu(gate), product) or `2·f` (GELU: pre- and post-activation); times the
//!   activation element size. Under tensor parallelism everything except the residual and
//!   norm part (`4·d`) is split `t` ways (no sequence parallelism). Recomputation keeps
//!   less: selective drops the `2·a·s` scores and probabilities (recomputed from Q, K, V,
//!   whose `4·s·d` FLOPs backward runs again), full keeps the block's input `d` only (and
//!   runs the whole block forward again).

use meshrec_pipeline::{Recompute, ZeroStage};
use serde::{Deserialize, Serialize};

use crate::error::BalanceError;

/// FLOPs per logit for the softmax cross-entropy (max, subtract, exp, sum, and the
/// `softmax − one-hot` gradient); modelled, small next to the `2·d` of the logit itself.
pub const SOFTMAX_FLOPS_PER_LOGIT: f64 = 5.0;

/// The feed-forward block's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MlpKind {
    /// `down(silu(gate(x)) * up(x))`: three `d×f` matrices.
    SwiGlu,
    /// `down(gelu(up(x)))`: two `d×f` matrices.
    Gelu,
}

/// Position encoding: RoPE has no parameters, learned positions add `s·d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Positions {
    /// Rotary embedding applied to Q and K; no parameters.
    Rope,
    /// A learned `[seq_len, d_model]` table added to the item embedding.
    Learned,
}

/// Bytes per element of each kind of training state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Precision {
    /// Bytes per parameter as stored for compute (4 for fp32, 2 for bf16).
    pub param_bytes: u32,
    /// Bytes per gradient element (what DP reduces and what travels on the wire).
    pub grad_bytes: u32,
    /// Bytes per parameter of optimizer state (AdamW fp32 m and v: 8; plus an fp32
    /// master copy under mixed precision: 12).
    pub optimizer_bytes: u32,
    /// Bytes per activation element (stashed and sent between stages).
    pub activation_bytes: u32,
}

impl Precision {
    /// Everything in fp32 with AdamW: 4 + 4 + 8 = 16 bytes of state per parameter.
    /// This is what meshrec trains with on the CPU.
    pub const fn fp32() -> Self {
        Self {
            param_bytes: 4,
            grad_bytes: 4,
            optimizer_bytes: 8,
            activation_bytes: 4,
        }
    }

    /// bf16 weights, gradients and activations with fp32 master weights and AdamW
    /// states: 2 + 2 + 12 = 16 bytes per parameter, as in Megatron/ZeRO accounting.
    pub const fn mixed_bf16() -> Self {
        Self {
            param_bytes: 2,
            grad_bytes: 2,
            optimizer_bytes: 12,
            activation_bytes: 2,
        }
    }

    /// What one rank of a DP group of `dp` holds for `params` parameters (its slice of
    /// the model) under ZeRO stage `zero`: weights whole, gradients `/dp` under ZeRO-2,
    /// optimizer state `/dp` under ZeRO-1 and 2 (Rajbhandari et al.'s accounting).
    pub fn rank_state_bytes(&self, params: u64, dp: usize, zero: ZeroStage) -> StateBytes {
        let n = params as f64;
        let per = |bytes: u32, sharded: bool| {
            let b = n * f64::from(bytes);
            if sharded {
                b / dp.max(1) as f64
            } else {
                b
            }
        };
        StateBytes {
            param: per(self.param_bytes, false),
            grad: per(self.grad_bytes, zero.shards_gradients()),
            optimizer: per(self.optimizer_bytes, zero.shards_optimizer()),
        }
    }

    /// Resident bytes per parameter: weights, gradients and optimizer state.
    pub fn state_bytes_per_param(&self) -> u64 {
        u64::from(self.param_bytes) + u64::from(self.grad_bytes) + u64::from(self.optimizer_bytes)
    }
}

/// The architecture of the recommender as the cost side sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Human-readable name (preset name or "custom").
    pub name: String,
    /// Rows of the item embedding: the whole catalogue, padding and special ids included.
    pub vocab: u64,
    /// Hidden size `d`.
    pub d_model: u64,
    /// Number of transformer blocks.
    pub n_layers: u32,
    /// Attention heads; must divide `d_model`.
    pub n_heads: u32,
    /// MLP hidden size `f`.
    pub d_ff: u64,
    /// Sequence length `s` (tokens per training sequence).
    pub seq_len: u64,
    /// MLP kind.
    pub mlp: MlpKind,
    /// Position encoding.
    pub positions: Positions,
    /// Whether the output head reuses the item embedding (no extra `V·d` parameters).
    pub tied_head: bool,
    /// Whether linear layers carry biases.
    pub bias: bool,
    /// Element sizes of weights, gradients, optimizer state and activations.
    pub precision: Precision,
}

/// Which part of the model a layer index refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// Item embedding (and learned positions): always on the first pipeline stage.
    Embedding,
    /// Transformer block `i` (0-based).
    Block(u32),
    /// Final norm, output head and softmax cross-entropy: always on the last stage.
    Head,
}

impl ModelShape {
    /// A recommender shape with SwiGLU, RoPE, a tied head, no biases and fp32 training,
    /// checked by [`ModelShape::validate`].
    pub fn new(
        name: impl Into<String>,
        vocab: u64,
        d_model: u64,
        n_layers: u32,
        n_heads: u32,
        d_ff: u64,
        seq_len: u64,
    ) -> Result<Self, BalanceError> {
        let shape = Self {
            name: name.into(),
            vocab,
            d_model,
            n_layers,
            n_heads,
            d_ff,
            seq_len,
            mlp: MlpKind::SwiGlu,
            positions: Positions::Rope,
            tied_head: true,
            bias: false,
            precision: Precision::fp32(),
        };
        shape.validate()?;
        Ok(shape)
    }

    /// About 90M parameters, most of them in a 200k-item catalogue: `d` 384, 8 blocks,
    /// 6 heads. Simulator preset (bf16 mixed precision), not something this machine trains.
    pub fn preset_100m() -> Self {
        Self {
            name: "100m".into(),
            vocab: 200_000,
            d_model: 384,
            n_layers: 8,
            n_heads: 6,
            d_ff: 1024,
            seq_len: 200,
            mlp: MlpKind::SwiGlu,
            positions: Positions::Rope,
            tied_head: true,
            bias: false,
            precision: Precision::mixed_bf16(),
        }
    }

    /// About 1B parameters, 0.6B of them in a 600k-item catalogue: `d` 1024, 32 blocks,
    /// 16 heads. Simulator preset (bf16 mixed precision).
    pub fn preset_1b() -> Self {
        Self {
            name: "1b".into(),
            vocab: 600_000,
            d_model: 1024,
            n_layers: 32,
            n_heads: 16,
            d_ff: 2816,
            seq_len: 200,
            mlp: MlpKind::SwiGlu,
            positions: Positions::Rope,
            tied_head: true,
            bias: false,
            precision: Precision::mixed_bf16(),
        }
    }

    /// Names [`ModelShape::preset_by_name`] knows.
    pub const PRESET_NAMES: [&'static str; 2] = ["100m", "1b"];

    /// The simulator preset called `name` (case-insensitive): `100m`
    /// ([`ModelShape::preset_100m`]) or `1b` ([`ModelShape::preset_1b`]). An unknown name is
    /// an error that lists the known ones.
    pub fn preset_by_name(name: &str) -> Result<Self, BalanceError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "100m" => Ok(Self::preset_100m()),
            "1b" => Ok(Self::preset_1b()),
            other => Err(BalanceError::InvalidShape(format!(
                "unknown model preset {other:?} (known: {})",
                Self::PRESET_NAMES.join(", ")
            ))),
        }
    }

    /// What a layout must fit of this model: the sizes tensor and pipeline parallelism cut.
    pub fn dims(&self) -> meshrec_pipeline::ModelDims {
        let size = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
        meshrec_pipeline::ModelDims {
            n_heads: self.n_heads as usize,
            d_ff: size(self.d_ff),
            vocab: size(self.vocab),
            n_layers: self.n_layers as usize,
        }
    }

    /// Checks that every size is positive and that heads divide `d_model`.
    pub fn validate(&self) -> Result<(), BalanceError> {
        let positive = [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("n_layers", u64::from(self.n_layers)),
            ("n_heads", u64::from(self.n_heads)),
            ("d_ff", self.d_ff),
            ("seq_len", self.seq_len),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(BalanceError::InvalidShape(format!(
                    "{field} must be positive"
                )));
            }
        }
        if !self.d_model.is_multiple_of(u64::from(self.n_heads)) {
            return Err(BalanceError::InvalidShape(format!(
                "n_heads {} does not divide d_model {}",
                self.n_heads, self.d_model
            )));
        }
        let p = self.precision;
        if p.param_bytes == 0 || p.grad_bytes == 0 || p.activation_bytes == 0 {
            return Err(BalanceError::InvalidShape(
                "precision element sizes must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Number of pipeline-partitionable layers: embedding, `n_layers` blocks, head.
    pub fn n_partition_layers(&self) -> usize {
        self.n_layers as usize + 2
    }

    /// Kind of partition layer `index` (0 = embedding, last = head).
    pub fn layer_kind(&self, index: usize) -> Option<LayerKind> {
        let n = self.n_partition_layers();
        match index {
            0 => Some(LayerKind::Embedding),
            i if i + 1 == n => Some(LayerKind::Head),
            i if i < n => Some(LayerKind::Block((i - 1) as u32)),
            _ => None,
        }
    }

    fn mlp_matrices(&self) -> u64 {
        match self.mlp {
            MlpKind::SwiGlu => 3,
            MlpKind::Gelu => 2,
        }
    }

    /// Parameters of the embedding layer: `V·d` (+ `s·d` for learned positions).
    pub fn embedding_params(&self) -> u64 {
        let pos = match self.positions {
            Positions::Rope => 0,
            Positions::Learned => self.seq_len * self.d_model,
        };
        self.vocab * self.d_model + pos
    }

    /// Parameters of one transformer block: attention `4·d²` (+`4·d` biases), MLP
    /// `3·d·f` or `2·d·f` (+ biases), two RMSNorm weights `2·d`.
    pub fn block_params(&self) -> u64 {
        let d = self.d_model;
        let f = self.d_ff;
        let attn = 4 * d * d + if self.bias { 4 * d } else { 0 };
        let mlp_bias = match (self.bias, self.mlp) {
            (false, _) => 0,
            (true, MlpKind::SwiGlu) => 2 * f + d,
            (true, MlpKind::Gelu) => f + d,
        };
        let mlp = self.mlp_matrices() * d * f + mlp_bias;
        attn + mlp + 2 * d
    }

    /// Parameters of the head: the final norm `d`, plus `V·d` when not tied.
    pub fn head_params(&self) -> u64 {
        let untied = if self.tied_head {
            0
        } else {
            self.vocab * self.d_model
        };
        self.d_model + untied
    }

    /// Total parameter count.
    pub fn params(&self) -> u64 {
        self.embedding_params()
            + u64::from(self.n_layers) * self.block_params()
            + self.head_params()
    }

    /// Parameters of partition layer `index`.
    pub fn layer_params(&self, index: usize) -> Option<u64> {
        Some(match self.layer_kind(index)? {
            LayerKind::Embedding => self.embedding_params(),
            LayerKind::Block(_) => self.block_params(),
            LayerKind::Head => self.head_params(),
        })
    }

    /// Forward FLOPs per token of one block: `8·d² + 4·s·d + (6 or 4)·d·f`.
    pub fn block_fwd_flops_per_token(&self) -> f64 {
        let d = self.d_model as f64;
        let f = self.d_ff as f64;
        let s = self.seq_len as f64;
        8.0 * d * d + 4.0 * s * d + 2.0 * self.mlp_matrices() as f64 * d * f
    }

    /// Forward FLOPs per token of the head: `2·d·V + 5·V`.
    pub fn head_fwd_flops_per_token(&self) -> f64 {
        let v = self.vocab as f64;
        2.0 * self.d_model as f64 * v + SOFTMAX_FLOPS_PER_LOGIT * v
    }

    /// Forward FLOPs per token of partition layer `index` (embedding: 0).
    pub fn layer_fwd_flops_per_token(&self, index: usize) -> Option<f64> {
        Some(match self.layer_kind(index)? {
            LayerKind::Embedding => 0.0,
            LayerKind::Block(_) => self.block_fwd_flops_per_token(),
            LayerKind::Head => self.head_fwd_flops_per_token(),
        })
    }

    /// Forward FLOPs per token of the whole model.
    pub fn fwd_flops_per_token(&self) -> f64 {
        f64::from(self.n_layers) * self.block_fwd_flops_per_token()
            + self.head_fwd_flops_per_token()
    }

    /// Forward + backward FLOPs per token (backward = 2 × forward).
    pub fn train_flops_per_token(&self) -> f64 {
        3.0 * self.fwd_flops_per_token()
    }

    /// Activation elements stashed per token by one block when split over `tp` ranks
    /// (see the module docs): `4·d + (4·d + 2·a·s + mlp)/tp`.
    pub fn block_activation_elems_per_token(&self, tp: u32) -> f64 {
        self.block_activation_elems_per_token_under(tp, ActivationPolicy::default())
    }

    /// Activation elements a block keeps per token for backward under `policy`: everything
    /// (`none`), all but the attention's `2·a·s` scores and probabilities (`selective`), or
    /// its input `d` only (`full`); with sequence parallelism the replicated part (`4·d`,
    /// or the full recomputation's input) is split `tp` ways too (Korthikanti et al.).
    pub fn block_activation_elems_per_token_under(&self, tp: u32, policy: ActivationPolicy) -> f64 {
        let d = self.d_model as f64;
        let t = f64::from(tp.max(1));
        let replicated = if policy.sequence_parallel {
            1.0 / t
        } else {
            1.0
        };
        if policy.recompute == Recompute::Full {
            return d * replicated;
        }
        let f = self.d_ff as f64;
        let s = self.seq_len as f64;
        let a = f64::from(self.n_heads);
        let mlp = match self.mlp {
            MlpKind::SwiGlu => 4.0 * f,
            MlpKind::Gelu => 2.0 * f,
        };
        let scores = if policy.recompute == Recompute::Selective {
            0.0
        } else {
            2.0 * a * s
        };
        4.0 * d * replicated + (4.0 * d + scores + mlp) / t
    }

    /// The activation bytes one micro-batch of `tokens` tokens keeps through the whole model
    /// (one pipeline stage) under `policy`, plus recomputation's working set: one block's
    /// dropped activations, alive while backward runs that block again.
    pub fn model_activation_bytes(&self, tp: u32, policy: ActivationPolicy, tokens: f64) -> f64 {
        let ab = f64::from(self.precision.activation_bytes);
        let block = self.block_activation_elems_per_token_under(tp, policy);
        let kept_all = ActivationPolicy {
            recompute: Recompute::None,
            ..policy
        };
        let dropped = self.block_activation_elems_per_token_under(tp, kept_all) - block;
        let ends: f64 = [0, self.n_partition_layers() - 1]
            .iter()
            .filter_map(|&i| self.layer_activation_bytes_per_token(i, tp))
            .sum();
        (ends + (f64::from(self.n_layers) * block + dropped) * ab) * tokens
    }

    /// The share of a block's forward FLOPs that backward runs again under `recompute`:
    /// none, the attention core `4·s·d` (selective), or all of it (full).
    pub fn block_recompute_share(&self, recompute: Recompute) -> f64 {
        match recompute {
            Recompute::None => 0.0,
            Recompute::Selective => {
                4.0 * (self.seq_len * self.d_model) as f64 / self.block_fwd_flops_per_token()
            }
            Recompute::Full => 1.0,
        }
    }

    /// Activation bytes stashed per token by one block (unsharded).
    pub fn block_activation_bytes_per_token(&self) -> f64 {
        self.block_activation_elems_per_token(1) * f64::from(self.precision.activation_bytes)
    }

    /// Activation bytes stashed per token by partition layer `index` under `tp` ranks.
    /// Embedding: its output `d` (the input of block 0). Head: the final norm's input and
    /// output `2·d`, plus what the fused, row-chunked loss keeps: one `f32` max and one
    /// log-sum-exp per row (never the full logits).
    pub fn layer_activation_bytes_per_token(&self, index: usize, tp: u32) -> Option<f64> {
        let ab = f64::from(self.precision.activation_bytes);
        let d = self.d_model as f64;
        Some(match self.layer_kind(index)? {
            LayerKind::Embedding => d * ab,
            LayerKind::Block(_) => self.block_activation_elems_per_token(tp) * ab,
            LayerKind::Head => 2.0 * d * ab + 8.0,
        })
    }

    /// Bytes of the activation crossing a pipeline boundary per token (`d` elements; the
    /// same size flows back as its gradient).
    pub fn boundary_bytes_per_token(&self) -> f64 {
        self.d_model as f64 * f64::from(self.precision.activation_bytes)
    }

    /// Parameter bytes (weights only) of the whole model.
    pub fn param_bytes(&self) -> u64 {
        self.params() * u64::from(self.precision.param_bytes)
    }

    /// Gradient bytes of the whole model (what unsharded DP all-reduces).
    pub fn grad_bytes(&self) -> u64 {
        self.params() * u64::from(self.precision.grad_bytes)
    }

    /// Resident training state (weights + gradients + AdamW state) of the whole model.
    pub fn state_bytes(&self) -> u64 {
        self.params() * self.precision.state_bytes_per_param()
    }
}

/// What blocks keep of their forward for backward: recomputation and sequence
/// parallelism.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationPolicy {
    pub recompute: Recompute,
    pub sequence_parallel: bool,
}

impl ActivationPolicy {
    pub fn recompute(recompute: Recompute) -> Self {
        Self {
            recompute,
            sequence_parallel: false,
        }
    }
}

/// A rank's training-state bytes by kind (see [`Precision::rank_state_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StateBytes {
    pub param: f64,
    pub grad: f64,
    pub optimizer: f64,
}

impl StateBytes {
    pub fn total(&self) -> f64 {
        self.param + self.grad + self.optimizer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Korthikanti et al.'s per-token counts: selective drops the `2·a·s` scores and
    /// probabilities, full keeps the block input `d`; backward reruns `4·s·d` of the
    /// forward (selective) or all of it.
    #[test]
    fn recomputation_keeps_what_the_paper_says() {
        let shape = ModelShape::new("t", 100, 64, 2, 4, 256, 50).unwrap();
        let under = |tp, r| {
            shape.block_activation_elems_per_token_under(tp, ActivationPolicy::recompute(r))
        };
        let none = under(1, Recompute::None);
        let sel = under(1, Recompute::Selective);
        assert_eq!(none - sel, 2.0 * 4.0 * 50.0);
        assert_eq!(under(2, Recompute::Full), 64.0);
        // Sequence parallelism splits the replicated `4·d` (norm inputs, residuals) too.
        let sp = ActivationPolicy {
            recompute: Recompute::None,
            sequence_parallel: true,
        };
        assert_eq!(
            under(2, Recompute::None) - shape.block_activation_elems_per_token_under(2, sp),
            4.0 * 64.0 / 2.0
        );
        assert_eq!(shape.block_recompute_share(Recompute::None), 0.0);
        assert_eq!(shape.block_recompute_share(Recompute::Full), 1.0);
        let share = shape.block_recompute_share(Recompute::Selective);
        assert!((share * shape.block_fwd_flops_per_token() - 4.0 * 50.0 * 64.0).abs() < 1e-6);
    }

    /// ZeRO's accounting for fp32 AdamW over 4 ranks: 16, 4 + 4 + 8/4 and 4 + 12/4 bytes
    /// per parameter.
    #[test]
    fn zero_stages_shard_the_state_as_the_paper_counts() {
        let per = |zero| Precision::fp32().rank_state_bytes(1000, 4, zero).total() / 1000.0;
        assert_eq!(per(ZeroStage::Off), 16.0);
        assert_eq!(per(ZeroStage::Optimizer), 10.0);
        assert_eq!(per(ZeroStage::Gradients), 7.0);
    }

    fn gpt2_like() -> ModelShape {
        // GPT-2 small's well-known 124M with untied head counted separately: d 768,
        // 12 layers, f 3072, GELU, biases, learned positions over 1024, tied head.
        ModelShape {
            name: "gpt2".into(),
            vocab: 50257,
            d_model: 768,
            n_layers: 12,
            n_heads: 12,
            d_ff: 3072,
            seq_len: 1024,
            mlp: MlpKind::Gelu,
            positions: Positions::Learned,
            tied_head: true,
            bias: true,
            precision: Precision::fp32(),
        }
    }

    #[test]
    fn gpt2_parameter_count_matches_the_known_124m() {
        // GPT-2 small has 124,439,808 parameters with LayerNorm (weight + bias). We use
        // RMSNorm (weight only): 2 norms per block and the final norm lose d each.
        let s = gpt2_like();
        let layernorm_biases = 768 * (2 * 12 + 1);
        assert_eq!(s.params() + layernorm_biases, 124_439_808);
    }

    #[test]
    fn flops_follow_the_documented_formulas() {
        let s = ModelShape::new("t", 1000, 64, 2, 4, 256, 50).unwrap();
        let d = 64.0;
        let f = 256.0;
        let block = 8.0 * d * d + 4.0 * 50.0 * d + 6.0 * d * f;
        assert_eq!(s.block_fwd_flops_per_token(), block);
        assert_eq!(
            s.head_fwd_flops_per_token(),
            2.0 * d * 1000.0 + 5.0 * 1000.0
        );
        assert_eq!(
            s.train_flops_per_token(),
            3.0 * (2.0 * block + s.head_fwd_flops_per_token())
        );
        // Roughly 6·N FLOPs per token for the dense part (the classic estimate).
        let dense_params = 2.0 * s.block_params() as f64;
        let dense_train = 3.0 * 2.0 * block;
        assert!(dense_train > 6.0 * dense_params);
    }

    #[test]
    fn bad_shapes_are_rejected_with_the_field_named() {
        let err = ModelShape::new("x", 10, 64, 2, 5, 128, 8).unwrap_err();
        assert!(
            err.to_string()
                .contains("n_heads 5 does not divide d_model 64"),
            "{err}"
        );
        let err = ModelShape::new("x", 0, 64, 2, 4, 128, 8).unwrap_err();
        assert!(err.to_string().contains("vocab"), "{err}");
    }

    #[test]
    fn presets_have_the_advertised_sizes() {
        let small = ModelShape::preset_100m();
        let big = ModelShape::preset_1b();
        small.validate().unwrap();
        big.validate().unwrap();
        assert!(
            (80e6..130e6).contains(&(small.params() as f64)),
            "{}",
            small.params()
        );
        assert!(
            (0.9e9..1.4e9).contains(&(big.params() as f64)),
            "{}",
            big.params()
        );
    }

    #[test]
    fn presets_are_found_by_name_and_unknown_names_list_the_known_ones() {
        assert_eq!(
            ModelShape::preset_by_name("1B").unwrap(),
            ModelShape::preset_1b()
        );
        assert_eq!(
            ModelShape::preset_by_name("100m").unwrap(),
            ModelShape::preset_100m()
        );
        for name in ModelShape::PRESET_NAMES {
            assert_eq!(ModelShape::preset_by_name(name).unwrap().name, name);
        }
        let e = ModelShape::preset_by_name("7b").unwrap_err().to_string();
        assert!(e.contains("\"7b\"") && e.contains("100m, 1b"), "{e}");
    }

    #[test]
    fn tensor_parallelism_shrinks_only_the_shardable_activations() {
        let s = ModelShape::preset_100m();
        let full = s.block_activation_elems_per_token(1);
        let half = s.block_activation_elems_per_token(2);
        let d = s.d_model as f64;
        assert!((full - 4.0 * d - 2.0 * (half - 4.0 * d)).abs() < 1e-9);
    }

    #[test]
    fn layer_kinds_cover_embedding_blocks_and_head() {
        let s = ModelShape::new("t", 10, 8, 3, 2, 16, 4).unwrap();
        assert_eq!(s.layer_kind(0), Some(LayerKind::Embedding));
        assert_eq!(s.layer_kind(3), Some(LayerKind::Block(2)));
        assert_eq!(s.layer_kind(4), Some(LayerKind::Head));
        assert_eq!(s.layer_kind(5), None);
        let total: u64 = (0..s.n_partition_layers())
            .map(|i| s.layer_params(i).unwrap())
            .sum();
        assert_eq!(total, s.params());
    }
}
