//! The model's inference forward on host slices: the same computation as
//! `Recommender::hidden` (embedding, pre-norm blocks, final norm; dropout off), written for
//! serving. Sequences are packed without padding, every block but the last runs all
//! positions, and the last block runs its queries, attention and MLP for the last position
//! alone, the only one a recommendation reads. The projections are f32 (`gemm`) or int8
//! per output channel ([`crate::quant::Int8Linear`]).

use meshrec_model::kernels::{matmul_into, MatRef};
use meshrec_model::model::{Block, Norm};
use meshrec_model::params::to_host as host;
use meshrec_model::Recommender;

use crate::quant::{Int8Linear, Int8Rows};

/// A projection with burn's `[d_in, d_out]` weight, in f32 or int8.
#[derive(Debug, Clone)]
pub enum HostLinear {
    F32 {
        w: Vec<f32>,
        d_in: usize,
        d_out: usize,
    },
    Int8(Int8Linear),
}

impl HostLinear {
    fn new(linear: &burn::nn::Linear, int8: bool) -> Self {
        let [d_in, d_out] = linear.weight.dims();
        let w = host(linear.weight.val());
        if int8 {
            HostLinear::Int8(Int8Linear::from_weight(&w, d_in, d_out))
        } else {
            HostLinear::F32 { w, d_in, d_out }
        }
    }

    /// `x` `[n, d_in]` -> `[n, d_out]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        match self {
            HostLinear::F32 { w, d_in, d_out } => {
                let n = x.len() / d_in;
                let mut out = vec![0f32; n * d_out];
                matmul_into(
                    &mut out,
                    MatRef::row_major(x, n, *d_in),
                    MatRef::row_major(w, *d_in, *d_out),
                    false,
                );
                out
            }
            HostLinear::Int8(l) => l.forward(x),
        }
    }
}

/// RMSNorm or LayerNorm with its parameters.
#[derive(Debug, Clone)]
pub struct HostNorm {
    rms: bool,
    gamma: Vec<f32>,
    beta: Option<Vec<f32>>,
    eps: f32,
}

impl HostNorm {
    fn new(norm: &Norm) -> Self {
        match norm {
            Norm::Rms(n) => Self {
                rms: true,
                gamma: host(n.gamma.val()),
                beta: None,
                eps: n.epsilon as f32,
            },
            Norm::Layer(n) => Self {
                rms: false,
                gamma: host(n.gamma.val()),
                beta: n.beta.as_ref().map(|b| host(b.val())),
                // burn keeps LayerNorm's epsilon private; the model builds it with the
                // config's default.
                eps: 1e-5,
            },
        }
    }

