//! Where every parameter lives in a layout: the pipeline partition (blocks per model chunk),
//! how each parameter is split over tensor-parallel ranks, and shard / unshard of any
//! per-parameter state (values, gradients, optimizer moments) between the full model and
//! the shards of a layout — the basis of checkpoint resharding.

use std::collections::BTreeMap;
use std::ops::Range;

use meshrec_comm::chunk_range;
use meshrec_model::params::ParamInfo;
use meshrec_model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::error::{MeshError, ParallelError};
use crate::mesh::{Coord, Mesh};

/// A mesh plus the pipeline partition: `partition[k]` blocks in model chunk `k`, with
/// `pp × virtual_stages` chunks; chunk `k` lives on pipeline rank `k % pp` (Megatron's
/// interleaved assignment; with one virtual stage chunk `k` is stage `k`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub mesh: Mesh,
    pub virtual_stages: usize,
    pub partition: Vec<usize>,
    /// Megatron's sequence parallelism inside each TP group: the residual stream, norms and
    /// dropout are split along the sequence, each TP all-reduce becomes a reduce-scatter
    /// and an all-gather.
    pub sequence_parallel: bool,
}

impl Layout {
    /// Blocks spread as evenly as possible, earlier chunks taking the remainder.
    pub fn uniform(mesh: Mesh, virtual_stages: usize, n_layers: usize) -> Result<Self, MeshError> {
        let chunks = mesh.pp * virtual_stages.max(1);
        let partition = (0..chunks)
            .map(|k| chunk_range(n_layers, chunks, k).len())
            .collect();
        Self::with_partition(mesh, virtual_stages, partition, n_layers)
    }

    /// An explicit partition (from the balancer); every chunk must hold a block.
    pub fn with_partition(
        mesh: Mesh,
        virtual_stages: usize,
        partition: Vec<usize>,
        n_layers: usize,
    ) -> Result<Self, MeshError> {
        let virtual_stages = virtual_stages.max(1);
        let chunks = mesh.pp * virtual_stages;
        if partition.len() != chunks
            || partition.contains(&0)
            || partition.iter().sum::<usize>() != n_layers
        {
            return Err(MeshError::BadPartition {
                partition,
                chunks,
                n_layers,
            });
        }
        Ok(Self {
            mesh,
            virtual_stages,
            partition,
            sequence_parallel: false,
        })
    }

    pub fn single(n_layers: usize) -> Self {
        Self {
            mesh: Mesh::single(),
            virtual_stages: 1,
            partition: vec![n_layers],
            sequence_parallel: false,
        }
    }

    /// The same layout with sequence parallelism on or off.
    pub fn with_sequence_parallel(mut self, on: bool) -> Self {
        self.sequence_parallel = on;
        self
    }

    /// Whether the residual stream is split along the sequence (sequence parallelism with
    /// more than one TP rank).
    pub fn splits_sequence(&self) -> bool {
        self.sequence_parallel && self.mesh.tp > 1
    }

    /// Sequence positions of a `seq_len` micro-batch that one rank's residual stream holds.
    pub fn local_seq_len(&self, seq_len: usize) -> usize {
        if self.splits_sequence() {
            seq_len / self.mesh.tp
        } else {
            seq_len
        }
    }

    /// Number of model chunks (`pp × virtual_stages`).
    pub fn chunks(&self) -> usize {
        self.partition.len()
    }

    /// The global block indices of model chunk `k`.
    pub fn chunk_blocks(&self, k: usize) -> Range<usize> {
        let start: usize = self.partition[..k].iter().sum();
        start..start + self.partition[k]
    }

    /// The model chunk of local chunk `local` on pipeline rank `pp_rank`.
    pub fn model_chunk(&self, pp_rank: usize, local: usize) -> usize {
        local * self.mesh.pp + pp_rank
    }

    /// The pipeline rank that holds model chunk `k`.
    pub fn device_of_chunk(&self, k: usize) -> usize {
        k % self.mesh.pp
    }

    pub fn is_first_chunk(&self, k: usize) -> bool {
        k == 0
    }

    pub fn is_last_chunk(&self, k: usize) -> bool {
        k + 1 == self.chunks()
    }

    /// Item-table rows held by tensor-parallel rank `tp` (contiguous, padding row 0 on rank 0).
    pub fn vocab_rows(&self, config: &ModelConfig, tp: usize) -> Range<usize> {
        chunk_range(config.vocab(), self.mesh.tp, tp)
    }

