//! The model-level reductions serving uses, trained here because they train: structured
//! pruning (heads and MLP channels cut by measured importance, then a brief fine-tune) and
//! distillation of a smaller student from a trained teacher's catalogue-wide softmax
//! (soft targets through the fused loss kernel). Both write serving checkpoints that load
//! like any other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Float, Int, TensorData};
use meshrec_model::checkpoint::{self, CheckpointMeta, UserHistories};
use meshrec_model::data::{Batch, Dataset, EvalSet, EvalSplit, TrainSet};
use meshrec_model::loss::{
    fused_distill_cross_entropy, DistillWeights, TableShard, DEFAULT_CHUNK_ROWS,
};
use meshrec_model::optim::LrSchedule;
use meshrec_model::params::{param_paths, read_grads, to_host as host};
use meshrec_model::step::{forward_backward, id_tensor, loss_positions, StepOutput};
use meshrec_model::transfer::upload;
use meshrec_model::Recommender;
use meshrec_serve::prune;
use serde::Serialize;

use crate::checkpoint::Progress;
use crate::config::RunConfig;
use crate::early_stop::{EarlyStopping, Verdict, METRIC};
use crate::error::RunError;
use crate::model_io::{evaluate, save_checkpoint};
use crate::setup::{build_model, load_dataset};
use crate::single::SingleDevice;

/// What a reduction produced.
#[derive(Debug, Clone, Serialize)]
pub struct Reduced {
    pub checkpoint: PathBuf,
    pub name: String,
    pub params_before: usize,
    pub params_after: usize,
    /// Heads and MLP channels per block after the reduction.
    pub heads: Vec<usize>,
    pub channels: Vec<usize>,
    pub epochs: u64,
    pub valid: BTreeMap<String, f64>,
    pub test: BTreeMap<String, f64>,
    /// The source model's (the unpruned model's, or the teacher's) test metrics.
    pub test_before: BTreeMap<String, f64>,
}

/// Pruning settings.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Fraction of all attention heads removed.
    pub heads: f64,
    /// Fraction of each block's MLP channels removed.
    pub channels: f64,
    /// Training batches the importance is measured on.
    pub importance_batches: usize,
    pub finetune_epochs: u64,
    pub lr: f64,
}

/// Distillation settings.
#[derive(Debug, Clone)]
pub struct DistillOptions {
    pub temperature: f32,
    /// Weight of the true next item's cross-entropy; the rest goes to the teacher's soft
    /// targets.
    pub hard: f32,
    pub epochs: u64,
    pub lr: f64,
    /// Evaluations without a better valid NDCG@10 before stopping (0: never).
    pub patience: u64,
}

fn checkpoint_error(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Checkpoint {
        path: path.into(),
        message: e.to_string(),
    }
}

fn check_catalogue(dataset: &Dataset, meta: &CheckpointMeta, path: &Path) -> Result<(), RunError> {
    if dataset.item_tokens != meta.item_tokens {
        return Err(checkpoint_error(
            path,
            format!(
                "was trained on another catalogue ({} items) than the config's data ({} items)",
                meta.config.num_items, dataset.num_items
            ),
        ));
    }
    Ok(())
}

/// Trains `model` for up to `epochs` with `step` (one forward/backward of a batch) on the
/// trainer's single-device stepper (host AdamW under the run's settings, at a constant `lr`
/// after the warm-up), stopping early by the trainer's rule on valid NDCG@10, and keeps the
/// best model (the starting one included). Returns it, its valid metrics and its epoch.
fn train_reduced(
    model: Recommender,
    dataset: &Dataset,
    max_len: usize,
    config: &RunConfig,
    epochs: u64,
    lr: f64,
    patience: u64,
    device: &Device,
    step: &dyn Fn(&Recommender, &Batch) -> StepOutput,
) -> Result<(Recommender, BTreeMap<String, f64>, u64), RunError> {
    let train_set = TrainSet::new(dataset, max_len, config.data.windows)?;
    if train_set.is_empty() {
        return Err(RunError::NoTrainingData);
    }
    let valid = EvalSet::new(dataset, max_len, EvalSplit::Valid);
    let report = |m: &Recommender| evaluate(m, &valid, config.eval.batch_size, device).report();
    let t = &config.train;
    let batches = train_set.len().div_ceil(t.batch_size) as u64;
    let schedule = LrSchedule {
        lr,
        warmup_steps: t.warmup_steps.min(batches),
        total_steps: batches * epochs.max(1),
        min_ratio: t.min_lr_ratio,
    };
    let early_stop = EarlyStopping { patience };
    let mut progress = Progress::default();
    let mut best = model.clone();
    early_stop.observe(&mut progress, 0, &report(&model));
    let mut stepper = SingleDevice::new(model, config, device)?;
    let mut global = 0u64;
    for epoch in 0..epochs {
        for batch in train_set.epoch(t.seed, epoch, t.batch_size) {
            stepper.step_with(&batch, global, schedule.at(global) as f32, step);
            global += 1;
        }
        let valid_report = report(stepper.model());
        tracing::info!(
            epoch = epoch + 1,
            ndcg10 = format!("{:.4}", valid_report.get(METRIC).copied().unwrap_or(0.0)),
            "reduced model epoch"
        );
        match early_stop.observe(&mut progress, epoch + 1, &valid_report) {
            Verdict::Improved => best = stepper.model().clone(),
            Verdict::NoBetter => {}
            Verdict::Stop => break,
        }
    }
    Ok((best, progress.best_valid, progress.best_epoch))
}