    /// Normalises each row of `x` (`[n, d]`) into a new buffer.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.gamma.len();
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            if self.rms {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let inv = 1.0 / (ms + self.eps).sqrt();
                for ((o, v), g) in o.iter_mut().zip(row).zip(&self.gamma) {
                    *o = v * inv * g;
                }
            } else {
                let mean = row.iter().sum::<f32>() / d as f32;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                let inv = 1.0 / (var + self.eps).sqrt();
                for (j, (o, v)) in o.iter_mut().zip(row).enumerate() {
                    *o =
                        (v - mean) * inv * self.gamma[j] + self.beta.as_ref().map_or(0.0, |b| b[j]);
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
struct HostBlock {
    attn_norm: HostNorm,
    wq: HostLinear,
    wk: HostLinear,
    wv: HostLinear,
    wo: HostLinear,
    heads: usize,
    head_dim: usize,
    mlp_norm: HostNorm,
    w1: HostLinear,
    w2: HostLinear,
    w3: Option<HostLinear>,
}

impl HostBlock {
    fn new(block: &Block, int8: bool) -> Self {
        Self {
            attn_norm: HostNorm::new(&block.attn_norm),
            wq: HostLinear::new(&block.attn.wq, int8),
            wk: HostLinear::new(&block.attn.wk, int8),
            wv: HostLinear::new(&block.attn.wv, int8),
            wo: HostLinear::new(&block.attn.wo, int8),
            heads: block.attn.heads,
            head_dim: block.attn.head_dim,
            mlp_norm: HostNorm::new(&block.mlp_norm),
            w1: HostLinear::new(&block.mlp.w1, int8),
            w2: HostLinear::new(&block.mlp.w2, int8),
            w3: block.mlp.w3.as_ref().map(|w| HostLinear::new(w, int8)),
        }
    }

    fn mlp(&self, x: &[f32]) -> Vec<f32> {
        let h = self.mlp_norm.forward(x);
        let mut a = self.w1.forward(&h);
        match &self.w3 {
            Some(w3) => {
                let up = w3.forward(&h);
                for (g, u) in a.iter_mut().zip(&up) {
                    *g = *g / (1.0 + (-*g).exp()) * u;
                }
            }
            None => {
                for v in a.iter_mut() {
                    *v = 0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2));
                }
            }
        }
        self.w2.forward(&a)
    }
}

/// The whole model on the host.
#[derive(Debug, Clone)]
pub struct HostModel {
    /// Input rows `[vocab, d]`: item embedding plus genres, times the input scale.
    input: Vec<f32>,
    positions: Option<Vec<f32>>,
    rope: bool,
    blocks: Vec<HostBlock>,
    final_norm: HostNorm,
    d: usize,
    pub max_len: usize,
}

impl HostModel {
    /// Copies `model`'s weights; `int8` quantizes every block projection per output
    /// channel, and `input_table`, when given, replaces the f32 item rows of the input (the
    /// dequantized int8 table, so that one table serves lookup and scoring).
    pub fn new(model: &Recommender, int8: bool, input_table: Option<&Int8Rows>) -> Self {
        let [rows, d] = model.embed.items.weight.dims();
        let mut input = match input_table {
            Some(q) => {
                let mut out = vec![0f32; rows * d];
                for r in 0..rows {
                    q.dequantize_row(r, &mut out[r * d..(r + 1) * d]);
                }
                out
            }
            None => host(model.embed.items.weight.val()),
        };
        if let (Some(genres), Some(mix)) = (&model.embed.genres, &model.embed.genre_mix) {
            let per_item = host(mix.clone().matmul(genres.weight.val()));
            for (x, g) in input.iter_mut().zip(&per_item) {
                *x += g;
            }
        }
        let scale = model.embed.input_scale as f32;
        if scale != 1.0 {
            for x in input.iter_mut() {
                *x *= scale;
            }
        }
        let max_len = model
            .embed
            .positions
            .as_ref()
            .map_or(usize::MAX, |p| p.weight.dims()[0]);
        Self {
            input,
            positions: model.embed.positions.as_ref().map(|p| host(p.weight.val())),
            rope: model.blocks.first().is_some_and(|b| b.attn.rope),
            blocks: model
                .blocks
                .iter()
                .map(|b| HostBlock::new(b, int8))
                .collect(),
            final_norm: HostNorm::new(&model.final_norm),
            d,
            max_len,
        }
    }