    pub fn describe(&self) -> String {
        if self.mesh.pp == 1 {
            self.mesh.to_string()
        } else {
            format!(
                "{} v{} partition {:?}",
                self.mesh, self.virtual_stages, self.partition
            )
        }
    }
}

/// How a parameter is split over the tensor-parallel ranks. Weights are stored
/// `[d_in, d_out]` (burn's `Linear`), so column-parallel splits dimension 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Split {
    /// Every TP rank holds all of it.
    Replicated,
    /// Dimension 0 in contiguous chunks (row-parallel weights, the vocab-parallel table).
    Rows,
    /// Dimension 1 in contiguous chunks (column-parallel weights).
    Cols,
}

impl ParamSpec {
    /// Whether the first and the last pipeline stage both hold the parameter (the item table
    /// the head is tied to, and the fusion that makes the table): their gradients are summed.
    pub fn is_tied(&self) -> bool {
        self.full_path == TABLE_PATH || self.full_path.starts_with(FUSION_PREFIX)
    }
}

/// One parameter of a chunk: where it comes from in the full model and how it is treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Path in the chunk module.
    pub local_path: String,
    /// Path in the full [`meshrec_model::Recommender`].
    pub full_path: String,
    pub split: Split,
    /// A replicated parameter used inside a tensor-parallel region (a norm before a
    /// column-parallel projection, the genre table of the masked lookup): each TP rank's
    /// gradient is partial and the TP group sums them.
    pub tp_partial_grad: bool,
    /// The last stage's copy of the item table the head is tied to: its gradient is summed
    /// with the first stage's, and the first stage's copy is the one that is kept.
    pub tied_copy: bool,
}

impl ParamSpec {
    /// Weight decay applies to matrices, not to norm scales or shifts.
    pub fn decays(info: &ParamInfo) -> bool {
        info.shape.len() > 1
    }

    /// Whether this rank counts the parameter in the global gradient norm: each element of
    /// the full model exactly once (replicas on tp rank 0 only, tied copies never).
    pub fn counts_in_norm(&self, coord: Coord) -> bool {
        !self.tied_copy && (self.split != Split::Replicated || coord.tp == 0)
    }
}

/// The name of the tied table copy in a chunk module.
pub const HEAD_PATH: &str = "head";
/// The last chunk's copy of the fusion (its parameters are tied copies of `embed.fusion`).
pub const HEAD_FUSION_PREFIX: &str = "head_fusion.";
/// The full model's fusion parameters.
pub const FUSION_PREFIX: &str = "embed.fusion.";
/// The full model's item table.
pub const TABLE_PATH: &str = "embed.items.weight";

/// How a module's parameters sit on a tensor-parallel group (Megatron's layers, written as
/// torchtitan's parallelize plans are: a style per module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpStyle {
    /// Column-parallel linear: the weight `[d_in, d_out]` split along `d_out`.
    Colwise,
    /// Row-parallel linear: split along `d_in`; its output is a partial sum.
    Rowwise,
    /// Vocabulary-parallel embedding: item rows split; lookups masked and all-reduced.
    VocabParallel,
    /// Replicated, but used inside a TP region (a norm before a column-parallel projection,
    /// the genre table of the masked lookup): each rank's gradient is partial, summed over TP.
    ReplicatedInRegion,
    /// Replicated and used outside any TP region: every rank computes the whole gradient.
    Replicated,
}

/// The TP plan of the recommender: every module that holds parameters, by its path in the
/// full model (`*` stands for one block index). A parameter takes the style of the module
/// whose path is a prefix of its own; a parameter no entry covers is an error, so a module
/// added to the model cannot go unplanned.
pub const TP_PLAN: &[(&str, TpStyle)] = &[
    ("embed.items", TpStyle::VocabParallel),
    ("embed.positions", TpStyle::Replicated),
    ("embed.genres", TpStyle::ReplicatedInRegion),
    // Text projection and graph nodes: only whole tables fuse (the mesh refuses TP with
    // fusion), so on a TP group of one they are plain replicas.
    ("embed.fusion", TpStyle::Replicated),
    ("blocks.*.attn_norm", TpStyle::ReplicatedInRegion),
    ("blocks.*.attn.wq", TpStyle::Colwise),
    ("blocks.*.attn.wk", TpStyle::Colwise),
    ("blocks.*.attn.wv", TpStyle::Colwise),
    ("blocks.*.attn.wo", TpStyle::Rowwise),
    ("blocks.*.mlp_norm", TpStyle::ReplicatedInRegion),
    ("blocks.*.mlp.w1", TpStyle::Colwise),
    ("blocks.*.mlp.w3", TpStyle::Colwise),
    ("blocks.*.mlp.w2", TpStyle::Rowwise),
    ("final_norm", TpStyle::Replicated),
];

