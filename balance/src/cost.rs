//! Per-layer cost profiles: forward/backward seconds, parameter/state/activation bytes and
//! the communication volumes tensor and pipeline parallelism add, either measured by the
//! trainer or modelled from a [`ModelShape`] and a [`DeviceSpec`] with a roofline.
//!
//! Layer 0 is the embedding, layers `1..=n_layers` the transformer blocks, the last layer
//! the head (final norm, output projection, softmax cross-entropy over the catalogue).
//! All sizes are per micro-batch of `micro_batch` sequences and per rank of a TP group.

use meshrec_comm::cost::{all_reduce_time, p2p_time, LinkClass};
use serde::{Deserialize, Serialize};

use crate::device::{DeviceSpec, LossPlacement};
use crate::error::BalanceError;
use crate::shape::{LayerKind, ModelShape};

/// Where a profile's times came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProfileSource {
    /// Timed on real hardware by the trainer.
    Measured,
    /// Derived from FLOPs and bytes with the roofline of the named device.
    Modelled {
        /// Device name.
        device: String,
    },
}

/// Cost of one partition layer on one rank for one micro-batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCost {
    /// Embedding, block or head.
    pub kind: LayerKind,
    /// Forward compute seconds (TP communication excluded).
    pub fwd_s: f64,
    /// Backward compute seconds (TP communication excluded).
    pub bwd_s: f64,
    /// Weight bytes held by this rank.
    pub param_bytes: u64,
    /// Gradient bytes this rank reduces over DP.
    pub grad_bytes: u64,
    /// Resident bytes: weights, gradients and optimizer state.
    pub state_bytes: u64,
    /// Activation bytes stashed for backward per in-flight micro-batch.
    pub act_bytes: u64,
    /// Bytes of this layer's output per micro-batch: what a pipeline boundary after it sends
    /// forward (its gradient, of the same size, comes back).
    pub out_bytes: u64,
    /// Payload bytes of each TP all-reduce in forward, one entry per all-reduce.
    pub tp_fwd_allreduce_bytes: Vec<u64>,
    /// Payload bytes of each TP all-reduce in backward.
    pub tp_bwd_allreduce_bytes: Vec<u64>,
    /// State bytes of a tied embedding copy the head's stage must also hold (and reduce
    /// with the first stage) when the head is not on the embedding's stage; 0 otherwise.
    pub tied_copy_state_bytes: u64,
    /// Gradient bytes of that tied copy.
    pub tied_copy_grad_bytes: u64,
}

impl LayerCost {
    /// A layer from measured numbers, without TP communication.
    pub fn measured(
        kind: LayerKind,
        fwd_s: f64,
        bwd_s: f64,
        param_bytes: u64,
        state_bytes: u64,
        act_bytes: u64,
        out_bytes: u64,
    ) -> Self {
        Self {
            kind,
            fwd_s,
            bwd_s,
            param_bytes,
            grad_bytes: param_bytes,
            state_bytes,
            act_bytes,
            out_bytes,
            tp_fwd_allreduce_bytes: Vec::new(),
            tp_bwd_allreduce_bytes: Vec::new(),
            tied_copy_state_bytes: 0,
            tied_copy_grad_bytes: 0,
        }
    }

    /// Forward + backward compute seconds.
    pub fn train_s(&self) -> f64 {
        self.fwd_s + self.bwd_s
    }

    /// Seconds of this layer's blocking TP all-reduces in forward over `tp` ranks joined
    /// by `link` (`meshrec_comm::cost::all_reduce_time` per payload).
    pub fn tp_fwd_comm_s(&self, tp: usize, link: &LinkClass) -> f64 {
        self.tp_fwd_allreduce_bytes
            .iter()
            .map(|&b| all_reduce_time(tp, b as f64, link))
            .sum()
    }

    /// Seconds of this layer's blocking TP all-reduces in backward.
    pub fn tp_bwd_comm_s(&self, tp: usize, link: &LinkClass) -> f64 {
        self.tp_bwd_allreduce_bytes
            .iter()
            .map(|&b| all_reduce_time(tp, b as f64, link))
            .sum()
    }