    /// The final hidden state at the last position of each context (`[n, d]`). Contexts
    /// are item ids, at most `max_len` of them, none empty.
    pub fn last_hidden(&self, contexts: &[&[u32]]) -> Vec<f32> {
        let d = self.d;
        let lens: Vec<usize> = contexts.iter().map(|c| c.len().max(1)).collect();
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |acc, &l| {
                let s = *acc;
                *acc += l;
                Some(s)
            })
            .collect();
        let total: usize = lens.iter().sum();
        let mut x = vec![0f32; total * d];
        for (c, ctx) in contexts.iter().enumerate() {
            for p in 0..lens[c] {
                let id = ctx.get(p).copied().unwrap_or(0) as usize;
                let row = &mut x[(starts[c] + p) * d..(starts[c] + p + 1) * d];
                row.copy_from_slice(&self.input[id * d..(id + 1) * d]);
                if let Some(pos) = &self.positions {
                    for (v, q) in row.iter_mut().zip(&pos[p * d..(p + 1) * d]) {
                        *v += q;
                    }
                }
            }
        }
        let last_rows: Vec<usize> = starts.iter().zip(&lens).map(|(s, l)| s + l - 1).collect();
        let n_blocks = self.blocks.len();
        let mut last: Option<Vec<f32>> = None;
        for (b, block) in self.blocks.iter().enumerate() {
            let h = block.attn_norm.forward(&x);
            let k = block.wk.forward(&h);
            let v = block.wv.forward(&h);
            if b + 1 < n_blocks {
                let q = block.wq.forward(&h);
                let ctx = self.attend(block, &q, &k, &v, &starts, &lens, None);
                let out = block.wo.forward(&ctx);
                add(&mut x, &out);
                let m = block.mlp(&x);
                add(&mut x, &m);
            } else {
                // Last block: queries, attention and MLP of the last positions only.
                let h_last = gather_rows(&h, &last_rows, d);
                let q = block.wq.forward(&h_last);
                let ctx = self.attend(block, &q, &k, &v, &starts, &lens, Some(&lens));
                let out = block.wo.forward(&ctx);
                let mut xl = gather_rows(&x, &last_rows, d);
                add(&mut xl, &out);
                let m = block.mlp(&xl);
                add(&mut xl, &m);
                last = Some(xl);
            }
        }
        let last = last.unwrap_or_else(|| gather_rows(&x, &last_rows, d));
        self.final_norm.forward(&last)
    }

    /// Causal attention per sequence and head. `q` holds every position's query, or with
    /// `last_only` one query per sequence (its last position).
    fn attend(
        &self,
        block: &HostBlock,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        starts: &[usize],
        lens: &[usize],
        last_only: Option<&[usize]>,
    ) -> Vec<f32> {
        let (heads, hd) = (block.heads, block.head_dim);
        let inner = heads * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let q_rows = q.len() / inner;
        let mut ctx = vec![0f32; q_rows * inner];
        let mut k_rot;
        let k = if self.rope {
            k_rot = k.to_vec();
            for (s, &l) in starts.iter().zip(lens) {
                for p in 0..l {
                    rope_row(
                        &mut k_rot[(s + p) * inner..(s + p + 1) * inner],
                        p,
                        heads,
                        hd,
                    );
                }
            }
            &k_rot[..]
        } else {
            k
        };
        let mut scores = Vec::new();
        let mut qrow = vec![0f32; inner];
        for (c, (&s, &l)) in starts.iter().zip(lens).enumerate() {
            let positions: Vec<(usize, usize)> = match last_only {
                Some(_) => vec![(c, l - 1)],
                None => (0..l).map(|p| (s + p, p)).collect(),
            };
            for (qi, p) in positions {
                qrow.copy_from_slice(&q[qi * inner..(qi + 1) * inner]);
                if self.rope {
                    rope_row(&mut qrow, p, heads, hd);
                }
                for h in 0..heads {
                    let qh = &qrow[h * hd..(h + 1) * hd];
                    scores.clear();
                    let mut max = f32::NEG_INFINITY;
                    for j in 0..=p {
                        let kj = &k[(s + j) * inner + h * hd..(s + j) * inner + (h + 1) * hd];
                        let sc = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                        max = max.max(sc);
                        scores.push(sc);
                    }
                    let mut sum = 0.0;
                    for sc in scores.iter_mut() {
                        *sc = (*sc - max).exp();
                        sum += *sc;
                    }
                    let out = &mut ctx[qi * inner + h * hd..qi * inner + (h + 1) * hd];
                    for (j, w) in scores.iter().enumerate() {
                        let vj = &v[(s + j) * inner + h * hd..(s + j) * inner + (h + 1) * hd];
                        let w = w / sum;
                        for (o, x) in out.iter_mut().zip(vj) {
                            *o += w * x;
                        }
                    }
                }
            }
        }
        ctx
    }
}

