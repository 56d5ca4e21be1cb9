//! One training forward/backward on a device, and full-ranking evaluation: the model in burn,
//! the catalogue-wide softmax in the fused host kernel, joined by a graph cut.

use burn::module::Module;
use burn::tensor::{Device, Float, Int, Tensor, TensorData};

use crate::data::{Batch, EvalBatch, PAD};
use crate::device::Residency;
use crate::device_loss::{device_cross_entropy, DEVICE_CHUNK_ROWS};
use crate::device_optim::device_grads;
use crate::loss::{
    fused_cross_entropy, score_into, SingleShard, TableShard, VocabReducer, DEFAULT_CHUNK_ROWS,
};
use crate::metrics::{rank_of_target, RankingMetrics};
use crate::model::Recommender;
use crate::params::to_host as host;
use crate::transfer::{download_scalar, upload};

/// `[batch, seq]` item ids as a burn tensor.
pub fn id_tensor(ids: &[u32], batch: usize, seq: usize, device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&x| i64::from(x)).collect();
    upload(TensorData::new(data, [batch, seq]), device)
}

/// Flat indices of the positions that carry a loss, and their targets.
pub fn loss_positions(targets: &[u32]) -> (Vec<i64>, Vec<u32>) {
    targets
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != PAD)
        .map(|(i, &t)| (i as i64, t))
        .unzip()
}

/// The result of one forward/backward: the summed loss over `targets` positions, and the
/// parameter gradients in [`crate::params::param_paths`] order (already multiplied by the
/// `grad_scale` that was passed in).
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub loss_sum: f64,
    pub targets: usize,
    pub grads: Vec<Vec<f32>>,
}

/// The head of the graph cut, shared by every place that runs the tied softmax: given the
/// final hidden states `h` (`[batch, seq, d]`, tracked), the targets and the item table
/// tensor (tracked), computes the loss in the fused kernel and returns the surrogate whose
/// backward gives exactly the cross-entropy's gradients: `sum(h_rows * dh) + sum(E * dE)`.
///
/// `table` holds the item rows `first_row ..` of the full table (a vocab-parallel shard, or
/// all of it with `first_row == 0`); the padding row 0 is never a candidate. `reducer`
/// combines the shards' statistics and also sums the shards' partial `dh`, so the surrogate's
/// `h` gradient is the full one on every shard. Returns `(loss_sum, targets, surrogate)`,
/// the surrogate absent when the batch has no targets. The loss runs where
/// [`Residency::for_device`] says: the host kernel on Flex, tensor ops on a GPU backend.
pub fn tied_softmax_surrogate<R: VocabReducer>(
    h: Tensor<3>,
    targets: &[u32],
    table: Tensor<2>,
    first_row: usize,
    grad_scale: f32,
    reducer: &mut R,
) -> Result<(f64, usize, Option<Tensor<1>>), R::Error> {
    let residency = Residency::for_device(&h.device());
    tied_softmax_surrogate_on(residency, h, targets, table, first_row, grad_scale, reducer)
}

/// [`tied_softmax_surrogate`] with the loss placed explicitly (the tests compare the two).
pub fn tied_softmax_surrogate_on<R: VocabReducer>(
    residency: Residency,
    h: Tensor<3>,
    targets: &[u32],
    table: Tensor<2>,
    first_row: usize,
    grad_scale: f32,
    reducer: &mut R,
) -> Result<(f64, usize, Option<Tensor<1>>), R::Error> {
    let [b, s, d] = h.dims();
    let device = h.device();
    let (positions, target_ids) = loss_positions(targets);
    if positions.is_empty() {
        return Ok((0.0, 0, None));
    }
    let n = positions.len();
    let index = upload::<1, Int>(TensorData::new(positions, [n]), &device);
    let h_rows = h.reshape([b * s, d]).select(0, index);
    let [rows, _] = table.dims();
    let skip = usize::from(first_row == 0);
    // A shard holding only the padding row has no candidates: the host kernel handles the
    // empty shard (and still takes part in the reducer's collectives).
    if residency == Residency::Device && rows > skip {
        let candidates = table.clone().narrow(0, skip, rows - skip);
        let out = device_cross_entropy(
            h_rows.clone().without_autodiff(),
            &target_ids,
            candidates.clone().without_autodiff(),
            (first_row + skip) as u32,
            grad_scale,
            DEVICE_CHUNK_ROWS,
            reducer,
        )?;
        let dh = if reducer.spans_shards() {
            let mut dh = host(out.dh);
            reducer.all_sum(&mut dh)?;
            upload::<2, Float>(TensorData::new(dh, [n, d]), &device)
        } else {
            out.dh
        };
        let surrogate = (h_rows * dh).sum() + (candidates * out.d_table).sum();
        let loss_sum = f64::from(download_scalar(out.loss_sum));
        return Ok((loss_sum, n, Some(surrogate)));
    }
    let h_host = host(h_rows.clone().detach());
    let table_host = host(table.clone().detach());
    let shard = TableShard::new(&table_host[skip * d..], d, (first_row + skip) as u32);
    let mut out = fused_cross_entropy(
        &h_host,
        &target_ids,
        shard,
        grad_scale,
        DEFAULT_CHUNK_ROWS,
        reducer,
    )?;
    reducer.all_sum(&mut out.dh)?;
    let dh = upload::<2, Float>(TensorData::new(out.dh, [n, d]), &device);
    let mut surrogate = (h_rows * dh).sum();
    if rows > skip {
        let de = upload::<2, Float>(TensorData::new(out.d_table, [rows - skip, d]), &device);
        surrogate = surrogate + (table.narrow(0, skip, rows - skip) * de).sum();
    }
    Ok((out.loss_sum, n, Some(surrogate)))
}

