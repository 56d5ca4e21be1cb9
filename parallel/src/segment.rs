//! The segment: one model chunk on one device (a contiguous run of blocks, plus the item
//! embedding on the first chunk and the final norm and tied head on the last), run forward
//! per micro-batch and backward by graph cuts, with Megatron's tensor-parallel
//! all-reduces at the cuts.
//!
//! Every tensor-parallel region is its own graph: a fresh leaf `x.detach().require_grad()` in
//! (detached first: a clone shares its node, and marking it would track `x` too),
//! a partial sum out. Forward all-reduces the partial output over the TP group; backward
//! runs `(out * g).sum().backward()` with the (replicated) upstream gradient and
//! all-reduces the partial input gradient (Megatron's `f` and `g`). With `tp == 1` the
//! all-reduces vanish and the same code runs on one device. Dropout in the replicated
//! regions (embedding, residual branches) uses masks drawn from a counter-keyed stream, so
//! every TP rank applies the same mask and a step can be replayed exactly.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use meshrec_comm::{CommError, Communicator, ReduceOp};
use meshrec_model::data::Batch;
use meshrec_model::fusion::Fusion;
use meshrec_model::loss::VocabReducer;
use meshrec_model::model::{Block, BlockDims, ItemEmbedding, Norm};
use meshrec_model::params::{
    accumulate_grads, param_paths, read_values, to_host as host, write_values, ParamInfo,
};
use meshrec_model::step::{id_tensor, tied_softmax_surrogate};
use meshrec_model::{ModelConfig, Recommender, SideInputs};
use meshrec_pipeline::Recompute;

use crate::branch::{
    branch, branch_body, branch_norm, masked, selective_attention, BranchPiece, SeqPiece,
};
use crate::dropout_key::keyed_mask;
pub use crate::dropout_key::DropoutKey;
use crate::error::ParallelError;
use crate::layout::{spec_for, Layout, ParamSpec};
use crate::mesh::Coord;
use crate::seq_shard::SeqShard;

/// The burn module of one model chunk.
#[derive(Module, Debug)]
pub struct Chunk {
    pub embed: Option<ItemEmbedding>,
    pub blocks: Vec<Block>,
    pub final_norm: Option<Norm>,
    /// The last chunk's copy of its item-table shard, tied to the embedding of the first
    /// chunk (absent when one chunk holds both ends).
    pub head: Option<Param<Tensor<2>>>,
    /// The last chunk's copy of the first chunk's text/graph fusion: the head recomputes the
    /// fused table from replicated inputs, and its parameters are tied copies like `head`
    /// (gradients summed over the embedding group, the first chunk's kept).
    pub head_fusion: Option<Fusion>,
}

/// What a forward hands on: activations for the next chunk, or the loss of the last one.
#[derive(Debug, Clone, PartialEq)]
pub enum ForwardOutput {
    /// `[batch, seq, d_model]` row-major, for the next chunk.
    Activations(Vec<f32>),
    /// Summed loss over the micro-batch's targets, and their count.
    Loss { loss_sum: f64, targets: usize },
}

/// The input of a forward: item ids on the first chunk, activations elsewhere.
pub enum ForwardInput<'a> {
    Ids(&'a Batch),
    Activations(Vec<f32>),
}

/// One graph of a micro-batch's forward, kept for its backward. (A handful per block, so
/// the variants' size difference costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
enum Piece {
    /// ids -> masked vocab-parallel lookup (partial over TP). With fusion, the lookup reads
    /// the fused table's leaf (`fused`: the table's graph and its leaf), which the chunk's
    /// head reads too, so the fusion runs once per micro-batch and its backward once, with
    /// the leaf's gradients from both uses summed.
    EmbedLookup {
        partial: Tensor<3>,
        fused: Option<(Tensor<2>, Tensor<2>)>,
    },
    /// full embedding leaf -> + positions, dropout.
    EmbedFinish { leaf: Tensor<3>, out: Tensor<3> },
    /// residual-stream leaf -> attention or MLP branch (partial over TP); the residual
    /// dropout mask applied after the all-reduce.
    Branch {
        leaf: Tensor<3>,
        partial: Tensor<3>,
        mask: Option<Tensor<3>>,
    },
    /// Full recomputation: the branch's input only (no graph); backward runs the branch
    /// again from it.
    Recomputed {
        input: Tensor<3>,
        block: usize,
        site: u64,
        mask: Option<Tensor<3>>,
    },
    /// Selective recomputation of an attention branch: the projections' graph (leaf ->
    /// queries, keys, values) and the output projection's (context leaf -> partial) are
    /// kept; the `seq²` core between them is run again in backward from `qkv`.
    SelectiveAttention {
        leaf: Tensor<3>,
        qkv: [Tensor<4>; 3],
        context: Tensor<3>,
        partial: Tensor<3>,
        block: usize,
        mask: Option<Tensor<3>>,
    },
    /// A branch under sequence parallelism (see [`SeqPiece`]), with its residual dropout
    /// mask on this rank's rows.
    Seq {
        piece: SeqPiece,
        mask: Option<Tensor<3>>,
    },
    /// The head under sequence parallelism: the final norm on this rank's rows (`leaf` ->
    /// `h`), all-gathered into `gathered` (a leaf) for the tied softmax.
    SeqHead {
        leaf: Tensor<3>,
        h: Tensor<3>,
        gathered: Tensor<3>,
        surrogate: Option<Tensor<1>>,
    },
    /// final-norm leaf -> tied softmax surrogate.
    Head {
        leaf: Tensor<3>,
        surrogate: Option<Tensor<1>>,
    },
}

