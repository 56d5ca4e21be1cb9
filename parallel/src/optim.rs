//! A rank's optimizer over its segments: the global gradient norm, clipping and AdamW on
//! host buffers, with the moments whole or, under ZeRO, sharded over the DP group — each
//! rank updates only its shard of every parameter ([`meshrec_pipeline::zero_shard`]) and
//! one all-gather hands every rank the updated parameters (Megatron's distributed
//! optimizer; DeepSpeed's stages 1 and 2).

use meshrec_comm::{Communicator, ReduceOp};
use meshrec_model::optim::{clip_by_global_norm, AdamW, AdamWConfig};
use meshrec_model::params::ParamInfo;
use meshrec_pipeline::{zero_shard, ZeroStage};

use crate::error::ParallelError;
use crate::exec::global_grad_norm;
use crate::layout::ParamSpec;
use crate::mesh::Groups;
use crate::segment::Segment;
use crate::zero::ShardLayout;

/// What an optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerStep {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// A non-finite norm skipped the update (on every rank alike).
    pub skipped: bool,
}

/// The AdamW state of one rank's segments (see the module docs).
#[derive(Clone)]
pub struct RankOptimizer {
    zero: ZeroStage,
    dp_rank: usize,
    dp_size: usize,
    /// Per local chunk: the moments of the whole parameters, or of this rank's shards.
    chunks: Vec<AdamW>,
    decay: Vec<Vec<bool>>,
    /// Per local chunk, each whole parameter's element count.
    sizes: Vec<Vec<usize>>,
    /// The shard-major layout of every parameter of every chunk, in order (ZeRO only).
    shards: Option<ShardLayout>,
}

impl RankOptimizer {
    /// Fresh state for `segments`, sharded as `zero` says over `groups`' DP group.
    pub fn new(
        config: AdamWConfig,
        segments: &[Segment],
        groups: &Groups,
        zero: ZeroStage,
    ) -> Self {
        let (dp_rank, dp_size) = (groups.coord.dp, groups.mesh.dp);
        let sharded = zero.shards_optimizer();
        let chunks = segments
            .iter()
            .map(|s| {
                AdamW::new(
                    config,
                    s.infos.iter().map(|i| {
                        if sharded {
                            zero_shard(i.numel(), dp_size, dp_rank).len()
                        } else {
                            i.numel()
                        }
                    }),
                )
            })
            .collect();
        let decay = segments
            .iter()
            .map(|s| s.infos.iter().map(ParamSpec::decays).collect())
            .collect();
        let sizes: Vec<Vec<usize>> = segments
            .iter()
            .map(|s| s.infos.iter().map(ParamInfo::numel).collect())
            .collect();
        let shards = sharded.then(|| ShardLayout::new(sizes.iter().flatten().copied(), dp_size));
        Self {
            zero,
            dp_rank,
            dp_size,
            chunks,
            decay,
            sizes,
            shards,
        }
    }

    /// Moves unsharded state to a new DP group (an elastic run's membership change): the
    /// moments are whole, so only the group's numbering changes. ZeRO's shards would have
    /// to be re-split over the new group, with a lost replica's shards gone: refused.
    pub fn regroup(&mut self, groups: &Groups) -> Result<(), ParallelError> {
        if self.shards.is_some() {
            return Err(ParallelError::State(format!(
                "ZeRO stage {:?} shards the optimizer over the DP group: it cannot change membership in memory",
                self.zero
            )));
        }
        self.dp_rank = groups.coord.dp;
        self.dp_size = groups.mesh.dp;
        Ok(())
    }