/// The loss of one (micro-)batch on one device and the surrogate whose backward gives its
/// gradients, the loss placed by `residency`.
fn loss_graph(
    model: &Recommender,
    batch: &Batch,
    grad_scale: f32,
    residency: Residency,
    device: &Device,
) -> (f64, usize, Option<Tensor<1>>) {
    let inputs = id_tensor(&batch.inputs, batch.batch_size, batch.seq_len, device);
    let table = model.item_table();
    let h = match &model.embed.fusion {
        Some(_) => model.hidden_in(table.clone(), inputs),
        None => model.hidden(inputs),
    };
    let single = &mut SingleShard;
    match tied_softmax_surrogate_on(residency, h, &batch.targets, table, 0, grad_scale, single) {
        Ok(out) => out,
        Err(never) => match never {},
    }
}

/// Forward and backward of one (micro-)batch on one device, the gradients on the host, the
/// loss where [`Residency::for_device`] puts it.
pub fn forward_backward(
    model: &Recommender,
    batch: &Batch,
    grad_scale: f32,
    device: &Device,
) -> StepOutput {
    let residency = Residency::for_device(device);
    forward_backward_placed(model, batch, grad_scale, residency, device)
}

/// [`forward_backward`] with the loss placed by `residency`.
pub fn forward_backward_placed(
    model: &Recommender,
    batch: &Batch,
    grad_scale: f32,
    residency: Residency,
    device: &Device,
) -> StepOutput {
    let out = forward_backward_on_device(model, batch, grad_scale, residency, device);
    StepOutput {
        loss_sum: out.loss_sum,
        targets: out.targets,
        grads: out.grads.into_iter().map(host).collect(),
    }
}

/// A forward/backward whose gradients stay on the device: each parameter's, flattened, in
/// [`crate::params::param_paths`] order (zeros when the batch has no targets).
#[derive(Debug, Clone)]
pub struct DeviceStepOutput {
    pub loss_sum: f64,
    pub targets: usize,
    pub grads: Vec<Tensor<1>>,
}

/// Forward and backward of one batch with the loss on `residency` and the gradients left
/// on the device (for [`crate::device_optim::DeviceAdamW`]).
pub fn forward_backward_on_device(
    model: &Recommender,
    batch: &Batch,
    grad_scale: f32,
    residency: Residency,
    device: &Device,
) -> DeviceStepOutput {
    let (loss_sum, targets, surrogate) = loss_graph(model, batch, grad_scale, residency, device);
    let grads = match surrogate {
        Some(surrogate) => device_grads(model, &surrogate.backward()),
        None => crate::params::param_paths(model)
            .iter()
            .map(|p| Tensor::zeros([p.numel()], &device.clone().inner()))
            .collect(),
    };
    DeviceStepOutput {
        loss_sum,
        targets,
        grads,
    }
}

/// Hidden state at the last real position of each evaluation context: `[n, d]` on the host.
pub fn last_hidden(model: &Recommender, batch: &EvalBatch<'_>, device: &Device) -> Vec<f32> {
    let n = batch.len();
    let s = batch.seq_len;
    let inputs = id_tensor(batch.contexts, n, s, device);
    let h = model.hidden(inputs);
    let d = h.dims()[2];
    let last: Vec<i64> = batch
        .lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| (i * s + len.max(1) - 1) as i64)
        .collect();
    let index = upload::<1, Int>(TensorData::new(last, [n]), device);
    host(h.reshape([n * s, d]).select(0, index))
}

/// Full-ranking evaluation over all items of a batch, history excluded, into `metrics`.
/// Runs without autodiff and with dropout off. Holds one batch of scores at a time.
pub fn evaluate_batch(
    model: &Recommender,
    batch: &EvalBatch<'_>,
    device: &Device,
    metrics: &mut RankingMetrics,
) {
    let model = model.clone().valid();
    let inner = device.clone().inner();
    let h = last_hidden(&model, batch, &inner);
    let table = host(model.item_table());
    let d = model.embed.items.weight.dims()[1];
    let v = table.len() / d;
    let mut scores = vec![0.0f32; batch.len() * v];
    score_into(&mut scores, &h, TableShard::new(&table, d, 0));
    for (i, (&target, history)) in batch.targets.iter().zip(batch.histories).enumerate() {
        metrics.add_rank(rank_of_target(&scores[i * v..(i + 1) * v], target, history));
    }
}