/// The plan's style for the parameter at `full_path`, if an entry covers it.
pub fn tp_style(full_path: &str) -> Option<TpStyle> {
    let segments: Vec<&str> = full_path.split('.').collect();
    TP_PLAN.iter().find_map(|(module, style)| {
        let pattern: Vec<&str> = module.split('.').collect();
        let covers = pattern.len() < segments.len()
            && pattern.iter().zip(&segments).all(|(p, s)| {
                *p == *s || (*p == "*" && !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            });
        covers.then_some(*style)
    })
}

/// Maps a chunk's parameter path to the full model (block indices shift by the chunk's
/// first block, the head copy is the item table) and places it by [`TP_PLAN`]. Under
/// sequence parallelism the replicated parameters outside TP regions (positions, final
/// norm) see only their rank's sequence rows, so their gradients are partial too.
pub fn spec_for(
    local_path: &str,
    first_block: usize,
    sequence_parallel: bool,
) -> Result<ParamSpec, ParallelError> {
    let head_fusion = local_path.strip_prefix(HEAD_FUSION_PREFIX);
    let full_path = if local_path == HEAD_PATH {
        TABLE_PATH.to_string()
    } else if let Some(rest) = head_fusion {
        format!("{FUSION_PREFIX}{rest}")
    } else if let Some(rest) = local_path.strip_prefix("blocks.") {
        let (index, tail) = rest.split_once('.').unwrap_or((rest, ""));
        match index.parse::<usize>() {
            Ok(i) => format!("blocks.{}.{tail}", first_block + i),
            Err(_) => local_path.to_string(),
        }
    } else {
        local_path.to_string()
    };
    let style = tp_style(&full_path).ok_or_else(|| {
        ParallelError::State(format!(
            "parameter `{full_path}` has no entry in the tensor-parallel plan (layout::TP_PLAN)"
        ))
    })?;
    let split = match style {
        TpStyle::Colwise => Split::Cols,
        TpStyle::Rowwise | TpStyle::VocabParallel => Split::Rows,
        TpStyle::ReplicatedInRegion | TpStyle::Replicated => Split::Replicated,
    };
    Ok(ParamSpec {
        local_path: local_path.to_string(),
        full_path,
        split,
        tp_partial_grad: style == TpStyle::ReplicatedInRegion
            || (sequence_parallel && style == TpStyle::Replicated),
        tied_copy: local_path == HEAD_PATH || head_fusion.is_some(),
    })
}

/// Per-parameter state of a full model, keyed by full path: shapes and values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FullState {
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub values: BTreeMap<String, Vec<f32>>,
}

impl FullState {
    /// From [`meshrec_model::params::param_paths`] order and values of a full model.
    pub fn from_ordered(infos: &[ParamInfo], values: Vec<Vec<f32>>) -> Self {
        let mut state = Self::default();
        for (info, v) in infos.iter().zip(values) {
            state.shapes.insert(info.path.clone(), info.shape.clone());
            state.values.insert(info.path.clone(), v);
        }
        state
    }

    /// Back to `infos` order; an error names a missing path.
    pub fn to_ordered(&self, infos: &[ParamInfo]) -> Result<Vec<Vec<f32>>, ParallelError> {
        infos
            .iter()
            .map(|i| {
                self.values
                    .get(&i.path)
                    .cloned()
                    .ok_or_else(|| ParallelError::State(format!("no value for `{}`", i.path)))
            })
            .collect()
    }
}

/// Where TP rank `tp` of `tp_size`'s slice of a parameter of full shape `shape` sits in the
/// full parameter: element `k` of the slice is element [`SliceMap::full_index`]`(k)` of the
/// full tensor (row-major), and a full element is in the slice at
/// [`SliceMap::slice_index`]. What resharding a checkpoint one saved slice at a time needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceMap {
    split: Split,
    /// Rows (Rows split) or columns (Cols split) of the full parameter in the slice.
    range: Range<usize>,
    /// Elements per row of the full parameter (Rows, Cols); its length (Replicated).
    width: usize,
    len: usize,
}