fn test_report(
    model: &Recommender,
    dataset: &Dataset,
    max_len: usize,
    config: &RunConfig,
    device: &Device,
) -> BTreeMap<String, f64> {
    let test = EvalSet::new(dataset, max_len, EvalSplit::Test);
    evaluate(model, &test, config.eval.batch_size, device).report()
}

/// Prunes the checkpoint at `source` (trained on `config`'s data), fine-tunes the pruned
/// model briefly and saves it at `out` (users sidecar beside it).
pub fn prune_checkpoint(
    config: &RunConfig,
    source: &Path,
    options: &PruneOptions,
    out: &Path,
    device: &Device,
) -> Result<Reduced, RunError> {
    let dataset = load_dataset(config)?;
    let (model, meta) =
        checkpoint::load(source, device).map_err(|e| checkpoint_error(source, e))?;
    check_catalogue(&dataset, &meta, source)?;
    let test_before = test_report(&model, &dataset, meta.config.max_len, config, device);
    let train_set = TrainSet::new(&dataset, meta.config.max_len, config.data.windows)?;
    let batches: Vec<Batch> = train_set
        .epoch(config.train.seed ^ 0x5eed, 0, config.train.batch_size)
        .take(options.importance_batches.max(1))
        .collect();
    let importance =
        prune::importance(&model, batches, device).map_err(|e| checkpoint_error(source, e))?;
    let plan = prune::plan(&importance, options.heads, options.channels);
    tracing::info!(heads = ?plan.keep_heads, channels = ?plan.keep_channels.iter().map(Vec::len).collect::<Vec<_>>(), "pruning");
    let pruned = prune::apply(
        &model,
        &meta.config,
        &meshrec_model::SideInputs::genres(meta.item_genres.clone()),
        &plan,
        device,
    )
    .map_err(|e| checkpoint_error(source, e))?;
    let step = |m: &Recommender, b: &Batch| {
        forward_backward(m, b, 1.0 / b.num_targets().max(1) as f32, device)
    };
    let (pruned, valid, epochs) = train_reduced(
        pruned,
        &dataset,
        meta.config.max_len,
        config,
        options.finetune_epochs,
        options.lr,
        0,
        device,
        &step,
    )?;
    let mut new_meta = meta.clone();
    new_meta.name = format!("{}-pruned", meta.name);
    save_checkpoint(
        &pruned,
        out,
        &new_meta,
        Some(&UserHistories::from_dataset(&dataset)),
    )?;
    Ok(Reduced {
        checkpoint: out.to_path_buf(),
        name: new_meta.name,
        params_before: model.num_params(),
        params_after: pruned.num_params(),
        heads: plan.keep_heads.iter().map(Vec::len).collect(),
        channels: plan.keep_channels.iter().map(Vec::len).collect(),
        epochs,
        valid,
        test: test_report(&pruned, &dataset, meta.config.max_len, config, device),
        test_before,
    })
}