/// Reduces over the tensor-parallel group (nothing to do with one rank).
struct TpReducer<'a>(&'a dyn Communicator);

impl VocabReducer for TpReducer<'_> {
    type Error = CommError;
    fn all_max(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        if self.0.size() > 1 {
            self.0.all_reduce(values, ReduceOp::Max)?;
        }
        Ok(())
    }
    fn all_sum(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        if self.0.size() > 1 {
            self.0.all_reduce(values, ReduceOp::Sum)?;
        }
        Ok(())
    }
}

/// Sums a tensor over the TP group through host memory; untouched with one rank.
fn tp_all_reduce(t: Tensor<3>, tp: &dyn Communicator) -> Result<Tensor<3>, ParallelError> {
    if tp.size() == 1 {
        return Ok(t);
    }
    let dims = t.dims();
    let device = t.device();
    let mut values = host(t);
    tp.all_reduce(&mut values, ReduceOp::Sum)?;
    Ok(meshrec_model::transfer::upload(
        TensorData::new(values, dims),
        &device,
    ))
}

/// One model chunk on one rank, with its stashed micro-batches and gradient accumulators.
pub struct Segment {
    pub chunk: Chunk,
    /// The model chunk's index (`0 .. pp × virtual_stages`).
    pub model_chunk: usize,
    pub first_block: usize,
    pub is_first: bool,
    pub is_last: bool,
    pub infos: Vec<ParamInfo>,
    pub specs: Vec<ParamSpec>,
    /// Accumulated parameter gradients in [`Segment::infos`] order.
    pub grads: Vec<Vec<f32>>,
    pub dropout_key: DropoutKey,
    /// First item row of this rank's vocabulary shard.
    vocab_first: usize,
    dropout: f64,
    d_model: usize,
    training: bool,
    device: Device,
    stash: BTreeMap<usize, Vec<Piece>>,
    peak_in_flight: usize,
    recompute: Recompute,
    /// Sequence parallelism: this rank's place in its TP group, whose ranks each hold a
    /// contiguous `1/tp` of every micro-batch's sequence positions in the residual stream.
    seq_shard: Option<SeqShard>,
    /// Per parameter, the forward index of the first piece that uses it: its gradient is
    /// complete once backward has passed that piece.
    release_piece: Vec<usize>,
}

/// A callback told that parameter `index` (in [`Segment::infos`] order, with this rank's
/// shape of it) has its final gradient for the step: what data parallelism needs to start
/// reducing it during backward.
pub type GradReady<'a> = &'a mut dyn FnMut(usize, &[usize], &[f32]) -> Result<(), ParallelError>;

