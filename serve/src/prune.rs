//! Structured pruning: attention heads and MLP channels ranked by a measured importance and
//! cut out of the weights, giving a smaller model of the same architecture that loads and
//! serves like any other (its block shapes travel in the checkpoint's metadata).
//!
//! Importance is Michel et al.'s (2019) head importance, `I_h = E_x |dL/dxi_h|` for a gate
//! `xi_h` on head `h`'s output, and the same for an MLP channel. No gate is needed to
//! compute it: a head's output enters the block only through its rows of `wo`, so
//! `dL/dxi_h = <wo[h rows], dL/dwo[h rows]>`; a channel's through its row of `w2`, so
//! `dL/dxi_j = <w2[j], dL/dw2[j]>`. The expectation is taken over batches of training data
//! (absolute value per batch). Heads are ranked globally after normalising each layer's
//! scores (as Michel et al.), channels within their layer; every block keeps at least one
//! head and one channel.

use burn::tensor::Device;
use meshrec_model::data::Batch;
use meshrec_model::model::{Block, BlockDims};
use meshrec_model::params::{param_paths, read_values, write_values, ParamInfo};
use meshrec_model::step::forward_backward;
use meshrec_model::{ModelConfig, Recommender, SideInputs};

use crate::error::ServeError;

/// Measured importance of every head and MLP channel, per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Importance {
    pub heads: Vec<Vec<f64>>,
    pub channels: Vec<Vec<f64>>,
}

/// The block index and leaf of a parameter path like `blocks.1.attn.wo.weight`.
fn block_param(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("blocks.")?;
    let (index, leaf) = rest.split_once('.')?;
    Some((index.parse().ok()?, leaf))
}

fn index_of(infos: &[ParamInfo], block: usize, leaf: &str) -> Result<usize, ServeError> {
    infos
        .iter()
        .position(|p| block_param(&p.path) == Some((block, leaf)))
        .ok_or_else(|| ServeError::Prune(format!("the model has no `blocks.{block}.{leaf}`")))
}

/// Heads of block `b` and its head dimension.
fn heads_of(model: &Recommender, b: usize) -> (usize, usize) {
    let attn = &model.blocks[b].attn;
    (attn.heads, attn.head_dim)
}

/// Measures [`Importance`] over `batches` on `device` (an autodiff device).
pub fn importance(
    model: &Recommender,
    batches: impl IntoIterator<Item = Batch>,
    device: &Device,
) -> Result<Importance, ServeError> {
    let infos = param_paths(model);
    let values = read_values(model);
    let n_blocks = model.blocks.len();
    let mut heads: Vec<Vec<f64>> = (0..n_blocks)
        .map(|b| vec![0.0; heads_of(model, b).0])
        .collect();
    let mut channels: Vec<Vec<f64>> = (0..n_blocks)
        .map(|b| vec![0.0; model.blocks[b].mlp.w2.weight.dims()[0]])
        .collect();
    let mut seen = 0;
    for batch in batches {
        let out = forward_backward(
            model,
            &batch,
            1.0 / batch.num_targets().max(1) as f32,
            device,
        );
        for b in 0..n_blocks {
            let (h_count, hd) = heads_of(model, b);
            let wo = index_of(&infos, b, "attn.wo.weight")?;
            let d = infos[wo].shape[1];
            for h in 0..h_count {
                let range = h * hd * d..(h + 1) * hd * d;
                let g: f64 = values[wo][range.clone()]
                    .iter()
                    .zip(&out.grads[wo][range])
                    .map(|(w, g)| f64::from(*w) * f64::from(*g))
                    .sum();
                heads[b][h] += g.abs();
            }
            let w2 = index_of(&infos, b, "mlp.w2.weight")?;
            let d = infos[w2].shape[1];
            for (j, c) in channels[b].iter_mut().enumerate() {
                let range = j * d..(j + 1) * d;
                let g: f64 = values[w2][range.clone()]
                    .iter()
                    .zip(&out.grads[w2][range])
                    .map(|(w, g)| f64::from(*w) * f64::from(*g))
                    .sum();
                *c += g.abs();
            }
        }
        seen += 1;
    }
    if seen == 0 {
        return Err(ServeError::Prune(
            "no batch to measure importance on".into(),
        ));
    }
    Ok(Importance { heads, channels })
}

/// Which heads and channels each block keeps (ascending indices).
#[derive(Debug, Clone, PartialEq)]
pub struct PrunePlan {
    pub keep_heads: Vec<Vec<usize>>,
    pub keep_channels: Vec<Vec<usize>>,
}

impl PrunePlan {
    pub fn heads_removed(&self, importance: &Importance) -> usize {
        importance.heads.iter().map(Vec::len).sum::<usize>()
            - self.keep_heads.iter().map(Vec::len).sum::<usize>()
    }
}

fn top_indices(scores: &[f64], keep: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(keep.max(1));
    idx.sort_unstable();
    idx
}