impl SliceMap {
    pub fn new(split: Split, shape: &[usize], tp_size: usize, tp: usize) -> Self {
        let len: usize = shape.iter().product();
        let width = match split {
            Split::Replicated => len,
            Split::Rows => shape[1..].iter().product(),
            Split::Cols => shape.get(1).copied().unwrap_or(1),
        };
        let range = split_range(split, shape, tp_size, tp).unwrap_or(0..len);
        Self {
            split,
            range,
            width,
            len,
        }
    }

    /// Elements in the slice.
    pub fn slice_len(&self) -> usize {
        match self.split {
            Split::Replicated => self.len,
            Split::Rows => self.range.len() * self.width,
            Split::Cols => self.len / self.width.max(1) * self.range.len(),
        }
    }

    pub fn full_index(&self, k: usize) -> usize {
        match self.split {
            Split::Replicated => k,
            Split::Rows => self.range.start * self.width + k,
            Split::Cols => {
                let cols = self.range.len().max(1);
                (k / cols) * self.width + self.range.start + k % cols
            }
        }
    }

    pub fn slice_index(&self, full: usize) -> Option<usize> {
        match self.split {
            Split::Replicated => (full < self.len).then_some(full),
            Split::Rows => {
                let row = full / self.width.max(1);
                self.range
                    .contains(&row)
                    .then(|| full - self.range.start * self.width)
            }
            Split::Cols => {
                let (row, col) = (full / self.width.max(1), full % self.width.max(1));
                self.range
                    .contains(&col)
                    .then(|| row * self.range.len() + col - self.range.start)
            }
        }
    }
}

fn split_range(split: Split, shape: &[usize], parts: usize, part: usize) -> Option<Range<usize>> {
    match split {
        Split::Replicated => None,
        Split::Rows => Some(chunk_range(shape[0], parts, part)),
        Split::Cols => Some(chunk_range(*shape.get(1)?, parts, part)),
    }
}

/// The slice of a full parameter held by TP rank `tp` of `tp_size`.
pub fn shard_param(
    split: Split,
    shape: &[usize],
    full: &[f32],
    tp_size: usize,
    tp: usize,
) -> Vec<f32> {
    match (split, split_range(split, shape, tp_size, tp)) {
        (Split::Rows, Some(rows)) => {
            let cols: usize = shape[1..].iter().product();
            full[rows.start * cols..rows.end * cols].to_vec()
        }
        (Split::Cols, Some(cols)) => {
            let width = shape[1];
            full.chunks(width)
                .flat_map(|row| row[cols.clone()].iter().copied())
                .collect()
        }
        _ => full.to_vec(),
    }
}

/// The shape of TP rank `tp`'s slice.
pub fn shard_shape(split: Split, shape: &[usize], tp_size: usize, tp: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    match (split, split_range(split, shape, tp_size, tp)) {
        (Split::Rows, Some(r)) => s[0] = r.len(),
        (Split::Cols, Some(r)) => s[1] = r.len(),
        _ => {}
    }
    s
}

/// Reassembles a full parameter from the slices of all TP ranks (in TP order).
pub fn unshard_param(split: Split, shape: &[usize], parts: &[&[f32]]) -> Vec<f32> {
    match split {
        Split::Replicated => parts.first().map(|p| p.to_vec()).unwrap_or_default(),
        Split::Rows => parts.concat(),
        Split::Cols => {
            let rows = shape[0];
            let widths: Vec<usize> = (0..parts.len())
                .map(|t| chunk_range(shape[1], parts.len(), t).len())
                .collect();
            let mut out = Vec::with_capacity(shape.iter().product());
            for r in 0..rows {
                for (part, &w) in parts.iter().zip(&widths) {
                    out.extend_from_slice(&part[r * w..(r + 1) * w]);
                }
            }
            out
        }
    }
}

/// The state of one rank's chunks, in each chunk's parameter order.
#[derive(Debug, Clone, PartialEq)]
pub struct RankState {
    pub coord: Coord,
    /// Per local chunk: the specs and values of its parameters.
    pub chunks: Vec<(Vec<ParamSpec>, Vec<Vec<f32>>)>,
}

