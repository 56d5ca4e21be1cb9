//! The recommender as an explicit list of pieces: item embedding, transformer blocks, final
//! norm, and the output head tied to the item table. Each piece has its own forward so that
//! pipeline stages and tensor-parallel shards can cut the model anywhere.

use burn::module::{Module, Param};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig, RmsNorm, RmsNormConfig,
};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::causal_softmax::causal_softmax;
use crate::config::{MlpKind, ModelConfig, NormKind, Positions};
use crate::dropout;
use crate::fusion::{Fusion, SideInputs};
use crate::gelu::gelu;
use crate::transfer::upload;

/// RMSNorm or LayerNorm.
#[derive(Module, Debug)]
pub enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    pub fn new(kind: NormKind, d: usize, device: &Device) -> Self {
        match kind {
            NormKind::Rms => Norm::Rms(RmsNormConfig::new(d).with_epsilon(1e-6).init(device)),
            NormKind::Layer => Norm::Layer(LayerNormConfig::new(d).init(device)),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer(n) => n.forward(x),
        }
    }
}

fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(false).init(device)
}

/// The sizes of one block as held by one tensor-parallel rank: with `tp` ranks, `heads` is
/// `n_heads / tp` and `d_ff` is `d_ff / tp`; on one device they are the full sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDims {
    pub d_model: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
}

impl BlockDims {
    pub fn full(config: &ModelConfig) -> Self {
        Self {
            d_model: config.d_model,
            heads: config.n_heads,
            head_dim: config.head_dim(),
            d_ff: config.d_ff,
        }
    }

    /// The share of one of `tp` tensor-parallel ranks (divisibility checked by the mesh).
    pub fn shard(config: &ModelConfig, tp: usize) -> Self {
        Self {
            d_model: config.d_model,
            heads: config.n_heads / tp,
            head_dim: config.head_dim(),
            d_ff: config.d_ff / tp,
        }
    }
}

/// Causal multi-head self-attention. `wq`, `wk`, `wv` are column-parallel (heads split over
/// TP ranks), `wo` row-parallel: on a TP shard `forward` returns a partial sum.
#[derive(Module, Debug)]
pub struct Attention {
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub dropout: Dropout,
    #[module(skip)]
    pub heads: usize,
    #[module(skip)]
    pub head_dim: usize,
    #[module(skip)]
    pub rope: bool,
}

/// Rotary position tables `[seq, head_dim]` (GPT-NeoX "rotate half" layout).
fn rope_tables(seq: usize, head_dim: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(seq * head_dim);
    let mut sin = Vec::with_capacity(seq * head_dim);
    for pos in 0..seq {
        for i in 0..head_dim {
            let freq = 10_000f64.powf(-((i % half) as f64) * 2.0 / head_dim as f64);
            let angle = pos as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let shape = [seq, head_dim];
    (
        upload(TensorData::new(cos, shape), device),
        upload(TensorData::new(sin, shape), device),
    )
}

fn apply_rope(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    let [_, _, _, hd] = x.dims();
    let half = hd / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone().unsqueeze::<4>() + rotated * sin.clone().unsqueeze::<4>()
}

impl Attention {
    pub fn new(dims: BlockDims, dropout: f64, rope: bool, device: &Device) -> Self {
        let inner = dims.heads * dims.head_dim;
        Self {
            wq: linear(dims.d_model, inner, device),
            wk: linear(dims.d_model, inner, device),
            wv: linear(dims.d_model, inner, device),
            wo: linear(inner, dims.d_model, device),
            dropout: DropoutConfig::new(dropout).init(),
            heads: dims.heads,
            head_dim: dims.head_dim,
            rope,
        }
    }

    /// `x`: `[batch, seq, d_model]` (already normalised) -> `[batch, seq, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [q, k, v] = self.project(x);
        self.wo.forward(self.core(q, k, v))
    }

    /// The query, key and value projections `[batch, heads, seq, head_dim]` (rotated when
    /// RoPE is on): what selective recomputation keeps of the attention.
    pub fn project(&self, x: Tensor<3>) -> [Tensor<4>; 3] {
        let [b, s, _] = x.dims();
        let split = |t: Tensor<3>| t.reshape([b, s, self.heads, self.head_dim]).swap_dims(1, 2);
        let mut q = split(self.wq.forward(x.clone()));
        let mut k = split(self.wk.forward(x.clone()));
        let v = split(self.wv.forward(x));
        if self.rope {
            let (cos, sin) = rope_tables(s, self.head_dim, &q.device());
            q = apply_rope(q, &cos, &sin);
            k = apply_rope(k, &cos, &sin);
        }
        [q, k, v]
    }

    /// Causal scaled dot-product attention with dropout on the probabilities, heads merged
    /// back: `[batch, seq, heads · head_dim]`. Its `seq²`-sized intermediates (scores,
    /// probabilities, dropout mask) are what selective recomputation recomputes
    /// (Korthikanti et al.).
    pub fn core(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
        let [b, _, s, _] = q.dims();
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let probs = causal_softmax(q.matmul(k.swap_dims(2, 3)), scale);
        let probs = dropout::apply(&self.dropout, probs);
        probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, s, self.heads * self.head_dim])
    }
}

