//! The catalogue-wide softmax cross-entropy as tensor ops on the device (wgpu, cuda): the
//! same row-chunked, never-materialised computation as the host kernel in [`crate::loss`],
//! also in its vocab-parallel form, so that a GPU step does not copy the item table and the
//! hidden rows to the host.
//!
//! Per chunk of rows: the logits against the table, the row max, `exp(l - max)`, its row sum
//! and the target's logit, then the gradient `softmax - one_hot` folded into `dh` and
//! `d_table` by two matrix products. The gradient is formed explicitly (no autodiff through
//! the logits), as the host kernel does, so nothing of a chunk outlives it. With a reducer that
//! spans shards the per-row statistics (a few floats per row) cross to the host for the
//! collective, as Megatron's vocab-parallel loss all-reduces them.

use burn::tensor::IndexingUpdateOp;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::loss::VocabReducer;
use crate::transfer::{download, upload};

/// Rows per chunk on a device: large enough to keep the device busy, small enough that a
/// chunk's logits (`rows × items` floats) stay a few tens of MB for catalogues of ~10k items.
pub const DEVICE_CHUNK_ROWS: usize = 4096;

/// What [`device_cross_entropy`] returns, all on the device: the summed loss (`[1]`), this
/// shard's partial `dh` (`[n, dim]`; sum over shards for the full one) and the gradient of the
/// shard's table rows (`[rows, dim]`), both multiplied by `grad_scale`.
#[derive(Debug, Clone)]
pub struct DeviceCrossEntropy {
    pub loss_sum: Tensor<1>,
    pub dh: Tensor<2>,
    pub d_table: Tensor<2>,
}

/// The targets as the device loss reads them: each row's column in the shard (`[n, 1]`, 0
/// where the target lives on another shard) and whether it is on this shard (`[n, 1]`, 1 or
/// 0). Built on the host from the batch and uploaded once: part of the batch's bytes.
struct ShardTargets {
    column: Tensor<2, Int>,
    on_shard: Tensor<2>,
}

impl ShardTargets {
    fn new(targets: &[u32], first_item: u32, rows: usize, device: &Device) -> Self {
        let n = targets.len();
        let local = |t: u32| {
            t.checked_sub(first_item)
                .map(|r| r as usize)
                .filter(|&r| r < rows)
        };
        let column: Vec<i64> = targets
            .iter()
            .map(|&t| local(t).map_or(0, |r| r as i64))
            .collect();
        let on_shard: Vec<f32> = targets
            .iter()
            .map(|&t| if local(t).is_some() { 1.0 } else { 0.0 })
            .collect();
        Self {
            column: upload(TensorData::new(column, [n, 1]), device),
            on_shard: upload(TensorData::new(on_shard, [n, 1]), device),
        }
    }
}

/// Cross-entropy of `h` (`[n, dim]`) against `table` (`[rows, dim]`, row `r` the item
/// `first_item + r`), `targets[i]` the global item id of row `i`. Both tensors should be
/// outside autodiff (the gradient is formed here). `reducer` combines the shards' row
/// statistics; on one shard nothing leaves the device.
pub fn device_cross_entropy<R: VocabReducer>(
    h: Tensor<2>,
    targets: &[u32],
    table: Tensor<2>,
    first_item: u32,
    grad_scale: f32,
    chunk_rows: usize,
    reducer: &mut R,
) -> Result<DeviceCrossEntropy, R::Error> {
    let device = h.device();
    let [n, dim] = h.dims();
    assert_eq!(n, targets.len(), "hidden rows and targets disagree");
    let [rows, _] = table.dims();
    let targets_on = ShardTargets::new(targets, first_item, rows, &device);
    let table_t = table.clone().transpose();
    let chunk_rows = chunk_rows.max(1);
    let mut loss_sum = Tensor::<1>::zeros([1], &device);
    let mut d_table = Tensor::<2>::zeros([rows, dim], &device);
    let mut dh_parts = Vec::with_capacity(n.div_ceil(chunk_rows));
    for start in (0..n).step_by(chunk_rows) {
        let c = chunk_rows.min(n - start);
        let h_c = h.clone().narrow(0, start, c);
        let column = targets_on.column.clone().narrow(0, start, c);
        let on_shard = targets_on.on_shard.clone().narrow(0, start, c);
        let logits = h_c.clone().matmul(table_t.clone());

        let row_max = agree(logits.clone().max_dim(1), reducer, R::all_max)?;
        let target_logit =
            (logits.clone().gather(1, column.clone()) - row_max.clone()) * on_shard.clone();
        let exp = (logits - row_max).exp();
        let sum_exp = exp.clone().sum_dim(1);
        // One collective for both statistics, as the host kernel does.
        let (sum_exp, target_logit) = if reducer.spans_shards() {
            let both = agree(
                Tensor::cat(vec![sum_exp, target_logit], 0),
                reducer,
                R::all_sum,
            )?;
            (both.clone().narrow(0, 0, c), both.narrow(0, c, c))
        } else {
            (sum_exp, target_logit)
        };

        loss_sum = loss_sum + (sum_exp.clone().log() - target_logit).sum();
        let grad = (exp / sum_exp) * grad_scale;
        let grad = grad.scatter(1, column, on_shard * (-grad_scale), IndexingUpdateOp::Add);
        dh_parts.push(grad.clone().matmul(table.clone()));
        d_table = d_table + grad.transpose().matmul(h_c);
    }
    let dh = if dh_parts.is_empty() {
        Tensor::zeros([0, dim], &device)
    } else {
        Tensor::cat(dh_parts, 0)
    };
    Ok(DeviceCrossEntropy {
        loss_sum,
        dh,
        d_table,
    })
}

/// `values` (`[c, 1]`) combined across shards by `op` through the host, or unchanged on one
/// shard (no copy).
fn agree<R: VocabReducer>(
    values: Tensor<2>,
    reducer: &mut R,
    op: fn(&mut R, &mut [f32]) -> Result<(), R::Error>,
) -> Result<Tensor<2>, R::Error> {
    if !reducer.spans_shards() {
        return Ok(values);
    }
    let device = values.device();
    let dims = values.dims();
    let mut host = download(values);
    op(reducer, &mut host)?;
    Ok(upload(TensorData::new(host, dims), &device))
}