/// The slices of `full` that a rank at `coord` holds for a chunk whose parameters are
/// `specs`.
pub fn shard_chunk(
    full: &FullState,
    specs: &[ParamSpec],
    mesh: &Mesh,
    coord: Coord,
) -> Result<Vec<Vec<f32>>, ParallelError> {
    specs
        .iter()
        .map(|spec| {
            let shape = full.shapes.get(&spec.full_path);
            let values = full.values.get(&spec.full_path);
            match (shape, values) {
                (Some(shape), Some(values)) => {
                    Ok(shard_param(spec.split, shape, values, mesh.tp, coord.tp))
                }
                _ => Err(ParallelError::State(format!(
                    "the full state has no `{}` (needed for `{}`)",
                    spec.full_path, spec.local_path
                ))),
            }
        })
        .collect()
}

/// Reassembles the full state from every rank's state (any order; replicas across DP are
/// taken from dp rank 0, tied copies ignored). `shapes` are the full shapes by full path.
pub fn unshard(
    shapes: &BTreeMap<String, Vec<usize>>,
    ranks: &[RankState],
    mesh: &Mesh,
) -> Result<FullState, ParallelError> {
    // full path -> tp rank -> slice
    let mut parts: BTreeMap<&str, BTreeMap<usize, (&ParamSpec, &[f32])>> = BTreeMap::new();
    for rank in ranks.iter().filter(|r| r.coord.dp == 0) {
        for (specs, values) in &rank.chunks {
            for (spec, v) in specs.iter().zip(values) {
                if spec.tied_copy {
                    continue;
                }
                parts
                    .entry(spec.full_path.as_str())
                    .or_default()
                    .insert(rank.coord.tp, (spec, v.as_slice()));
            }
        }
    }
    let mut full = FullState::default();
    for (path, shape) in shapes {
        let by_tp = parts
            .get(path.as_str())
            .ok_or_else(|| ParallelError::State(format!("no rank holds `{path}`")))?;
        let spec = by_tp
            .values()
            .next()
            .map(|(s, _)| *s)
            .ok_or_else(|| ParallelError::State(format!("no rank holds `{path}`")))?;
        let needed = if spec.split == Split::Replicated {
            1
        } else {
            mesh.tp
        };
        let slices: Vec<&[f32]> = (0..needed)
            .map(|t| {
                by_tp.get(&t).map(|(_, v)| *v).ok_or_else(|| {
                    ParallelError::State(format!("tp rank {t} is missing its slice of `{path}`"))
                })
            })
            .collect::<Result<_, _>>()?;
        let value = unshard_param(spec.split, shape, &slices);
        if value.len() != shape.iter().product::<usize>() {
            return Err(ParallelError::State(format!(
                "`{path}` reassembles to {} values, its shape {shape:?} needs {}",
                value.len(),
                shape.iter().product::<usize>()
            )));
        }
        full.shapes.insert(path.clone(), shape.clone());
        full.values.insert(path.clone(), value);
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshrec_model::SideInputs;

    /// A slice map agrees with `shard_param`: every slice element comes from the full
    /// index it names, and maps back.
    #[test]
    fn slice_maps_follow_shard_param() {
        let shape = [5usize, 6];
        let full: Vec<f32> = (0..30).map(|x| x as f32).collect();
        for split in [Split::Replicated, Split::Rows, Split::Cols] {
            for tp_size in 1..4 {
                for tp in 0..tp_size {
                    let slice = shard_param(split, &shape, &full, tp_size, tp);
                    let map = SliceMap::new(split, &shape, tp_size, tp);
                    assert_eq!(map.slice_len(), slice.len(), "{split:?} {tp}/{tp_size}");
                    for (k, v) in slice.iter().enumerate() {
                        let f = map.full_index(k);
                        assert_eq!(full[f], *v);
                        assert_eq!(map.slice_index(f), Some(k));
                    }
                    let inside = (0..30).filter(|&f| map.slice_index(f).is_some()).count();
                    assert_eq!(inside, slice.len());
                }
            }
        }
    }

    #[test]
    fn specs_map_local_blocks_and_splits() {
        let s = spec_for("blocks.1.attn.wq.weight", 3, false).unwrap();
        assert_eq!(s.full_path, "blocks.4.attn.wq.weight");
        assert_eq!(s.split, Split::Cols);
        let s = spec_for("blocks.0.mlp.w2.weight", 0, false).unwrap();
        assert_eq!(s.split, Split::Rows);
        let s = spec_for("blocks.0.attn_norm.Rms.gamma", 0, false).unwrap();
        assert!(s.tp_partial_grad && s.split == Split::Replicated);
        let s = spec_for("final_norm.Rms.gamma", 0, false).unwrap();
        assert!(!s.tp_partial_grad && s.split == Split::Replicated);
        // Sequence parallelism: the final norm sees only its rank's rows.
        let s = spec_for("final_norm.Rms.gamma", 0, true).unwrap();
        assert!(s.tp_partial_grad && s.split == Split::Replicated);
        let s = spec_for(HEAD_PATH, 0, false).unwrap();
        assert!(s.tied_copy && s.full_path == TABLE_PATH && s.split == Split::Rows);
        // Module names must match whole path segments, and `*` only a block index.
        assert_eq!(tp_style("blocks.0.attn.wqx.weight"), None);
        assert_eq!(tp_style("blocks.x.attn.wq.weight"), None);
        assert_eq!(tp_style("embed.items"), None);
        let err = spec_for("blocks.0.attn.gate.weight", 0, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blocks.0.attn.gate.weight") && err.contains("TP_PLAN"),
            "{err}"
        );
    }

    #[test]
    fn the_plan_covers_every_parameter_of_every_model_variant_once() {
        use meshrec_model::config::{MlpKind, NormKind, Positions};
        use meshrec_model::{params::param_paths, Preset, Recommender};
        let device = burn::tensor::Device::default();
        for (norm, mlp, positions, genres) in [
            (NormKind::Rms, MlpKind::Gelu, Positions::Learned, true),
            (NormKind::Layer, MlpKind::SwiGlu, Positions::Rope, false),
        ] {
            let mut config = ModelConfig::preset(Preset::Tiny, 20);
            config.norm = norm;
            config.mlp = mlp;
            config.positions = positions;
            config.num_genres = genres.then_some(3);
            let item_genres: Vec<Vec<u32>> = (0..=20).map(|i| vec![i % 3]).collect();
            let model = Recommender::new(
                &config,
                &SideInputs::genres(genres.then(|| item_genres.clone())),
                &device,
            );
            for info in param_paths(&model) {
                let covering = TP_PLAN
                    .iter()
                    .filter(|(m, _)| {
                        let p: Vec<&str> = m.split('.').collect();
                        let q: Vec<&str> = info.path.split('.').collect();
                        p.len() < q.len() && p.iter().zip(&q).all(|(a, b)| a == b || *a == "*")
                    })
                    .count();
                assert_eq!(covering, 1, "{} is covered {covering} times", info.path);
                spec_for(&info.path, 0, false).unwrap();
            }
        }
    }

    #[test]
    fn shard_then_unshard_is_identity_for_uneven_splits() {
        let shape = [5usize, 7];
        let full: Vec<f32> = (0..35).map(|x| x as f32).collect();
        for split in [Split::Rows, Split::Cols, Split::Replicated] {
            for tp in 1..=4 {
                let parts: Vec<Vec<f32>> = (0..tp)
                    .map(|t| shard_param(split, &shape, &full, tp, t))
                    .collect();
                for (t, p) in parts.iter().enumerate() {
                    assert_eq!(
                        p.len(),
                        shard_shape(split, &shape, tp, t).iter().product::<usize>()
                    );
                }
                let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
                assert_eq!(
                    unshard_param(split, &shape, &refs),
                    full,
                    "{split:?} tp {tp}"
                );
            }
        }
    }

    #[test]
    fn uniform_partition_and_chunk_placement() {
        let mesh = Mesh::new(1, 1, 2).unwrap();
        let layout = Layout::uniform(mesh, 2, 5).unwrap();
        assert_eq!(layout.partition, vec![2, 1, 1, 1]);
        assert_eq!(layout.chunk_blocks(1), 2..3);
        assert_eq!(layout.model_chunk(1, 1), 3);
        assert_eq!(layout.device_of_chunk(3), 1);
        assert!(Layout::with_partition(mesh, 1, vec![5, 0], 5).is_err());
        assert!(Layout::with_partition(mesh, 1, vec![2, 2], 5).is_err());
    }
}