/// Removes `head_fraction` of all heads (the least important, ranked globally after
/// normalising each layer's scores to unit L2 norm) and `channel_fraction` of each block's
/// MLP channels (the least important in that block).
pub fn plan(importance: &Importance, head_fraction: f64, channel_fraction: f64) -> PrunePlan {
    let total: usize = importance.heads.iter().map(Vec::len).sum();
    let remove = ((total as f64) * head_fraction.clamp(0.0, 1.0)).round() as usize;
    let mut ranked: Vec<(f64, usize, usize)> = Vec::new();
    for (b, scores) in importance.heads.iter().enumerate() {
        let norm = scores.iter().map(|s| s * s).sum::<f64>().sqrt().max(1e-30);
        for (h, s) in scores.iter().enumerate() {
            ranked.push((s / norm, b, h));
        }
    }
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let mut keep_heads: Vec<Vec<usize>> = importance
        .heads
        .iter()
        .map(|s| (0..s.len()).collect())
        .collect();
    let mut removed = 0;
    for &(_, b, h) in &ranked {
        if removed == remove {
            break;
        }
        if keep_heads[b].len() > 1 {
            keep_heads[b].retain(|&x| x != h);
            removed += 1;
        }
    }
    let keep_channels = importance
        .channels
        .iter()
        .map(|scores| {
            let keep =
                ((scores.len() as f64) * (1.0 - channel_fraction.clamp(0.0, 1.0))).round() as usize;
            top_indices(scores, keep)
        })
        .collect();
    PrunePlan {
        keep_heads,
        keep_channels,
    }
}

/// Selects columns `cols` of a row-major `[rows, n]` matrix.
fn columns(values: &[f32], n: usize, cols: &[usize]) -> Vec<f32> {
    let rows = values.len() / n;
    let mut out = Vec::with_capacity(rows * cols.len());
    for r in 0..rows {
        out.extend(cols.iter().map(|&c| values[r * n + c]));
    }
    out
}

/// Selects rows `keep` (each `width` wide).
fn rows(values: &[f32], width: usize, keep: &[usize]) -> Vec<f32> {
    keep.iter()
        .flat_map(|&r| values[r * width..(r + 1) * width].iter().copied())
        .collect()
}

/// The pruned model: the same embedding, norms and positions, each block with the heads and
/// channels `plan` keeps (their weights copied), on `device`.
pub fn apply(
    model: &Recommender,
    config: &ModelConfig,
    side: &SideInputs,
    plan: &PrunePlan,
    device: &Device,
) -> Result<Recommender, ServeError> {
    let n_blocks = model.blocks.len();
    if plan.keep_heads.len() != n_blocks || plan.keep_channels.len() != n_blocks {
        return Err(ServeError::Prune(format!(
            "the plan covers {} blocks, the model has {n_blocks}",
            plan.keep_heads.len()
        )));
    }
    let mut pruned = Recommender::new_shard(
        config,
        side,
        BlockDims::full(config),
        0,
        config.vocab(),
        0,
        device,
    );
    pruned.blocks = (0..n_blocks)
        .map(|b| {
            let dims = BlockDims {
                d_model: config.d_model,
                heads: plan.keep_heads[b].len(),
                head_dim: config.head_dim(),
                d_ff: plan.keep_channels[b].len(),
            };
            Block::new(config, dims, device)
        })
        .collect();
    let old_infos = param_paths(model);
    let old_values = read_values(model);
    let new_infos = param_paths(&pruned);
    let mut new_values = Vec::with_capacity(new_infos.len());
    for info in &new_infos {
        let i = old_infos
            .iter()
            .position(|p| p.path == info.path)
            .ok_or_else(|| ServeError::Prune(format!("`{}` has no counterpart", info.path)))?;
        let old = &old_values[i];
        let value = match block_param(&info.path) {
            Some((b, leaf)) => {
                let (_, hd) = heads_of(model, b);
                let head_cols: Vec<usize> = plan.keep_heads[b]
                    .iter()
                    .flat_map(|&h| h * hd..(h + 1) * hd)
                    .collect();
                let ch = &plan.keep_channels[b];
                let old_shape = &old_infos[i].shape;
                match leaf {
                    "attn.wq.weight" | "attn.wk.weight" | "attn.wv.weight" => {
                        columns(old, old_shape[1], &head_cols)
                    }
                    "attn.wo.weight" => rows(old, old_shape[1], &head_cols),
                    "mlp.w1.weight" | "mlp.w3.weight" => columns(old, old_shape[1], ch),
                    "mlp.w2.weight" => rows(old, old_shape[1], ch),
                    _ => old.clone(),
                }
            }
            None => old.clone(),
        };
        if value.len() != info.numel() {
            return Err(ServeError::Prune(format!(
                "`{}`: {} values for shape {:?}",
                info.path,
                value.len(),
                info.shape
            )));
        }
        new_values.push(value);
    }
    Ok(write_values(pruned, &new_values, device))
}