    /// Seconds per micro-batch of a pipeline boundary after this layer: the activation
    /// forward and its gradient back, one point-to-point message each over `link`.
    pub fn boundary_s(&self, link: &LinkClass) -> f64 {
        2.0 * p2p_time(self.out_bytes as f64, link)
    }
}

/// The cost of every partition layer of a model on one kind of device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostProfile {
    /// Measured or modelled.
    pub source: ProfileSource,
    /// Sequences per micro-batch the numbers are for.
    pub micro_batch: u64,
    /// Tensor-parallel degree the numbers are for.
    pub tp: u32,
    /// Embedding, blocks, head.
    pub layers: Vec<LayerCost>,
}

fn bad(msg: String) -> BalanceError {
    BalanceError::InvalidProfile(msg)
}

impl CostProfile {
    /// A profile from layer costs the trainer measured (`tp` 1). Layer 0 must be the
    /// embedding, the last the head, and at least one block in between; times must be
    /// finite and non-negative.
    pub fn measured(micro_batch: u64, layers: Vec<LayerCost>) -> Result<Self, BalanceError> {
        let profile = Self {
            source: ProfileSource::Measured,
            micro_batch,
            tp: 1,
            layers,
        };
        profile.validate()?;
        Ok(profile)
    }

    /// Checks the layer order and that every number is usable.
    pub fn validate(&self) -> Result<(), BalanceError> {
        let n = self.layers.len();
        if n < 3 {
            return Err(bad(format!(
                "{n} layers: need the embedding, at least one block and the head"
            )));
        }
        if self.micro_batch == 0 {
            return Err(bad("micro_batch is 0".into()));
        }
        if self.layers[0].kind != LayerKind::Embedding {
            return Err(bad(format!(
                "layer 0 is {:?}, expected Embedding",
                self.layers[0].kind
            )));
        }
        if self.layers[n - 1].kind != LayerKind::Head {
            return Err(bad(format!(
                "layer {} is {:?}, expected Head",
                n - 1,
                self.layers[n - 1].kind
            )));
        }
        for (i, l) in self.layers.iter().enumerate() {
            if i > 0 && i + 1 < n && !matches!(l.kind, LayerKind::Block(_)) {
                return Err(bad(format!("layer {i} is {:?}, expected a Block", l.kind)));
            }
            for (what, v) in [("fwd_s", l.fwd_s), ("bwd_s", l.bwd_s)] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(bad(format!(
                        "layer {i}: {what} = {v} is not a finite time >= 0"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Number of partition layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether there are no layers (never true for a validated profile).
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Number of transformer blocks.
    pub fn n_blocks(&self) -> usize {
        self.layers.len().saturating_sub(2)
    }

    /// Forward + backward compute seconds of layers `range`.
    pub fn train_s(&self, range: std::ops::Range<usize>) -> f64 {
        self.layers[range].iter().map(LayerCost::train_s).sum()
    }

    /// Roofline-modelled profile of `shape` on `device` for micro-batches of `micro_batch`
    /// sequences, sharded over `tp` ranks (Megatron: heads, MLP hidden and vocabulary
    /// split; the embedding and softmax vocab-parallel). Each layer's time is the sum of
    /// its kernels' rooflines `max(flops / achieved FLOP/s, bytes / achieved bandwidth)`;
    /// see [`crate::shape`] for the FLOP formulas. Kernel byte counts (modelled):
    /// projections and MLP read their weight shard once per micro-batch and read/write
    /// their activations; attention materialises scores and probabilities (no flash
    /// attention); the loss is the fused, row-chunked one, writing and re-reading each
    /// logit chunk once; backward moves twice the bytes and does twice the FLOPs.
    pub fn modelled(
        shape: &ModelShape,
        device: &DeviceSpec,
        micro_batch: u64,
        tp: u32,
    ) -> Result<Self, BalanceError> {
        shape.validate()?;
        device.validate()?;
        if micro_batch == 0 {
            return Err(bad("micro_batch is 0".into()));
        }
        if tp == 0 || !shape.n_heads.is_multiple_of(tp) {
            return Err(BalanceError::InvalidLayout {
                layout: format!("tp{tp}"),
                reason: format!("tp must divide n_heads {}", shape.n_heads),
            });
        }
        let p = shape.precision;
        let (pb, gb, ab) = (
            f64::from(p.param_bytes),
            f64::from(p.grad_bytes),
            f64::from(p.activation_bytes),
        );
        let t = f64::from(tp);
        let tok = (micro_batch * shape.seq_len) as f64;
        let d = shape.d_model as f64;
        let f = shape.d_ff as f64;
        let s = shape.seq_len as f64;
        let a = f64::from(shape.n_heads);
        let v = shape.vocab as f64;
        let k = match shape.mlp {
            crate::shape::MlpKind::SwiGlu => 3.0,
            crate::shape::MlpKind::Gelu => 2.0,
        };
        let rf = |flops: f64, bytes: f64| device.roofline_s(flops, bytes);
        // fwd and bwd of one kernel: bwd does 2x FLOPs and moves 2x bytes.
        let kern = |flops: f64, bytes: f64| (rf(flops, bytes), rf(2.0 * flops, 2.0 * bytes));
        let sum = |ks: &[(f64, f64)]| {
            ks.iter()
                .fold((0.0, 0.0), |acc, k| (acc.0 + k.0, acc.1 + k.1))
        };
        let sharded = |n: u64| (n as f64 / t).ceil() as u64;
        let stbytes = p.state_bytes_per_param();
        let out_bytes = (tok * d * ab) as u64;

        let mut layers = Vec::with_capacity(shape.n_partition_layers());

        // Embedding: gather in forward; backward scatter-adds and writes the dense gradient
        // of its vocabulary shard (what autodiff frameworks materialise).
        let emb_params = sharded(shape.embedding_params());
        let emb_fwd = rf(0.0, tok * d * (pb + ab));
        let emb_bwd = rf(tok * d, tok * d * (ab + gb) + emb_params as f64 * gb);
        layers.push(LayerCost {
            kind: LayerKind::Embedding,
            fwd_s: emb_fwd,
            bwd_s: emb_bwd,
            param_bytes: emb_params * u64::from(p.param_bytes),
            grad_bytes: emb_params * u64::from(p.grad_bytes),
            state_bytes: emb_params * stbytes,
            act_bytes: shape
                .layer_activation_bytes_per_token(0, tp)
                .map_or(0, |x| (x * tok) as u64),
            out_bytes,
            tp_fwd_allreduce_bytes: if tp > 1 { vec![out_bytes] } else { Vec::new() },
            tp_bwd_allreduce_bytes: Vec::new(),
            tied_copy_state_bytes: 0,
            tied_copy_grad_bytes: 0,
        });

        // Transformer block.
        let proj = kern(
            tok * 8.0 * d * d / t,
            4.0 * d * d / t * pb + tok * (2.0 * d + 4.0 * d / t) * ab,
        );
        let attn = kern(
            tok * 4.0 * s * d / t,
            4.0 * tok * a * s / t * ab + tok * 4.0 * d / t * ab,
        );
        let mlp = kern(
            tok * 2.0 * k * d * f / t,
            k * d * f / t * pb + tok * (2.0 * d + (k + 1.0) * f / t) * ab,
        );
        let norms = kern(0.0, 6.0 * tok * d * ab);
        let (blk_fwd, blk_bwd) = sum(&[proj, attn, mlp, norms]);
        let blk_params = sharded(shape.block_params());
        let blk_act = (shape.block_activation_elems_per_token(tp) * ab * tok) as u64;
        for i in 0..shape.n_layers {
            layers.push(LayerCost {
                kind: LayerKind::Block(i),
                fwd_s: blk_fwd,
                bwd_s: blk_bwd,
                param_bytes: blk_params * u64::from(p.param_bytes),
                grad_bytes: blk_params * u64::from(p.grad_bytes),
                state_bytes: blk_params * stbytes,
                act_bytes: blk_act,
                out_bytes,
                tp_fwd_allreduce_bytes: if tp > 1 {
                    vec![out_bytes; 2]
                } else {
                    Vec::new()
                },
                tp_bwd_allreduce_bytes: if tp > 1 {
                    vec![out_bytes; 2]
                } else {
                    Vec::new()
                },
                tied_copy_state_bytes: 0,
                tied_copy_grad_bytes: 0,
            });
        }

        // Head: final norm, logits over the vocabulary shard, fused softmax cross-entropy.
        let norm = kern(0.0, 2.0 * tok * d * ab);
        let logits = kern(
            tok * 2.0 * d * v / t,
            v * d / t * pb + tok * d * ab + tok * v / t * ab,
        );
        let softmax = kern(
            tok * crate::shape::SOFTMAX_FLOPS_PER_LOGIT * v / t,
            2.0 * tok * v / t * ab,
        );
        // Where the trainer runs the loss on a host backend, it copies the table shard and
        // the loss rows (at most every token's) out of the backend's tensors in forward and
        // their gradients back in backward: memcpy traffic, read and written once each. A
        // GPU keeps them on the device (`LossPlacement::Device`): nothing to add.
        let host_copies = match device.loss_placement {
            LossPlacement::Host => {
                let bytes = 2.0 * (v / t * d + tok * d) * 4.0;
                (rf(0.0, bytes), rf(0.0, bytes))
            }
            LossPlacement::Device => (0.0, 0.0),
        };
        let (head_fwd, head_bwd) = sum(&[norm, logits, softmax, host_copies]);
        let head_params = sharded(shape.head_params());
        let table = if shape.tied_head {
            sharded(shape.vocab * shape.d_model)
        } else {
            0
        };
        let scalar_bytes = (tok * 4.0) as u64;
        layers.push(LayerCost {
            kind: LayerKind::Head,
            fwd_s: head_fwd,
            bwd_s: head_bwd,
            param_bytes: head_params * u64::from(p.param_bytes),
            grad_bytes: head_params * u64::from(p.grad_bytes),
            state_bytes: head_params * stbytes,
            act_bytes: shape
                .layer_activation_bytes_per_token(shape.n_partition_layers() - 1, tp)
                .map_or(0, |x| (x * tok) as u64),
            out_bytes: 0,
            // Vocab-parallel cross-entropy: max, sum of exponentials, target logit.
            tp_fwd_allreduce_bytes: if tp > 1 {
                vec![scalar_bytes; 3]
            } else {
                Vec::new()
            },
            // The input gradient is a partial sum over vocabulary shards.
            tp_bwd_allreduce_bytes: if tp > 1 { vec![out_bytes] } else { Vec::new() },
            tied_copy_state_bytes: table * stbytes,
            tied_copy_grad_bytes: table * u64::from(p.grad_bytes),
        });

        Ok(Self {
            source: ProfileSource::Modelled {
                device: device.name.clone(),
            },
            micro_batch,
            tp,
            layers,
        })
    }

    /// A measured `tp` 1 profile turned into one for `tp` ranks, Megatron-style: compute
    /// time, weights, gradients and state divided by `t`; activations split except the
    /// residual/norm part (modelled as `4·d` of the block's elements, see
    /// [`ModelShape::block_activation_elems_per_token`]); per block two all-reduces of the
    /// `b·s·h` output in forward and two in backward; vocab-parallel embedding (one
    /// forward all-reduce) and cross-entropy (three `b·s` scalars forward, the input
    /// gradient backward).
    pub fn tp_sharded(&self, shape: &ModelShape, tp: u32) -> Result<Self, BalanceError> {
        self.validate()?;
        if self.tp != 1 {
            return Err(bad(format!("profile is already sharded (tp {})", self.tp)));
        }
        if tp == 0 || !shape.n_heads.is_multiple_of(tp) {
            return Err(BalanceError::InvalidLayout {
                layout: format!("tp{tp}"),
                reason: format!("tp must divide n_heads {}", shape.n_heads),
            });
        }
        if self.layers.len() != shape.n_partition_layers() {
            return Err(bad(format!(
                "profile has {} layers but the shape has {}",
                self.layers.len(),
                shape.n_partition_layers()
            )));
        }
        let t = f64::from(tp);
        let div = |x: u64| (x as f64 / t).ceil() as u64;
        let act_scale =
            shape.block_activation_elems_per_token(tp) / shape.block_activation_elems_per_token(1);
        let tok = (self.micro_batch * shape.seq_len) as f64;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut n = l.clone();
                n.fwd_s /= t;
                n.bwd_s /= t;
                n.param_bytes = div(l.param_bytes);
                n.grad_bytes = div(l.grad_bytes);
                n.state_bytes = div(l.state_bytes);
                n.tied_copy_state_bytes = div(l.tied_copy_state_bytes);
                n.tied_copy_grad_bytes = div(l.tied_copy_grad_bytes);
                if tp > 1 {
                    match l.kind {
                        LayerKind::Embedding => {
                            n.tp_fwd_allreduce_bytes = vec![l.out_bytes];
                        }
                        LayerKind::Block(_) => {
                            n.act_bytes = (l.act_bytes as f64 * act_scale) as u64;
                            n.tp_fwd_allreduce_bytes = vec![l.out_bytes; 2];
                            n.tp_bwd_allreduce_bytes = vec![l.out_bytes; 2];
                        }
                        LayerKind::Head => {
                            n.tp_fwd_allreduce_bytes = vec![(tok * 4.0) as u64; 3];
                            n.tp_bwd_allreduce_bytes = vec![self.layers[0].out_bytes];
                        }
                    }
                }
                n
            })
            .collect();
        Ok(Self {
            source: self.source.clone(),
            micro_batch: self.micro_batch,
            tp,
            layers,
        })
    }

    /// Scales every compute time by `factor` (e.g. a device `factor` times slower).
    pub fn scaled(&self, factor: f64) -> Result<Self, BalanceError> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(bad(format!(
                "scale factor {factor} must be positive and finite"
            )));
        }
        let mut out = self.clone();
        for l in &mut out.layers {
            l.fwd_s *= factor;
            l.bwd_s *= factor;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head follows where the trainer runs the loss: on a host backend it pays the copies
    /// of the table and the loss rows each way (memcpy traffic at the streaming bandwidth),
    /// on a GPU it does not; nothing else changes.
    #[test]
    fn head_cost_follows_the_loss_placement() {
        let shape = ModelShape::preset_100m();
        let host = DeviceSpec::cpu_default();
        let on_device = DeviceSpec {
            loss_placement: LossPlacement::Device,
            ..host.clone()
        };
        let (mb, tp) = (64, 2);
        let a = CostProfile::modelled(&shape, &host, mb, tp).unwrap();
        let b = CostProfile::modelled(&shape, &on_device, mb, tp).unwrap();
        let n = a.len();
        assert_eq!(a.layers[..n - 1], b.layers[..n - 1]);
        let (tok, d) = ((mb * shape.seq_len) as f64, shape.d_model as f64);
        let copies = 2.0 * (shape.vocab as f64 / 2.0 * d + tok * d) * 4.0 / host.achieved_bw();
        let (ha, hb) = (&a.layers[n - 1], &b.layers[n - 1]);
        assert!(
            (ha.fwd_s - hb.fwd_s - copies).abs() < 1e-9 * ha.fwd_s,
            "{ha:?} {hb:?}"
        );
        assert!(
            (ha.bwd_s - hb.bwd_s - copies).abs() < 1e-9 * ha.bwd_s,
            "{ha:?} {hb:?}"
        );
        assert_eq!(
            DeviceSpec::a100_80gb().loss_placement,
            LossPlacement::Device
        );
    }

    #[test]
    fn modelled_profile_is_compute_bound_for_big_gemms() {
        let shape = ModelShape::preset_1b();
        let dev = DeviceSpec::a100_80gb();
        let p = CostProfile::modelled(&shape, &dev, 8, 1).unwrap();
        p.validate().unwrap();
        assert_eq!(p.len(), shape.n_partition_layers());
        let tok = 8.0 * shape.seq_len as f64;
        // A block's forward cannot beat its FLOPs at the achieved rate, and for these sizes
        // is within 30% of it (norms and attention scores add memory traffic).
        let ideal = tok * shape.block_fwd_flops_per_token() / dev.achieved_flops();
        let blk = &p.layers[1];
        assert!(
            blk.fwd_s >= ideal && blk.fwd_s < 1.3 * ideal,
            "{} vs {}",
            blk.fwd_s,
            ideal
        );
        assert!(blk.bwd_s >= 2.0 * blk.fwd_s * 0.99);
        // The head over a 600k catalogue is heavier than a block: the DeepSpeed complaint.
        assert!(p.layers.last().unwrap().train_s() > 10.0 * blk.train_s());
    }

    #[test]
    fn tp_divides_compute_and_adds_megatron_allreduces() {
        let shape = ModelShape::preset_100m();
        let dev = DeviceSpec::h100_80gb();
        let p1 = CostProfile::modelled(&shape, &dev, 4, 1).unwrap();
        let p2 = CostProfile::modelled(&shape, &dev, 4, 2).unwrap();
        let bsh = 4 * shape.seq_len * shape.d_model * u64::from(shape.precision.activation_bytes);
        assert_eq!(p2.layers[1].tp_fwd_allreduce_bytes, vec![bsh, bsh]);
        assert_eq!(p2.layers[1].tp_bwd_allreduce_bytes, vec![bsh, bsh]);
        assert!(p2.layers[1].fwd_s < p1.layers[1].fwd_s);
        assert!(p1.layers[1].tp_fwd_allreduce_bytes.is_empty());
        let state1: u64 = p1.layers.iter().map(|l| l.state_bytes).sum();
        let state2: u64 = p2.layers.iter().map(|l| l.state_bytes).sum();
        assert!(state2 * 2 >= state1 && state2 * 2 <= state1 + 64 * 16);
    }

    #[test]
    fn communication_helpers_use_the_link_model() {
        let shape = ModelShape::preset_100m();
        let p = CostProfile::modelled(&shape, &DeviceSpec::a100_80gb(), 4, 2).unwrap();
        let link = LinkClass::new_us_gbps(2.0, 100.0);
        let blk = &p.layers[1];
        let one = all_reduce_time(2, blk.out_bytes as f64, &link);
        assert!((blk.tp_fwd_comm_s(2, &link) - 2.0 * one).abs() < 1e-15);
        assert!((blk.tp_bwd_comm_s(2, &link) - 2.0 * one).abs() < 1e-15);
        let expect = 2.0 * (2e-6 + blk.out_bytes as f64 / 100e9);
        assert!((blk.boundary_s(&link) - expect).abs() < 1e-15);
        assert_eq!(blk.tp_fwd_comm_s(1, &link), 0.0);
    }

    #[test]
    fn measured_profile_shards_like_the_modelled_one() {
        let shape = ModelShape::new("t", 100, 16, 2, 4, 32, 8).unwrap();
        let mk = |kind| LayerCost::measured(kind, 1.0, 2.0, 400, 1600, 1000, 512);
        let prof = CostProfile::measured(
            2,
            vec![
                mk(LayerKind::Embedding),
                mk(LayerKind::Block(0)),
                mk(LayerKind::Block(1)),
                mk(LayerKind::Head),
            ],
        )
        .unwrap();
        let s = prof.tp_sharded(&shape, 4).unwrap();
        assert_eq!(s.layers[1].fwd_s, 0.25);
        assert_eq!(s.layers[1].state_bytes, 400);
        assert_eq!(s.layers[1].tp_fwd_allreduce_bytes.len(), 2);
        assert!(s.layers[1].act_bytes < 1000 && s.layers[1].act_bytes > 250);
        assert!(prof.tp_sharded(&shape, 3).is_err());
    }

    #[test]
    fn malformed_profiles_are_rejected() {
        let mk = |kind, t| LayerCost::measured(kind, t, 1.0, 1, 1, 1, 1);
        let e = CostProfile::measured(
            1,
            vec![mk(LayerKind::Embedding, 1.0), mk(LayerKind::Head, 1.0)],
        )
        .unwrap_err();
        assert!(e.to_string().contains("2 layers"), "{e}");
        let e = CostProfile::measured(
            1,
            vec![
                mk(LayerKind::Embedding, 1.0),
                mk(LayerKind::Block(0), -1.0),
                mk(LayerKind::Head, 1.0),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("layer 1: fwd_s"), "{e}");
        let e = CostProfile::measured(
            1,
            vec![
                mk(LayerKind::Block(0), 1.0),
                mk(LayerKind::Block(0), 1.0),
                mk(LayerKind::Head, 1.0),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("expected Embedding"), "{e}");
    }
}