    /// Every moment buffer of this rank in order, for broadcasting to a replica that joins.
    pub fn moments_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.chunks
            .iter_mut()
            .flat_map(|o| o.m.iter_mut().chain(o.v.iter_mut()))
    }

    /// Sets the step count (a joining replica takes its donor's).
    pub fn set_steps(&mut self, steps: u64) {
        for o in &mut self.chunks {
            o.step = steps;
        }
    }

    pub fn zero(&self) -> ZeroStage {
        self.zero
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.chunks.first().map_or(0, |o| o.step)
    }

    /// The moments this rank holds of parameter `param` of local chunk `chunk`: the range
    /// of the parameter's (TP/PP) slice they cover (all of it without ZeRO), `m` and `v`.
    pub fn moments_of(
        &self,
        chunk: usize,
        param: usize,
    ) -> Option<(std::ops::Range<usize>, &[f32], &[f32])> {
        let opt = self.chunks.get(chunk)?;
        let len = *self.sizes.get(chunk)?.get(param)?;
        let range = if self.shards.is_some() {
            zero_shard(len, self.dp_size, self.dp_rank)
        } else {
            0..len
        };
        Some((range, opt.m.get(param)?, opt.v.get(param)?))
    }

    /// Bytes of optimizer state this rank holds (the moments' buffers).
    pub fn held_bytes(&self) -> u64 {
        self.chunks.iter().map(AdamW::held_bytes).sum()
    }

    /// One step from the gradients in `segments` (reduced over DP and the model-parallel
    /// groups; under ZeRO-2 this rank's shards of them): the global norm, and unless it is
    /// not finite, clipping to `clip_norm` (0: none), AdamW and, under ZeRO, the
    /// all-gather of the updated shards. Collective over the mesh.
    pub fn step(
        &mut self,
        segments: &mut [Segment],
        groups: &Groups,
        lr: f32,
        clip_norm: f64,
    ) -> Result<OptimizerStep, ParallelError> {
        let mut norm = global_grad_norm(segments, groups)?;
        if self.zero.shards_gradients() && self.dp_size > 1 {
            // Each DP rank summed the squares of its own shards.
            let mut sq = [(norm * norm) as f32];
            groups.dp.all_reduce(&mut sq, ReduceOp::Sum)?;
            norm = f64::from(sq[0]).sqrt();
        }
        if !norm.is_finite() {
            return Ok(OptimizerStep {
                grad_norm: norm,
                skipped: true,
            });
        }
        let mut values: Vec<Vec<Vec<f32>>> = segments.iter().map(Segment::values).collect();
        for (c, s) in segments.iter_mut().enumerate() {
            clip_by_global_norm(&mut s.grads, norm, clip_norm);
            let vals = &mut values[c];
            if self.zero.shards_optimizer() {
                let ranges: Vec<_> = vals
                    .iter()
                    .map(|v| zero_shard(v.len(), self.dp_size, self.dp_rank))
                    .collect();
                let mut params: Vec<&mut [f32]> = vals
                    .iter_mut()
                    .zip(&ranges)
                    .map(|(v, r)| &mut v[r.clone()])
                    .collect();
                let shard_grads = self.zero.shards_gradients();
                let grads: Vec<&[f32]> = s
                    .grads
                    .iter()
                    .zip(&ranges)
                    .map(|(g, r)| if shard_grads { &g[..] } else { &g[r.clone()] })
                    .collect();
                self.chunks[c].update_slices(&mut params, &grads, lr, &self.decay[c]);
            } else {
                self.chunks[c].update(vals, &s.grads, lr, &self.decay[c]);
            }
        }
        if self.shards.is_some() {
            self.all_gather(&mut values, groups.dp.as_ref())?;
        }
        for (s, v) in segments.iter_mut().zip(&values) {
            s.set_values(v)?;
        }
        Ok(OptimizerStep {
            grad_norm: norm,
            skipped: false,
        })
    }

    /// Replaces every rank's copy of the parameters with the shards their owners updated.
    fn all_gather(
        &self,
        values: &mut [Vec<Vec<f32>>],
        dp: &dyn Communicator,
    ) -> Result<(), ParallelError> {
        let Some(layout) = &self.shards else {
            return Ok(());
        };
        let (rank, size) = (self.dp_rank, self.dp_size);
        let mine: Vec<&[f32]> = values
            .iter()
            .flatten()
            .map(|v| &v[zero_shard(v.len(), size, rank)])
            .collect();
        let block = layout.pack_block(rank, mine.into_iter())?;
        let mut gathered = vec![0.0f32; layout.total_len()];
        dp.all_gather(&block, &mut gathered)?;
        let mut views: Vec<&mut [f32]> =
            values.iter_mut().flatten().map(Vec::as_mut_slice).collect();
        layout.unpack_all(&gathered, &mut views)
    }

    /// The moments of this rank's whole parameters (its TP/PP slices), per chunk: `(m, v)`.
    /// Under ZeRO they are all-gathered over the DP group, so this is collective there.
    #[allow(clippy::type_complexity)]
    pub fn full_moments(
        &self,
        groups: &Groups,
    ) -> Result<(Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<f32>>>), ParallelError> {
        let m: Vec<Vec<Vec<f32>>> = self.chunks.iter().map(|o| o.m.clone()).collect();
        let v: Vec<Vec<Vec<f32>>> = self.chunks.iter().map(|o| o.v.clone()).collect();
        let Some(layout) = &self.shards else {
            return Ok((m, v));
        };
        let dp = groups.dp.as_ref();
        let gather =
            |shards: &[Vec<Vec<f32>>]| gather_shards(layout, self.dp_rank, dp, shards, &self.sizes);
        Ok((gather(&m)?, gather(&v)?))
    }

    /// Takes the moments of this rank's whole parameters (per chunk, as
    /// [`RankOptimizer::full_moments`] gives them) and the step count, keeping this rank's
    /// shards under ZeRO.
    pub fn load_moments(
        &mut self,
        m: Vec<Vec<Vec<f32>>>,
        v: Vec<Vec<Vec<f32>>>,
        steps: u64,
    ) -> Result<(), ParallelError> {
        if m.len() != self.chunks.len() || v.len() != self.chunks.len() {
            return Err(ParallelError::State(format!(
                "optimizer state for {} chunks, this rank has {}",
                m.len(),
                self.chunks.len()
            )));
        }
        let (rank, size, sharded) = (self.dp_rank, self.dp_size, self.shards.is_some());
        let keep = |bufs: Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            bufs.into_iter()
                .map(|b| {
                    if sharded {
                        b[zero_shard(b.len(), size, rank)].to_vec()
                    } else {
                        b
                    }
                })
                .collect()
        };
        for ((opt, m), v) in self.chunks.iter_mut().zip(m).zip(v) {
            let (m, v) = (keep(m), keep(v));
            let fits = |b: &[Vec<f32>]| {
                b.len() == opt.m.len() && b.iter().zip(&opt.m).all(|(x, y)| x.len() == y.len())
            };
            if !fits(&m) || !fits(&v) {
                return Err(ParallelError::State(
                    "optimizer moments do not match this rank's parameters".into(),
                ));
            }
            opt.m = m;
            opt.v = v;
            opt.step = steps;
        }
        Ok(())
    }
}