/// One distillation step: the student's forward through burn, the teacher's hidden states
/// without a graph, the soft and hard targets in the fused kernel, the graph cut's backward.
fn distill_step(
    student: &Recommender,
    teacher: &Recommender,
    batch: &Batch,
    weights: DistillWeights,
    device: &Device,
    teacher_device: &Device,
) -> StepOutput {
    let (b, s) = (batch.batch_size, batch.seq_len);
    let (positions, targets) = loss_positions(&batch.targets);
    if positions.is_empty() {
        return StepOutput {
            loss_sum: 0.0,
            targets: 0,
            grads: param_paths(student)
                .iter()
                .map(|p| vec![0.0; p.numel()])
                .collect(),
        };
    }
    let n = positions.len();
    let h = student.hidden(id_tensor(&batch.inputs, b, s, device));
    let d = h.dims()[2];
    let index = upload::<1, Int>(TensorData::new(positions.clone(), [n]), device);
    let h_rows = h.reshape([b * s, d]).select(0, index);
    let g = teacher.hidden(id_tensor(&batch.inputs, b, s, teacher_device));
    let dt = g.dims()[2];
    let t_index = upload::<1, Int>(TensorData::new(positions, [n]), teacher_device);
    let g_rows = host(g.reshape([b * s, dt]).select(0, t_index));
    let table = student.item_table();
    let rows = table.dims()[0];
    let student_host = host(table.clone().detach());
    let teacher_host = host(teacher.item_table());
    let out = fused_distill_cross_entropy(
        &host(h_rows.clone().detach()),
        &g_rows,
        &targets,
        TableShard::new(&student_host[d..], d, 1),
        TableShard::new(&teacher_host[dt..], dt, 1),
        weights,
        1.0 / n as f32,
        DEFAULT_CHUNK_ROWS,
    );
    let dh = upload::<2, Float>(TensorData::new(out.dh, [n, d]), device);
    let de = upload::<2, Float>(TensorData::new(out.d_table, [rows - 1, d]), device);
    let surrogate = (h_rows * dh).sum() + (table.narrow(0, 1, rows - 1) * de).sum();
    StepOutput {
        loss_sum: out.loss_sum,
        targets: n,
        grads: read_grads(student, &surrogate.backward()),
    }
}

/// Trains the student `config` describes (its `[model]`, seeded by `train.seed`) from the
/// teacher checkpoint at `teacher_path`, and saves it at `out`.
pub fn distill(
    config: &RunConfig,
    teacher_path: &Path,
    options: &DistillOptions,
    out: &Path,
    device: &Device,
) -> Result<Reduced, RunError> {
    let dataset = load_dataset(config)?;
    // The teacher runs without autodiff: no graph needed.
    let teacher_device = device.clone().inner();
    let (teacher, teacher_meta) = checkpoint::load(teacher_path, &teacher_device)
        .map_err(|e| checkpoint_error(teacher_path, e))?;
    check_catalogue(&dataset, &teacher_meta, teacher_path)?;
    let (student_config, student) = build_model(config, &dataset, device)?;
    if student_config.max_len != teacher_meta.config.max_len {
        return Err(checkpoint_error(
            teacher_path,
            format!(
                "the teacher reads {} items, the student {}: give the student the same model.max_len",
                teacher_meta.config.max_len, student_config.max_len
            ),
        ));
    }
    let test_before = test_report(
        &teacher,
        &dataset,
        student_config.max_len,
        config,
        &teacher_device,
    );
    let weights = DistillWeights {
        temperature: options.temperature,
        hard: options.hard,
    };
    let step =
        |m: &Recommender, b: &Batch| distill_step(m, &teacher, b, weights, device, &teacher_device);
    let (student, valid, epochs) = train_reduced(
        student,
        &dataset,
        student_config.max_len,
        config,
        options.epochs,
        options.lr,
        options.patience,
        device,
        &step,
    )?;
    let meta = CheckpointMeta::new(
        format!("{}-student", teacher_meta.name),
        &student_config,
        &dataset,
    );
    save_checkpoint(
        &student,
        out,
        &meta,
        Some(&UserHistories::from_dataset(&dataset)),
    )?;
    Ok(Reduced {
        checkpoint: out.to_path_buf(),
        name: meta.name,
        params_before: teacher.num_params(),
        params_after: student.num_params(),
        heads: student.blocks.iter().map(|b| b.attn.heads).collect(),
        channels: student
            .blocks
            .iter()
            .map(|b| b.mlp.w1.weight.dims()[1])
            .collect(),
        epochs,
        valid,
        test: test_report(&student, &dataset, student_config.max_len, config, device),
        test_before,
    })
}