/// Rotary positions on one row of `heads` heads (GPT-NeoX "rotate half", as the model).
fn rope_row(row: &mut [f32], pos: usize, heads: usize, hd: usize) {
    let half = hd / 2;
    for h in 0..heads {
        let x = &mut row[h * hd..(h + 1) * hd];
        let orig: Vec<f32> = x.to_vec();
        for i in 0..hd {
            let freq = 10_000f64.powf(-((i % half) as f64) * 2.0 / hd as f64);
            let angle = pos as f64 * freq;
            let (cos, sin) = (angle.cos() as f32, angle.sin() as f32);
            let rotated = if i < half {
                -orig[i + half]
            } else {
                orig[i - half]
            };
            x[i] = orig[i] * cos + rotated * sin;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn gather_rows(x: &[f32], rows: &[usize], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;
    use meshrec_model::config::{MlpKind, NormKind, Positions};
    use meshrec_model::params::{init_normal, to_host};
    use meshrec_model::step::id_tensor;
    use meshrec_model::{ModelConfig, Preset, Recommender, SideInputs};

    use super::*;

    /// The host forward equals burn's `Recommender::hidden` at each context's last
    /// position for every architecture option the model has (norm, MLP, positions, input
    /// scaling, genre side-features) and for contexts of every length up to `max_len`.
    #[test]
    fn host_forward_matches_burn_for_every_architecture_option() {
        let device = Device::flex();
        let num_items = 30;
        let num_genres = 5;
        let item_genres: Vec<Vec<u32>> = (0..=num_items as u32)
            .map(|i| vec![i % 5, (i / 5) % 5])
            .collect();
        let variants = [
            (
                NormKind::Rms,
                MlpKind::Gelu,
                Positions::Learned,
                false,
                false,
            ),
            (
                NormKind::Layer,
                MlpKind::Gelu,
                Positions::Learned,
                false,
                false,
            ),
            (
                NormKind::Rms,
                MlpKind::SwiGlu,
                Positions::Learned,
                false,
                false,
            ),
            (NormKind::Rms, MlpKind::Gelu, Positions::Rope, false, false),
            (
                NormKind::Layer,
                MlpKind::SwiGlu,
                Positions::Rope,
                true,
                true,
            ),
        ];
        for (v, &(norm, mlp, positions, scale_embedding, genres)) in variants.iter().enumerate() {
            let mut config = ModelConfig::preset(Preset::Tiny, num_items);
            config.norm = norm;
            config.mlp = mlp;
            config.positions = positions;
            config.scale_embedding = scale_embedding;
            config.num_genres = genres.then_some(num_genres);
            let model = Recommender::new(
                &config,
                &SideInputs::genres(genres.then(|| item_genres.clone())),
                &device,
            );
            let model = init_normal(model, 11 + v as u64, 0.3, config.n_layers, &device);
            let host_model = HostModel::new(&model, false, None);
            let d = config.d_model;
            let contexts: Vec<Vec<u32>> = (1..=config.max_len)
                .map(|len| {
                    (0..len)
                        .map(|p| 1 + ((p * 7 + len) % num_items) as u32)
                        .collect()
                })
                .collect();
            let refs: Vec<&[u32]> = contexts.iter().map(|c| c.as_slice()).collect();
            let host_h = host_model.last_hidden(&refs);
            for (i, c) in contexts.iter().enumerate() {
                let burn_h = to_host(model.hidden(id_tensor(c, 1, c.len(), &device)));
                let expected = &burn_h[(c.len() - 1) * d..c.len() * d];
                for (a, b) in host_h[i * d..(i + 1) * d].iter().zip(expected) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "variant {v}, length {}: host {a} vs burn {b}",
                        c.len()
                    );
                }
            }
        }
    }
}