/// The forward index of the first graph piece using parameter `path` of a chunk with
/// `n_blocks` blocks (pieces: embedding lookup and finish on the first chunk, attention and
/// MLP per block, the head on the last).
fn release_piece(path: &str, is_first: bool, n_blocks: usize) -> usize {
    let base = if is_first { 2 } else { 0 };
    if path.starts_with("embed.positions") {
        return 1;
    }
    if path.starts_with("embed.") {
        return 0;
    }
    if let Some(rest) = path.strip_prefix("blocks.") {
        let (index, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let i = index.parse::<usize>().unwrap_or(0);
        let mlp = tail.starts_with("mlp");
        return base + 2 * i + usize::from(mlp);
    }
    base + 2 * n_blocks
}

impl Segment {
    /// Builds model chunk `model_chunk` of `layout` for the rank at `coord`, parameters
    /// uninitialised (load them with [`Segment::set_values`]).
    pub fn new(
        config: &ModelConfig,
        side: &SideInputs,
        layout: &Layout,
        coord: Coord,
        model_chunk: usize,
        device: &Device,
    ) -> Result<Self, ParallelError> {
        // Training needs the autodiff device whatever the caller passed.
        let device = &device.clone().autodiff();
        let blocks = layout.chunk_blocks(model_chunk);
        let vocab = layout.vocab_rows(config, coord.tp);
        let dims = BlockDims::shard(config, layout.mesh.tp);
        let is_first = layout.is_first_chunk(model_chunk);
        let is_last = layout.is_last_chunk(model_chunk);
        let shard = Recommender::new_shard(
            config,
            side,
            dims,
            vocab.start,
            vocab.len(),
            blocks.len(),
            device,
        );
        let head = (is_last && !is_first)
            .then(|| Param::from_tensor(Tensor::zeros([vocab.len(), config.d_model], device)));
        let mut embed = shard.embed;
        let head_fusion = if is_last && !is_first {
            embed.fusion.take()
        } else {
            None
        };
        let chunk = Chunk {
            embed: is_first.then_some(embed),
            blocks: shard.blocks,
            final_norm: is_last.then_some(shard.final_norm),
            head,
            head_fusion,
        };
        let infos = param_paths(&chunk);
        let specs = infos
            .iter()
            .map(|i| spec_for(&i.path, blocks.start, layout.splits_sequence()))
            .collect::<Result<_, _>>()?;
        let grads = infos.iter().map(|i| vec![0.0; i.numel()]).collect();
        let release_piece = infos
            .iter()
            .map(|i| release_piece(&i.path, is_first, blocks.len()))
            .collect();
        Ok(Self {
            chunk,
            model_chunk,
            first_block: blocks.start,
            is_first,
            is_last,
            infos,
            specs,
            grads,
            dropout_key: DropoutKey::default(),
            vocab_first: vocab.start,
            dropout: config.dropout,
            d_model: config.d_model,
            training: true,
            device: device.clone(),
            stash: BTreeMap::new(),
            peak_in_flight: 0,
            recompute: Recompute::None,
            seq_shard: layout.splits_sequence().then_some(SeqShard {
                rank: coord.tp,
                size: layout.mesh.tp,
            }),
            release_piece,
        })
    }

    /// Width of the activations this chunk takes and gives.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Replaces the parameter values (in [`Segment::infos`] order).
    pub fn set_values(&mut self, values: &[Vec<f32>]) -> Result<(), ParallelError> {
        if values.len() != self.infos.len()
            || values
                .iter()
                .zip(&self.infos)
                .any(|(v, i)| v.len() != i.numel())
        {
            return Err(ParallelError::State(format!(
                "chunk {} expects {} parameters of sizes {:?}",
                self.model_chunk,
                self.infos.len(),
                self.infos.iter().map(ParamInfo::numel).collect::<Vec<_>>()
            )));
        }
        let chunk = std::mem::replace(&mut self.chunk, Chunk::empty());
        self.chunk = write_values(chunk, values, &self.device);
        Ok(())
    }

    pub fn values(&self) -> Vec<Vec<f32>> {
        read_values(&self.chunk)
    }

    /// Zeroed full-size gradient accumulators for a step (under ZeRO-2 the previous step
    /// left only this rank's shards in them).
    pub fn zero_grads(&mut self) {
        for (g, info) in self.grads.iter_mut().zip(&self.infos) {
            if g.len() == info.numel() {
                g.fill(0.0);
            } else {
                *g = vec![0.0; info.numel()];
            }
        }
    }

    /// Drops what a step that failed part-way left: its stashed forwards (their graphs go
    /// with them) and its gradients, so the step can run again (an elastic membership
    /// change redoes it).
    pub fn abandon_step(&mut self) {
        self.stash.clear();
        self.peak_in_flight = 0;
        self.zero_grads();
    }

    /// What backward recomputes instead of keeping (see [`Recompute`]).
    pub fn set_recompute(&mut self, recompute: Recompute) {
        self.recompute = recompute;
    }

    /// Dropout on (training) or off (evaluation, equivalence tests).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Micro-batches whose forward ran and whose backward has not.
    pub fn in_flight(&self) -> usize {
        self.stash.len()
    }

    /// The most micro-batches stashed at once since the last [`Segment::reset_peak`]: the
    /// activation memory a schedule really needed.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_in_flight
    }

    pub fn reset_peak(&mut self) {
        self.peak_in_flight = self.stash.len();
    }

    fn prob(&self) -> f64 {
        if self.training {
            self.dropout
        } else {
            0.0
        }
    }

    /// Runs the chunk forward for micro-batch `mb` and stashes its graphs. On the last chunk
    /// also computes the loss (scaled for backward by `grad_scale`).
    pub fn forward(
        &mut self,
        mb: usize,
        batch: &Batch,
        input: ForwardInput<'_>,
        grad_scale: f32,
        tp: &dyn Communicator,
    ) -> Result<ForwardOutput, ParallelError> {
        let (b, s) = (batch.batch_size, batch.seq_len);
        if let Some(shard) = self.seq_shard {
            if !s.is_multiple_of(shard.size) {
                return Err(ParallelError::Step(format!(
                    "sequence parallelism splits {s} positions over tp {}: it must divide them",
                    shard.size
                )));
            }
        }
        let prob = self.prob();
        let mut pieces = Vec::with_capacity(2 * self.chunk.blocks.len() + 3);
        let mut fused_leaf: Option<Tensor<2>> = None;
        let mut x = match input {
            ForwardInput::Ids(batch) => {
                let embed = self.chunk.embed.as_ref().ok_or_else(|| {
                    ParallelError::Step(format!(
                        "chunk {} got ids but holds no embedding",
                        self.model_chunk
                    ))
                })?;
                let ids = id_tensor(&batch.inputs, b, s, &self.device);
                // Fusion is refused with TP, so a fused table is always whole here.
                let fused = embed.fusion.as_ref().map(|_| {
                    let table = embed.table();
                    let leaf = table.clone().detach().require_grad();
                    (table, leaf)
                });
                fused_leaf = fused.as_ref().map(|(_, leaf)| leaf.clone());
                let partial = match &fused_leaf {
                    Some(leaf) => embed.lookup_in(leaf.clone(), ids),
                    None => embed.lookup(ids),
                };
                let full = match self.seq_shard {
                    Some(shard) => shard.scatter(partial.clone().detach(), tp)?,
                    None => tp_all_reduce(partial.clone().detach(), tp)?,
                };
                pieces.push(Piece::EmbedLookup { partial, fused });
                let leaf = full.detach().require_grad();
                let offset = self.seq_shard.map_or(0, |shard| shard.offset(s));
                let mut out = embed.place_at(leaf.clone(), offset);
                let d = out.dims()[2];
                if let Some(mask) = self.keyed_rows_mask(mb, usize::MAX, 0, [b, s, d], prob) {
                    out = out * mask;
                }
                let next = out.clone().detach();
                pieces.push(Piece::EmbedFinish { leaf, out });
                next
            }
            ForwardInput::Activations(values) => {
                let s = self.seq_shard.map_or(s, |shard| s / shard.size);
                let d = values.len() / (b * s).max(1);
                if values.len() != b * s * d || d == 0 {
                    return Err(ParallelError::Step(format!(
                        "chunk {} received {} activation values for a {b}×{s} micro-batch",
                        self.model_chunk,
                        values.len()
                    )));
                }
                meshrec_model::transfer::upload(TensorData::new(values, [b, s, d]), &self.device)
            }
        };
        let tp_rank = tp.rank();
        for (i, block) in self.chunk.blocks.iter().enumerate() {
            let global = self.first_block + i;
            for site in 0..2u64 {
                self.dropout_key.seed_branch(mb, global, site, tp_rank);
                if let Some(shard) = self.seq_shard {
                    let (partial, piece) = match (self.recompute, site) {
                        (Recompute::Full, _) => {
                            // Without a graph, as the unsplit full recomputation.
                            let input = x.clone().detach();
                            let plain = block.valid();
                            let normed = branch_norm(&plain, site, input.clone().inner());
                            let gathered = shard.gather(normed, tp)?;
                            let partial = meshrec_model::dropout::training_without_graph(|| {
                                branch_body(&plain, site, gathered)
                            });
                            (
                                partial.autodiff(),
                                SeqPiece::Recomputed {
                                    input,
                                    block: i,
                                    site,
                                },
                            )
                        }
                        (Recompute::Selective, 0) => {
                            let leaf = x.clone().detach().require_grad();
                            let normed = block.attn_norm.forward(leaf.clone());
                            let gathered =
                                shard.gather(normed.clone().detach(), tp)?.require_grad();
                            let (qkv, context, partial) =
                                selective_attention(block, gathered.clone());
                            (
                                partial.clone(),
                                SeqPiece::Selective {
                                    leaf,
                                    normed,
                                    gathered,
                                    qkv,
                                    context,
                                    partial,
                                    block: i,
                                },
                            )
                        }
                        _ => {
                            let leaf = x.clone().detach().require_grad();
                            let normed = branch_norm(block, site, leaf.clone());
                            let gathered =
                                shard.gather(normed.clone().detach(), tp)?.require_grad();
                            let partial = branch_body(block, site, gathered.clone());
                            (
                                partial.clone(),
                                SeqPiece::Kept {
                                    leaf,
                                    normed,
                                    gathered,
                                    partial,
                                },
                            )
                        }
                    };
                    let reduced = shard.scatter(partial.detach(), tp)?;
                    let [rb, _, rd] = reduced.dims();
                    let mask = self.keyed_rows_mask(mb, global, site + 1, [rb, s, rd], prob);
                    x = match &mask {
                        Some(m) => x + reduced * m.clone(),
                        None => x + reduced,
                    };
                    pieces.push(Piece::Seq { piece, mask });
                    continue;
                }
                let (partial, piece) = match (self.recompute, site) {
                    (Recompute::Full, _) => {
                        // On the plain device: autodiff would record a graph (freed only at
                        // the next backward) even for outputs that are dropped.
                        let input = x.clone().detach();
                        let plain = block.valid();
                        let partial = meshrec_model::dropout::training_without_graph(|| {
                            branch(&plain, site, input.clone().inner())
                        });
                        (partial.autodiff(), BranchPiece::Recomputed { input })
                    }
                    (Recompute::Selective, 0) => {
                        let leaf = x.clone().detach().require_grad();
                        let normed = block.attn_norm.forward(leaf.clone());
                        let (qkv, context, partial) = selective_attention(block, normed);
                        (
                            partial.clone(),
                            BranchPiece::Selective {
                                leaf,
                                qkv,
                                context,
                                partial,
                            },
                        )
                    }
                    _ => {
                        let leaf = x.clone().detach().require_grad();
                        let partial = branch(block, site, leaf.clone());
                        (partial.clone(), BranchPiece::Kept { leaf, partial })
                    }
                };
                let reduced = tp_all_reduce(partial.detach(), tp)?;
                let mask = keyed_mask(
                    self.dropout_key.stream(mb, global, site + 1),
                    reduced.dims(),
                    prob,
                    &self.device,
                );
                x = match &mask {
                    Some(m) => x + reduced * m.clone(),
                    None => x + reduced,
                };
                pieces.push(match piece {
                    BranchPiece::Kept { leaf, partial } => Piece::Branch {
                        leaf,
                        partial,
                        mask,
                    },
                    BranchPiece::Recomputed { input } => Piece::Recomputed {
                        input,
                        block: i,
                        site,
                        mask,
                    },
                    BranchPiece::Selective {
                        leaf,
                        qkv,
                        context,
                        partial,
                    } => Piece::SelectiveAttention {
                        leaf,
                        qkv,
                        context,
                        partial,
                        block: i,
                        mask,
                    },
                });
            }
        }
        let output = if self.is_last {
            let norm = self.chunk.final_norm.as_ref().ok_or_else(|| {
                ParallelError::Step(format!("last chunk {} has no final norm", self.model_chunk))
            })?;
            let leaf = x.detach().require_grad();
            let h = norm.forward(leaf.clone());
            // Under sequence parallelism the softmax takes the whole sequence's rows.
            let gathered = match self.seq_shard {
                Some(shard) => Some(shard.gather(h.clone().detach(), tp)?.require_grad()),
                None => None,
            };
            let table = match (&fused_leaf, &self.chunk.head, &self.chunk.embed) {
                // One chunk holds both ends: the head reads the lookup's fused leaf.
                (Some(leaf), _, _) => leaf.clone(),
                (None, Some(head), _) => match &self.chunk.head_fusion {
                    Some(fusion) => fusion.table(head.val()),
                    None => head.val(),
                },
                (None, None, Some(embed)) => embed.table(),
                (None, None, None) => {
                    return Err(ParallelError::Step(format!(
                        "last chunk {} holds no item table",
                        self.model_chunk
                    )))
                }
            };
            let (loss_sum, targets, surrogate) = tied_softmax_surrogate(
                gathered.clone().unwrap_or_else(|| h.clone()),
                &batch.targets,
                table,
                self.vocab_first,
                grad_scale,
                &mut TpReducer(tp),
            )?;
            pieces.push(match gathered {
                Some(gathered) => Piece::SeqHead {
                    leaf,
                    h,
                    gathered,
                    surrogate,
                },
                None => Piece::Head { leaf, surrogate },
            });
            ForwardOutput::Loss { loss_sum, targets }
        } else {
            ForwardOutput::Activations(host(x))
        };
        if self.stash.insert(mb, pieces).is_some() {
            return Err(ParallelError::Step(format!(
                "chunk {} ran forward twice for micro-batch {mb} without a backward",
                self.model_chunk
            )));
        }
        self.peak_in_flight = self.peak_in_flight.max(self.stash.len());
        Ok(output)
    }

    /// Runs the backward of micro-batch `mb` given the gradient of its output (`None` on
    /// the last chunk, whose loss is the start), accumulating parameter gradients. Returns
    /// the gradient of the chunk's input (`None` on the first chunk).
    pub fn backward(
        &mut self,
        mb: usize,
        grad_output: Option<Vec<f32>>,
        tp: &dyn Communicator,
    ) -> Result<Option<Vec<f32>>, ParallelError> {
        self.backward_releasing(mb, grad_output, tp, None)
    }

    /// [`Segment::backward`] that also hands each parameter's gradient to `ready` as soon as
    /// the pieces using it are done (call it on the step's last backward of this chunk).
    pub fn backward_releasing(
        &mut self,
        mb: usize,
        grad_output: Option<Vec<f32>>,
        tp: &dyn Communicator,
        mut ready: Option<GradReady<'_>>,
    ) -> Result<Option<Vec<f32>>, ParallelError> {
        let pieces = self.stash.remove(&mb).ok_or_else(|| {
            ParallelError::Step(format!(
                "chunk {} has no forward stashed for micro-batch {mb}",
                self.model_chunk
            ))
        })?;
        // The fused table's leaf, read by the lookup and (on a chunk holding both ends) the
        // head: its gradient from the head waits for the lookup's.
        let fused_leaf = match pieces.first() {
            Some(Piece::EmbedLookup {
                fused: Some((_, leaf)),
                ..
            }) => Some(leaf.clone()),
            _ => None,
        };
        let mut d_table_from_head: Option<Tensor<2>> = None;
        let mut g: Option<Tensor<3>> = None;
        if let Some(values) = grad_output {
            let dims = match pieces.last() {
                Some(Piece::Branch { leaf, .. })
                | Some(Piece::Seq {
                    piece: SeqPiece::Kept { leaf, .. } | SeqPiece::Selective { leaf, .. },
                    ..
                })
                | Some(Piece::Seq {
                    piece: SeqPiece::Recomputed { input: leaf, .. },
                    ..
                })
                | Some(Piece::EmbedFinish { leaf, .. })
                | Some(Piece::SelectiveAttention { leaf, .. })
                | Some(Piece::Recomputed { input: leaf, .. }) => leaf.dims(),
                _ => {
                    return Err(ParallelError::Step(format!(
                        "chunk {} got an output gradient but ends in the head",
                        self.model_chunk
                    )))
                }
            };
            if values.len() != dims.iter().product::<usize>() {
                return Err(ParallelError::Step(format!(
                    "chunk {} received {} gradient values, expected {:?}",
                    self.model_chunk,
                    values.len(),
                    dims
                )));
            }
            g = Some(meshrec_model::transfer::upload(
                TensorData::new(values, dims),
                &self.device,
            ));
        }
        for (index, piece) in pieces.into_iter().enumerate().rev() {
            g = match piece {
                Piece::Head { leaf, surrogate } => match surrogate {
                    Some(surrogate) => {
                        let grads = surrogate.backward();
                        accumulate_grads(&self.chunk, &grads, &mut self.grads);
                        d_table_from_head = fused_leaf.as_ref().and_then(|t| t.grad(&grads));
                        leaf.grad(&grads)
                    }
                    None => Some(leaf.zeros_like().without_autodiff()),
                },
                Piece::Branch {
                    leaf,
                    partial,
                    mask,
                } => {
                    let g = upstream(g, self.model_chunk)?;
                    Some(self.branch_backward(&leaf, partial, g, mask, tp)?)
                }
                Piece::Seq { piece, mask } => {
                    let g = upstream(g, self.model_chunk)?;
                    Some(self.seq_backward(mb, piece, g, mask, tp)?)
                }
                Piece::SeqHead {
                    leaf,
                    h,
                    gathered,
                    surrogate,
                } => match surrogate {
                    Some(surrogate) => {
                        let shard = self.seq_shard.ok_or_else(|| {
                            ParallelError::Step("a sequence-parallel piece without a shard".into())
                        })?;
                        let grads = surrogate.backward();
                        accumulate_grads(&self.chunk, &grads, &mut self.grads);
                        // The softmax's `h` gradient is whole on every rank: keep our rows.
                        let d_h = gathered
                            .grad(&grads)
                            .map(|d| shard.rows(d))
                            .unwrap_or_else(|| h.zeros_like().without_autodiff());
                        let grads = (h * d_h).sum().backward();
                        accumulate_grads(&self.chunk, &grads, &mut self.grads);
                        leaf.grad(&grads)
                    }
                    None => Some(leaf.zeros_like().without_autodiff()),
                },
                Piece::Recomputed {
                    input,
                    block,
                    site,
                    mask,
                } => {
                    let g = upstream(g, self.model_chunk)?;
                    let global = self.first_block + block;
                    self.dropout_key.seed_branch(mb, global, site, tp.rank());
                    let leaf = input.require_grad();
                    let partial = branch(&self.chunk.blocks[block], site, leaf.clone());
                    Some(self.branch_backward(&leaf, partial, g, mask, tp)?)
                }
                Piece::SelectiveAttention {
                    leaf,
                    qkv,
                    context,
                    partial,
                    block,
                    mask,
                } => {
                    let g = upstream(g, self.model_chunk)?;
                    let grads = self.selective_backward(
                        mb,
                        block,
                        qkv,
                        context,
                        partial,
                        masked(&g, mask),
                        tp,
                    )?;
                    let partial_dx = leaf.grad(&grads).unwrap_or_else(|| g.zeros_like());
                    Some(g + tp_all_reduce(partial_dx, tp)?)
                }
                Piece::EmbedFinish { leaf, out } => {
                    let g = upstream(g, self.model_chunk)?;
                    let grads = (out * g.clone()).sum().backward();
                    accumulate_grads(&self.chunk, &grads, &mut self.grads);
                    Some(leaf.grad(&grads).unwrap_or(g))
                }
                Piece::EmbedLookup { partial, fused } => {
                    let mut g = upstream(g, self.model_chunk)?;
                    if let Some(shard) = self.seq_shard {
                        g = shard.gather(g, tp)?;
                    }
                    let grads = (partial * g).sum().backward();
                    accumulate_grads(&self.chunk, &grads, &mut self.grads);
                    if let Some((table, leaf)) = fused {
                        let from_lookup = leaf.grad(&grads);
                        let d_table = match (from_lookup, d_table_from_head.take()) {
                            (Some(a), Some(b)) => Some(a + b),
                            (a, b) => a.or(b),
                        };
                        if let Some(d_table) = d_table {
                            let grads = (table * d_table).sum().backward();
                            accumulate_grads(&self.chunk, &grads, &mut self.grads);
                        }
                    }
                    None
                }
            };
            if let Some(ready) = ready.as_mut() {
                for (p, _) in self
                    .release_piece
                    .iter()
                    .enumerate()
                    .filter(|(_, &r)| r == index)
                {
                    ready(p, &self.infos[p].shape, &self.grads[p])?;
                }
            }
        }
        Ok(if self.is_first { None } else { g.map(host) })
    }
}