/// Every rank's shards (per chunk, per parameter; `sizes` the whole parameters' lengths)
/// all-gathered over `dp` into the whole buffers. Collective over `dp`.
pub fn gather_shards(
    layout: &ShardLayout,
    rank: usize,
    dp: &dyn Communicator,
    shards: &[Vec<Vec<f32>>],
    sizes: &[Vec<usize>],
) -> Result<Vec<Vec<Vec<f32>>>, ParallelError> {
    let mine: Vec<&[f32]> = shards.iter().flatten().map(Vec::as_slice).collect();
    let block = layout.pack_block(rank, mine.into_iter())?;
    let mut gathered = vec![0.0f32; layout.total_len()];
    dp.all_gather(&block, &mut gathered)?;
    let mut full: Vec<Vec<Vec<f32>>> = sizes
        .iter()
        .map(|sizes| sizes.iter().map(|&n| vec![0.0f32; n]).collect())
        .collect();
    let mut views: Vec<&mut [f32]> = full.iter_mut().flatten().map(Vec::as_mut_slice).collect();
    layout.unpack_all(&gathered, &mut views)?;
    Ok(full)
}

/// Under ZeRO-2, the whole reduced gradients of `segments` (which hold this rank's shards),
/// all-gathered over the DP group; otherwise a copy of them. For checks and tests: training
/// never needs them whole.
pub fn whole_grads(
    segments: &[Segment],
    groups: &Groups,
    zero: ZeroStage,
) -> Result<Vec<Vec<Vec<f32>>>, ParallelError> {
    let grads: Vec<Vec<Vec<f32>>> = segments.iter().map(|s| s.grads.clone()).collect();
    if !zero.shards_gradients() {
        return Ok(grads);
    }
    let sizes: Vec<Vec<usize>> = segments
        .iter()
        .map(|s| s.infos.iter().map(ParamInfo::numel).collect())
        .collect();
    let layout = ShardLayout::new(sizes.iter().flatten().copied(), groups.mesh.dp);
    gather_shards(&layout, groups.coord.dp, groups.dp.as_ref(), &grads, &sizes)
}