/// The feed-forward network: SwiGLU (`w1` gate, `w3` up, `w2` down) or GELU (`w1` up, `w2`
/// down). `w1`/`w3` are column-parallel, `w2` row-parallel.
#[derive(Module, Debug)]
pub struct Mlp {
    pub w1: Linear,
    pub w2: Linear,
    pub w3: Option<Linear>,
}

impl Mlp {
    pub fn new(kind: MlpKind, d_model: usize, d_ff: usize, device: &Device) -> Self {
        Self {
            w1: linear(d_model, d_ff, device),
            w2: linear(d_ff, d_model, device),
            w3: (kind == MlpKind::SwiGlu).then(|| linear(d_model, d_ff, device)),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let hidden = match &self.w3 {
            Some(w3) => silu(self.w1.forward(x.clone())) * w3.forward(x),
            None => gelu(self.w1.forward(x)),
        };
        self.w2.forward(hidden)
    }
}

/// A pre-norm transformer block: `x + drop(attn(norm(x)))`, then `h + drop(mlp(norm(h)))`.
#[derive(Module, Debug)]
pub struct Block {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub mlp_norm: Norm,
    pub mlp: Mlp,
    pub residual_dropout: Dropout,
}

impl Block {
    pub fn new(config: &ModelConfig, dims: BlockDims, device: &Device) -> Self {
        Self {
            attn_norm: Norm::new(config.norm, dims.d_model, device),
            attn: Attention::new(
                dims,
                config.dropout,
                config.positions == Positions::Rope,
                device,
            ),
            mlp_norm: Norm::new(config.norm, dims.d_model, device),
            mlp: Mlp::new(config.mlp, dims.d_model, dims.d_ff, device),
            residual_dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    /// The attention branch without the residual: a partial sum on a TP shard.
    pub fn attention_branch(&self, x: Tensor<3>) -> Tensor<3> {
        self.attn.forward(self.attn_norm.forward(x))
    }

    /// The MLP branch without the residual: a partial sum on a TP shard.
    pub fn mlp_branch(&self, x: Tensor<3>) -> Tensor<3> {
        self.mlp.forward(self.mlp_norm.forward(x))
    }

    /// Adds a (fully reduced) branch output to the residual stream.
    pub fn residual(&self, x: Tensor<3>, branch: Tensor<3>) -> Tensor<3> {
        x + dropout::apply(&self.residual_dropout, branch)
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.residual(x.clone(), self.attention_branch(x));
        self.residual(h.clone(), self.mlp_branch(h))
    }
}

/// Item embedding (a contiguous range of item rows on a vocab-parallel shard), plus learned
/// positions and genre side-features when configured.
#[derive(Module, Debug)]
pub struct ItemEmbedding {
    /// `[rows, d]`: items `first_item .. first_item + rows`; row 0 of the full table is padding.
    pub items: Embedding,
    pub positions: Option<Embedding>,
    pub genres: Option<Embedding>,
    /// `[rows, num_genres]`: each item's genres, averaged (a constant, not a parameter).
    pub genre_mix: Option<Tensor<2>>,
    /// Text and graph fused into the item rows (on a table that holds every row).
    pub fusion: Option<Fusion>,
    pub dropout: Dropout,
    /// Factor on the looked-up embedding before positions are added: `sqrt(d_model)` when
    /// `ModelConfig::scale_embedding` (the Transformer's and SASRec's convention, which keeps
    /// the item signal above the positions' at a small init), else 1.
    #[module(skip)]
    pub input_scale: f64,
    #[module(skip)]
    pub first_item: usize,
    /// Rows of the full table: a shard holds fewer.
    #[module(skip)]
    pub vocab: usize,
}

impl ItemEmbedding {
    /// Looks up `[batch, seq]` item ids. Ids outside this shard's range give zeros (the
    /// vocab-parallel masked lookup); on one device every id is in range.
    pub fn lookup(&self, items: Tensor<2, Int>) -> Tensor<3> {
        let [rows, _] = self.items.weight.dims();
        let in_full_range = self.first_item == 0 && rows == self.vocab;
        if let Some(fusion) = &self.fusion {
            return self.lookup_in(fusion.table(self.items.weight.val()), items);
        }
        if in_full_range {
            return self.with_genres(items.clone(), self.items.forward(items));
        }
        let local = items.sub_scalar(self.first_item as i64);
        let outside = local
            .clone()
            .lower_elem(0)
            .bool_or(local.clone().greater_equal_elem(rows as i64));
        let safe = local.mask_fill(outside.clone(), 0);
        let emb = self.with_genres(safe.clone(), self.items.forward(safe));
        let [b, s, d] = emb.dims();
        emb.mask_fill(outside.unsqueeze_dim::<3>(2).expand([b, s, d]), 0.0)
    }

    /// Looks up ids in an already computed (fused) table `[vocab, d]`: the step computes
    /// the fusion once for both the input rows and the tied head.
    pub fn lookup_in(&self, table: Tensor<2>, items: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = items.dims();
        let d = table.dims()[1];
        let emb = table
            .select(0, items.clone().reshape([b * s]))
            .reshape([b, s, d]);
        self.with_genres(items, emb)
    }

    fn with_genres(&self, local_ids: Tensor<2, Int>, emb: Tensor<3>) -> Tensor<3> {
        match (&self.genres, &self.genre_mix) {
            (Some(genres), Some(mix)) => {
                let per_item = mix.clone().matmul(genres.weight.val());
                let [b, s] = local_ids.dims();
                let d = per_item.dims()[1];
                let picked = per_item
                    .select(0, local_ids.reshape([b * s]))
                    .reshape([b, s, d]);
                emb + picked
            }
            _ => emb,
        }
    }

    /// The item rows the head is tied to: the ID rows, fused with text and graph when
    /// configured.
    pub fn table(&self) -> Tensor<2> {
        let rows = self.items.weight.val();
        match &self.fusion {
            Some(fusion) => fusion.table(rows),
            None => rows,
        }
    }

    /// Scales the looked-up embedding and adds positions (learned ones; RoPE acts inside
    /// attention): what comes between the (vocab-parallel) lookup and dropout.
    pub fn place(&self, x: Tensor<3>) -> Tensor<3> {
        self.place_at(x, 0)
    }

    /// [`ItemEmbedding::place`] for rows that start at sequence position `offset` (a
    /// sequence-parallel shard).
    pub fn place_at(&self, x: Tensor<3>, offset: usize) -> Tensor<3> {
        let x = if self.input_scale == 1.0 {
            x
        } else {
            x * self.input_scale
        };
        match &self.positions {
            Some(pos) => {
                let [_, s, _] = x.dims();
                let range = offset as i64..(offset + s) as i64;
                let idx = Tensor::<1, Int>::arange(range, &x.device()).unsqueeze::<2>();
                x + pos.forward(idx)
            }
            None => x,
        }
    }

    /// [`ItemEmbedding::place`], then dropout.
    pub fn finish(&self, x: Tensor<3>) -> Tensor<3> {
        dropout::apply(&self.dropout, self.place(x))
    }

    pub fn forward(&self, items: Tensor<2, Int>) -> Tensor<3> {
        self.finish(self.lookup(items))
    }
}

/// The recommender: `embed -> blocks -> final_norm -> head (tied to embed.items)`.
#[derive(Module, Debug)]
pub struct Recommender {
    pub embed: ItemEmbedding,
    pub blocks: Vec<Block>,
    pub final_norm: Norm,
}

/// Builds the genre mixing matrix `[rows, num_genres]` for item ids `first..first+rows`.
pub fn genre_mix(
    item_genres: &[Vec<u32>],
    num_genres: usize,
    first: usize,
    rows: usize,
    device: &Device,
) -> Tensor<2> {
    let mut data = vec![0.0f32; rows * num_genres];
    for r in 0..rows {
        if let Some(genres) = item_genres.get(first + r) {
            let w = 1.0 / genres.len().max(1) as f32;
            for &g in genres {
                if (g as usize) < num_genres {
                    data[r * num_genres + g as usize] += w;
                }
            }
        }
    }
    upload(TensorData::new(data, [rows, num_genres]), device)
}

impl Recommender {
    /// A freshly initialised model (weights from burn's initialisers; call
    /// [`crate::params::init_normal`] for the seeded, layout-independent initialisation).
    pub fn new(config: &ModelConfig, side: &SideInputs, device: &Device) -> Self {
        Self::new_shard(
            config,
            side,
            BlockDims::full(config),
            0,
            config.vocab(),
            config.n_layers,
            device,
        )
    }

    /// One tensor-parallel shard: block sizes `dims`, item rows `first_item .. first_item +
    /// item_rows`, and `n_blocks` blocks (a pipeline stage may hold fewer than all).
    pub fn new_shard(
        config: &ModelConfig,
        side: &SideInputs,
        dims: BlockDims,
        first_item: usize,
        item_rows: usize,
        n_blocks: usize,
        device: &Device,
    ) -> Self {
        let d = config.d_model;
        let (genres, mix) = match (config.num_genres, side.item_genres()) {
            (Some(g), Some(item_genres)) => (
                Some(EmbeddingConfig::new(g, d).init(device)),
                Some(genre_mix(item_genres, g, first_item, item_rows, device)),
            ),
            _ => (None, None),
        };
        let embed = ItemEmbedding {
            items: EmbeddingConfig::new(item_rows, d).init(device),
            positions: (config.positions == Positions::Learned)
                .then(|| EmbeddingConfig::new(config.max_len, d).init(device)),
            genres,
            genre_mix: mix,
            // The propagation mixes every item with every user: only a whole table has it
            // (the mesh refuses tensor parallelism with fusion).
            fusion: (first_item == 0 && item_rows == config.vocab())
                .then(|| Fusion::new(&config.fusion, side, d, device))
                .flatten(),
            dropout: DropoutConfig::new(config.dropout).init(),
            input_scale: if config.scale_embedding {
                (d as f64).sqrt()
            } else {
                1.0
            },
            first_item,
            vocab: config.vocab(),
        };
        Self {
            embed,
            blocks: (0..n_blocks)
                .map(|_| Block::new(config, dims, device))
                .collect(),
            final_norm: Norm::new(config.norm, d, device),
        }
    }

    /// Runs embedding, blocks and final norm: the hidden states `[batch, seq, d]` that the
    /// tied head scores against the item table.
    pub fn hidden(&self, items: Tensor<2, Int>) -> Tensor<3> {
        self.blocks_and_norm(self.embed.forward(items))
    }

    /// [`Recommender::hidden`] with the inputs looked up in `table` (the item table as
    /// [`Recommender::item_table`] gave it), so a fused table is computed once per step.
    pub fn hidden_in(&self, table: Tensor<2>, items: Tensor<2, Int>) -> Tensor<3> {
        let x = self.embed.finish(self.embed.lookup_in(table, items));
        self.blocks_and_norm(x)
    }

    fn blocks_and_norm(&self, mut x: Tensor<3>) -> Tensor<3> {
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.final_norm.forward(x)
    }

    /// The item table `[rows, d]` the head is tied to (fused when configured).
    pub fn item_table(&self) -> Tensor<2> {
        self.embed.table()
    }

    /// Full logits `[batch, seq, vocab]` through burn, padding column included. For tests and
    /// small inputs only: training and evaluation use the fused host kernels instead.
    pub fn logits(&self, items: Tensor<2, Int>) -> Tensor<3> {
        let h = self.hidden(items);
        let table = self.item_table();
        h.matmul(table.transpose().unsqueeze::<3>())
    }
}

/// `Param` re-exported for the param utilities.
pub type FloatParam<const D: usize> = Param<Tensor<D>>;