impl Segment {
    /// The keyed dropout mask of a site for the whole sequence (`dims`), cut to this
    /// rank's rows under sequence parallelism: the same mask as without it.
    fn keyed_rows_mask(
        &self,
        mb: usize,
        block: usize,
        site: u64,
        dims: [usize; 3],
        prob: f64,
    ) -> Option<Tensor<3>> {
        let mask = keyed_mask(
            self.dropout_key.stream(mb, block, site),
            dims,
            prob,
            &self.device,
        )?;
        Some(match self.seq_shard {
            Some(shard) => shard.rows(mask),
            None => mask,
        })
    }

    /// Selective recomputation's backward of attention branch `block` from its output
    /// gradient `g_out` (after the residual mask): the output projection from the kept
    /// context, then the core rerun with the forward's dropout masks on the kept q, k, v —
    /// still nodes of the projections' graph, so one backward runs through the recomputed
    /// core and the projections to the branch input. Returns that backward's gradients.
    #[allow(clippy::too_many_arguments)]
    fn selective_backward(
        &mut self,
        mb: usize,
        block: usize,
        qkv: [Tensor<4>; 3],
        context: Tensor<3>,
        partial: Tensor<3>,
        g_out: Tensor<3>,
        tp: &dyn Communicator,
    ) -> Result<Gradients, ParallelError> {
        let grads = (partial * g_out).sum().backward();
        accumulate_grads(&self.chunk, &grads, &mut self.grads);
        let d_context = context.grad(&grads).ok_or_else(|| {
            ParallelError::Step(format!(
                "chunk {}: the attention context has no gradient",
                self.model_chunk
            ))
        })?;
        let global = self.first_block + block;
        self.dropout_key.seed_branch(mb, global, 0, tp.rank());
        let [q, k, v] = qkv;
        let core = self.chunk.blocks[block].attn.core(q, k, v);
        let grads = (core * d_context).sum().backward();
        accumulate_grads(&self.chunk, &grads, &mut self.grads);
        Ok(grads)
    }

    /// Backward through a sequence-parallel branch given the residual stream's gradient
    /// rows `g`: the reduce-scatter's backward (an all-gather of `g`), the branch body
    /// (rerun first under recomputation), the all-gather's backward (this rank's rows of
    /// the TP sum), the norm. Returns `g` plus the branch's input gradient rows.
    fn seq_backward(
        &mut self,
        mb: usize,
        piece: SeqPiece,
        g: Tensor<3>,
        mask: Option<Tensor<3>>,
        tp: &dyn Communicator,
    ) -> Result<Tensor<3>, ParallelError> {
        let shard = self.seq_shard.ok_or_else(|| {
            ParallelError::Step("a sequence-parallel piece without a shard".into())
        })?;
        let g_whole = shard.gather(masked(&g, mask), tp)?;
        let (leaf, normed, d_gathered) = match piece {
            SeqPiece::Kept {
                leaf,
                normed,
                gathered,
                partial,
            } => {
                let grads = (partial * g_whole).sum().backward();
                accumulate_grads(&self.chunk, &grads, &mut self.grads);
                (leaf, normed, gathered.grad(&grads))
            }
            SeqPiece::Recomputed { input, block, site } => {
                let leaf = input.require_grad();
                let blk = &self.chunk.blocks[block];
                let normed = branch_norm(blk, site, leaf.clone());
                let gathered = shard.gather(normed.clone().detach(), tp)?.require_grad();
                let global = self.first_block + block;
                self.dropout_key.seed_branch(mb, global, site, tp.rank());
                let partial = branch_body(&self.chunk.blocks[block], site, gathered.clone());
                let grads = (partial * g_whole).sum().backward();
                accumulate_grads(&self.chunk, &grads, &mut self.grads);
                (leaf, normed, gathered.grad(&grads))
            }
            SeqPiece::Selective {
                leaf,
                normed,
                gathered,
                qkv,
                context,
                partial,
                block,
            } => {
                let grads =
                    self.selective_backward(mb, block, qkv, context, partial, g_whole, tp)?;
                (leaf, normed, gathered.grad(&grads))
            }
        };
        let d_normed = match d_gathered {
            Some(d) => shard.scatter(d, tp)?,
            None => normed.zeros_like(),
        };
        let grads = (normed * d_normed).sum().backward();
        accumulate_grads(&self.chunk, &grads, &mut self.grads);
        let dx = leaf.grad(&grads).unwrap_or_else(|| g.zeros_like());
        Ok(g + dx)
    }

    /// Backward through a branch's graph (`leaf` -> `partial`) given the residual stream's
    /// gradient `g`: accumulates the parameter gradients and returns `g` plus the branch's
    /// input gradient, summed over the TP group.
    fn branch_backward(
        &mut self,
        leaf: &Tensor<3>,
        partial: Tensor<3>,
        g: Tensor<3>,
        mask: Option<Tensor<3>>,
        tp: &dyn Communicator,
    ) -> Result<Tensor<3>, ParallelError> {
        let grads = (partial * masked(&g, mask)).sum().backward();
        accumulate_grads(&self.chunk, &grads, &mut self.grads);
        let partial_dx = leaf.grad(&grads).unwrap_or_else(|| g.zeros_like());
        Ok(g + tp_all_reduce(partial_dx, tp)?)
    }
}

fn upstream(g: Option<Tensor<3>>, chunk: usize) -> Result<Tensor<3>, ParallelError> {
    g.ok_or_else(|| {
        ParallelError::Step(format!("chunk {chunk}: backward has no upstream gradient"))
    })
}

impl Chunk {
    fn empty() -> Self {
        Self {
            embed: None,
            blocks: Vec::new(),
            final_norm: None,
            head: None,
            head_fusion: None,
        }
    }
}
