//! A single-device training run: data, model, the step loop with the host optimizer,
//! evaluation with early stopping, the best checkpoint, `metrics.jsonl` and `summary.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use meshrec_model::data::{Batch, Dataset, EvalSet, EvalSplit, TrainSet};
use meshrec_model::metrics::RankingMetrics;
use meshrec_model::optim::{clip_by_global_norm, sum_of_squares, AdamW, AdamWConfig, LrSchedule};
use meshrec_model::params::{init_normal, param_paths, read_values, write_values, ParamInfo};
use meshrec_model::step::{evaluate_batch, forward_backward};
use meshrec_model::{ModelConfig, Recommender};
use serde::Serialize;

use meshrec_parallel::dp::DpTraffic;

use crate::checkpoint::{
    self, Manifest, Progress, RngState, SavedCompressor, SavedLayout, StateKind, TrainState,
};
use crate::config::{FaultSection, RunConfig};

/// Errors of a run, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Data(#[from] meshrec_model::DataError),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("no training sequences: every user has fewer than two training items")]
    NoTrainingData,
    #[error("parallel run: {0}")]
    Parallel(String),
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Loads the dataset a config names.
pub fn load_dataset(config: &RunConfig) -> Result<Dataset, RunError> {
    if config.data.path == "synthetic" {
        return Ok(config.data.synthetic.dataset()?);
    }
    Ok(Dataset::load(Path::new(&config.data.path))?)
}

/// The model config of a run on a dataset (catalogue size and genres come from the data).
pub fn dataset_model_config(
    config: &RunConfig,
    dataset: &Dataset,
) -> Result<ModelConfig, RunError> {
    let genres = dataset.features.as_ref().map(|f| f.num_genres);
    Ok(config.model_config(dataset.num_items, genres)?)
}

/// Builds and seeds the model for a dataset.
pub fn build_model(
    config: &RunConfig,
    dataset: &Dataset,
    device: &Device,
) -> Result<(ModelConfig, Recommender), RunError> {
    let genres = dataset.features.as_ref();
    let model_config = dataset_model_config(config, dataset)?;
    let model = Recommender::new(
        &model_config,
        genres.map(|f| f.item_genres.as_slice()),
        device,
    );
    let model = init_normal(
        model,
        config.train.seed,
        model_config.init_std,
        model_config.n_layers,
        device,
    );
    Ok((model_config, model))
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    pub skipped_steps: u64,
    pub valid: BTreeMap<String, f64>,
    /// Means per step over the epoch, on a mesh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelStepStats>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub dataset: String,
    pub preset: String,
    pub device: String,
    pub params: u64,
    pub epochs_run: u64,
    pub best_epoch: u64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: u64,
    pub wall_seconds: f64,
    /// Steps whose gradient was not finite (the update was skipped).
    pub skipped_steps: u64,
    pub valid: BTreeMap<String, f64>,
    pub test: BTreeMap<String, f64>,
    pub checkpoint: PathBuf,
    /// Means per step over the run, on a mesh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelStepStats>,
}

/// Full-ranking metrics of a model on one split.
pub fn evaluate(
    model: &Recommender,
    set: &EvalSet,
    batch_size: usize,
    device: &Device,
) -> RankingMetrics {
    let mut metrics = RankingMetrics::default();
    for batch in set.batches(batch_size) {
        evaluate_batch(model, &batch, device, &mut metrics);
    }
    metrics
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Writes the module's weights as safetensors, atomically (temp file, fsync, rename).
pub fn save_checkpoint(model: &Recommender, path: &Path) -> Result<(), RunError> {
    let tmp = path.with_extension("safetensors.tmp");
    let mut store = SafetensorsStore::from_file(tmp.clone());
    model
        .save_into(&mut store)
        .map_err(|e| RunError::Checkpoint {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
    let file = std::fs::File::open(&tmp).map_err(|e| io_err(&tmp, e))?;
    file.sync_all().map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Loads weights saved by [`save_checkpoint`] into a model of the same shape.
pub fn load_checkpoint(model: &mut Recommender, path: &Path) -> Result<(), RunError> {
    if !path.is_file() {
        return Err(RunError::Checkpoint {
            path: path.into(),
            message: "no such file".into(),
        });
    }
    let mut store = SafetensorsStore::from_file(path.to_path_buf());
    let result = model
        .load_from(&mut store)
        .map_err(|e| RunError::Checkpoint {
            path: path.into(),
            message: e.to_string(),
        })?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(RunError::Checkpoint {
            path: path.into(),
            message: format!(
                "does not match the model: errors {:?}, missing {:?}",
                result.errors, result.missing
            ),
        });
    }
    Ok(())
}

/// One optimizer step's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepResult {
    /// Loss summed over `loss_targets` targets (the global batch, or this replica's rows
    /// when replicas do not meet every step).
    pub loss_sum: f64,
    pub loss_targets: usize,
    /// Targets of the global batch (for throughput).
    pub targets: usize,
    /// The gradient was not finite: the optimizer step was skipped.
    pub skipped: bool,
    /// Measured on a mesh: utilization, bubble, bytes by group, staleness, compression.
    pub parallel: Option<ParallelStepStats>,
}

/// What one step of a mesh measured (DESIGN.md's definitions).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ParallelStepStats {
    /// Per rank compute-busy / wall: mean and min over ranks (over the ranks of one DP
    /// replica in async mode, where replicas do not meet every step).
    pub utilization_mean: f64,
    pub utilization_min: f64,
    /// Mean over ranks of the idle fraction outside forward and backward.
    pub bubble: f64,
    /// Bytes rank 0 sent in the step, by group.
    pub comm_bytes_dp: u64,
    pub comm_bytes_tp: u64,
    pub comm_bytes_pp: u64,
    /// Dense gradient bytes over the compressor's wire bytes on the DP group (1 = dense),
    /// over the reductions applied (none in some async steps: then 1).
    pub compression_ratio: f64,
    /// The DP reductions' dense and wire (payload) bytes behind the ratio.
    pub dp_dense_bytes: u64,
    pub dp_wire_bytes: u64,
    /// Updates applied in the step and how many other updates each missed (0 in sync DP).
    pub updates_applied: u64,
    pub staleness_mean: f64,
    pub staleness_max: u64,
    /// Pipeline re-partitions done by the online rebalancer.
    pub migrations: u64,
    /// Rows of the global batch of the smallest and largest DP replica's share.
    pub dp_rows_min: u64,
    pub dp_rows_max: u64,
}

impl ParallelStepStats {
    pub(crate) fn add(&mut self, other: &Self) {
        self.utilization_mean += other.utilization_mean;
        self.utilization_min += other.utilization_min;
        self.bubble += other.bubble;
        self.comm_bytes_dp += other.comm_bytes_dp;
        self.comm_bytes_tp += other.comm_bytes_tp;
        self.comm_bytes_pp += other.comm_bytes_pp;
        self.dp_dense_bytes += other.dp_dense_bytes;
        self.dp_wire_bytes += other.dp_wire_bytes;
        self.updates_applied += other.updates_applied;
        self.staleness_mean += other.staleness_mean * other.updates_applied as f64;
        self.staleness_max = self.staleness_max.max(other.staleness_max);
        self.migrations += other.migrations;
        self.dp_rows_min += other.dp_rows_min;
        self.dp_rows_max += other.dp_rows_max;
    }

    pub(crate) fn mean_of(sum: &Self, steps: u64) -> Self {
        let n = steps.max(1);
        Self {
            utilization_mean: sum.utilization_mean / n as f64,
            utilization_min: sum.utilization_min / n as f64,
            bubble: sum.bubble / n as f64,
            comm_bytes_dp: sum.comm_bytes_dp / n,
            comm_bytes_tp: sum.comm_bytes_tp / n,
            comm_bytes_pp: sum.comm_bytes_pp / n,
            compression_ratio: DpTraffic {
                dense_bytes: sum.dp_dense_bytes,
                wire_bytes: sum.dp_wire_bytes,
                sent_bytes: 0,
            }
            .compression_ratio(),
            dp_dense_bytes: sum.dp_dense_bytes / n,
            dp_wire_bytes: sum.dp_wire_bytes / n,
            updates_applied: sum.updates_applied,
            staleness_mean: sum.staleness_mean / sum.updates_applied.max(1) as f64,
            staleness_max: sum.staleness_max,
            migrations: sum.migrations,
            dp_rows_min: sum.dp_rows_min / n,
            dp_rows_max: sum.dp_rows_max / n,
        }
    }
}

/// What the training loop needs from whatever runs the steps: one device, or one rank of a
/// device mesh. Calls are collective on a mesh: every rank makes them in the same order.
pub trait Stepper {
    /// One optimizer step on the global batch at learning rate `lr`.
    fn step(&mut self, batch: &Batch, step: u64, lr: f32) -> Result<StepResult, RunError>;
    /// The full model with the current parameters (gathered from the shards on a mesh).
    fn full_model(&mut self) -> Result<Recommender, RunError>;
    /// Whether this rank evaluates, writes the run's files and logs.
    fn is_leader(&self) -> bool;
    /// The leader's `flags`, on every rank (decisions such as early stopping).
    fn agree(&mut self, flags: [bool; 2]) -> Result<[bool; 2], RunError>;
    /// The full training state (gathered from the shards; the leader gets it).
    fn export_state(&mut self) -> Result<Option<TrainState>, RunError>;
    /// Takes up a saved state; compressor memories only when `same_layout`.
    fn import_state(&mut self, state: &TrainState, same_layout: bool) -> Result<(), RunError>;
}

/// The single-device stepper: the model in burn, parameters and AdamW on the host.
pub struct SingleDevice {
    model: Recommender,
    infos: Vec<ParamInfo>,
    values: Vec<Vec<f32>>,
    optimizer: AdamW,
    decay: Vec<bool>,
    clip_norm: f64,
    seed: u64,
    fault: FaultSection,
    device: Device,
}

impl SingleDevice {
    pub fn new(model: Recommender, config: &RunConfig, device: &Device) -> Self {
        let infos = param_paths(&model);
        Self {
            values: read_values(&model),
            optimizer: AdamW::new(adamw_config(config), infos.iter().map(|p| p.numel())),
            decay: infos.iter().map(|p| p.shape.len() > 1).collect(),
            infos,
            clip_norm: config.train.clip_norm,
            seed: config.train.seed,
            fault: config.fault.clone(),
            model,
            device: device.clone(),
        }
    }
}

/// The AdamW settings of `[train]`.
pub fn adamw_config(config: &RunConfig) -> AdamWConfig {
    let t = &config.train;
    AdamWConfig {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    }
}

/// The dropout stream of `step`: reproducible and resumable.
pub fn dropout_seed(seed: u64, step: u64) -> u64 {
    seed ^ step.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// `[fault]`'s NaN injection: poisons `grads` when this is the rank and step it names.
pub fn inject_nan(fault: &FaultSection, rank: usize, step: u64, grads: &mut [Vec<f32>]) {
    if fault.nan_step == Some(step) && fault.nan_rank == rank {
        poison_first(grads);
    }
}

/// Sets the first gradient element to NaN (what `[fault]`'s NaN injection does).
pub(crate) fn poison_first(grads: &mut [Vec<f32>]) {
    if let Some(x) = grads.iter_mut().find_map(|g| g.first_mut()) {
        *x = f32::NAN;
    }
}

impl Stepper for SingleDevice {
    fn step(&mut self, batch: &Batch, step: u64, lr: f32) -> Result<StepResult, RunError> {
        meshrec_model::dropout::seed_dropout(dropout_seed(self.seed, step));
        let targets = batch.num_targets();
        let mut out = forward_backward(
            &self.model,
            batch,
            1.0 / targets.max(1) as f32,
            &self.device,
        );
        inject_nan(&self.fault, 0, step, &mut out.grads);
        let norm = sum_of_squares(&out.grads).sqrt();
        let skipped = !norm.is_finite();
        if !skipped {
            clip_by_global_norm(&mut out.grads, norm, self.clip_norm);
            self.optimizer
                .update(&mut self.values, &out.grads, lr, &self.decay);
            // A module clone shares its tensors: cheap.
            self.model = write_values(self.model.clone(), &self.values, &self.device);
        }
        Ok(StepResult {
            loss_sum: out.loss_sum,
            loss_targets: out.targets,
            targets: out.targets,
            skipped,
            parallel: None,
        })
    }

    fn full_model(&mut self) -> Result<Recommender, RunError> {
        Ok(self.model.clone())
    }

    fn is_leader(&self) -> bool {
        true
    }

    fn agree(&mut self, flags: [bool; 2]) -> Result<[bool; 2], RunError> {
        Ok(flags)
    }

    fn export_state(&mut self) -> Result<Option<TrainState>, RunError> {
        Ok(Some(TrainState::from_ordered(
            &self.infos,
            self.values.clone(),
            self.optimizer.m.clone(),
            self.optimizer.v.clone(),
            self.optimizer.step,
        )))
    }

    fn import_state(&mut self, state: &TrainState, _same_layout: bool) -> Result<(), RunError> {
        let ordered = |kind| {
            state
                .full(kind)
                .to_ordered(&self.infos)
                .map_err(|e| RunError::Parallel(e.to_string()))
        };
        self.values = ordered(StateKind::Values)?;
        self.optimizer.m = ordered(StateKind::AdamM)?;
        self.optimizer.v = ordered(StateKind::AdamV)?;
        self.optimizer.step = state.optimizer_steps;
        self.model = write_values(self.model.clone(), &self.values, &self.device);
        Ok(())
    }
}

/// Trains on one device.
pub fn train(
    config: &RunConfig,
    device: &Device,
    device_name: &str,
    resume: Option<&Path>,
) -> Result<Summary, RunError> {
    let dataset = load_dataset(config)?;
    let (model_config, model) = build_model(config, &dataset, device)?;
    let mut stepper = SingleDevice::new(model, config, device);
    let summary = train_with(
        config,
        &dataset,
        &model_config,
        &mut stepper,
        device,
        device_name,
        resume,
    )?;
    summary.ok_or(RunError::NoTrainingData)
}

/// One line of `metrics.jsonl`: a step or an epoch.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsLine {
    Step(StepRecord),
    Epoch(EpochRecord),
}

/// A step's line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    pub skipped: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelStepStats>,
}

/// The layout a run's checkpoints record.
pub fn saved_layout(config: &RunConfig) -> SavedLayout {
    let p = &config.parallel;
    SavedLayout {
        dp: p.dp,
        tp: p.tp,
        pp: p.pp,
        virtual_stages: p.virtual_stages,
        schedule: p.schedule.clone(),
        micro_batches: p.micro_batches,
        dp_mode: config.dp.mode.clone(),
        bucket_mb: config.dp.bucket_mb,
    }
}

/// The metrics file of a run: new, or (resuming) the old one cut back to the checkpoint's
/// step so that its lines continue without duplicates.
fn open_metrics(path: &Path, resume_step: Option<u64>) -> Result<std::fs::File, RunError> {
    let kept = match resume_step {
        Some(step) if path.is_file() => std::fs::read_to_string(path)
            .map_err(|e| io_err(path, e))?
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
        _ => String::new(),
    };
    std::fs::write(path, kept).map_err(|e| io_err(path, e))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, e))
}

fn write_line(
    file: &mut Option<std::fs::File>,
    path: &Path,
    line: &MetricsLine,
) -> Result<(), RunError> {
    if let Some(f) = file.as_mut() {
        let text = serde_json::to_string(line).map_err(|e| io_err(path, e))?;
        writeln!(f, "{text}").map_err(|e| io_err(path, e))?;
    }
    Ok(())
}

/// The training loop over any [`Stepper`]: epochs in seeded order, the learning-rate
/// schedule, evaluation with early stopping, the best model, training-state checkpoints
/// (`--resume` continues from one exactly), `metrics.jsonl` and `summary.json` (written by
/// the leader, which alone returns the summary).
pub fn train_with(
    config: &RunConfig,
    dataset: &Dataset,
    model_config: &ModelConfig,
    stepper: &mut dyn Stepper,
    device: &Device,
    device_name: &str,
    resume: Option<&Path>,
) -> Result<Option<Summary>, RunError> {
    let start = Instant::now();
    let leader = stepper.is_leader();
    let train_set = TrainSet::new(dataset, model_config.max_len, config.data.windows)?;
    if train_set.is_empty() {
        return Err(RunError::NoTrainingData);
    }
    let valid = EvalSet::new(dataset, model_config.max_len, EvalSplit::Valid);
    let test = EvalSet::new(dataset, model_config.max_len, EvalSplit::Test);
    let run_dir = config.run_dir();
    let metrics_path = run_dir.join("metrics.jsonl");
    let checkpoint = run_dir.join("best.safetensors");
    let state_root = run_dir.join("checkpoints");
    let config_text = toml::to_string(config).unwrap_or_default();

    let mut progress = Progress::default();
    if let Some(path) = resume {
        let (dir, manifest, state) = checkpoint::load(path)?;
        checkpoint::check_compatible(&manifest.config, config).map_err(|key| {
            RunError::Checkpoint {
                path: dir.clone(),
                message: format!(
                    "`{key}` differs from the run that saved it: a resume must train the same model on the same data"
                ),
            }
        })?;
        let same_layout = manifest.layout == saved_layout(config);
        stepper.import_state(&state, same_layout)?;
        if leader {
            tracing::info!(
                step = manifest.progress.step,
                epoch = manifest.progress.epoch + 1,
                saved_by = format!(
                    "dp{}·tp{}·pp{}",
                    manifest.layout.dp, manifest.layout.tp, manifest.layout.pp
                ),
                "resuming from {}",
                dir.display()
            );
            if !same_layout && manifest.compressor.is_some() {
                tracing::warn!(
                    "the checkpoint's compressor memories follow its own DP buckets: error feedback restarts from zero in this layout"
                );
            }
        }
        progress = manifest.progress;
    }

    let mut metrics_file = None;
    if leader {
        std::fs::create_dir_all(&run_dir).map_err(|e| io_err(&run_dir, e))?;
        metrics_file = Some(open_metrics(&metrics_path, resume.map(|_| progress.step))?);
        let config_copy = run_dir.join("config.toml");
        std::fs::write(&config_copy, &config_text).map_err(|e| io_err(&config_copy, e))?;
    }
    let params = model_config.num_params();
    let t = &config.train;
    let batches_per_epoch = train_set.len().div_ceil(t.batch_size) as u64;
    let schedule = LrSchedule {
        lr: t.lr,
        warmup_steps: t.warmup_steps,
        total_steps: batches_per_epoch * t.epochs,
        min_ratio: t.min_lr_ratio,
    };
    if leader {
        tracing::info!(
            users = dataset.num_users(),
            items = dataset.num_items,
            sequences = train_set.len(),
            targets = train_set.num_targets(),
            params,
            "training {} on {}",
            config.model.preset,
            dataset.name
        );
    }
    let compressed = config.parallel.dp > 1
        && config.compress.method_config()? != meshrec_compress::MethodConfig::Identity;
    let world = config.parallel.world_size();
    // Collective on a mesh; the leader writes.
    let save_state = |stepper: &mut dyn Stepper, progress: &Progress| -> Result<(), RunError> {
        let state = stepper.export_state()?;
        if let Some(state) = state {
            let manifest = Manifest {
                format: checkpoint::FORMAT.into(),
                version: checkpoint::VERSION,
                layout: saved_layout(config),
                progress: progress.clone(),
                rng: RngState::of_seed(t.seed),
                compressor: compressed.then(|| SavedCompressor {
                    method: config.compress.method.clone(),
                    error_feedback: config.compress.error_feedback,
                    files: (0..world)
                        .map(|r| format!("compress-rank{r}.bin"))
                        .collect(),
                }),
                files: Vec::new(),
                config: config_text.clone(),
            };
            let dir = checkpoint::save(&state_root, manifest, &state, config.checkpoint.keep)?;
            tracing::debug!(dir = %dir.display(), "checkpoint saved");
        }
        Ok(())
    };

    let (mut run_parallel, mut run_parallel_steps) = (None::<ParallelStepStats>, 0u64);
    let mut stopped_at_max = false;
    let first_epoch = progress.epoch;
    'epochs: for epoch in first_epoch..t.epochs {
        let bar = if leader {
            ProgressBar::new(batches_per_epoch)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!("{}", epoch + 1));
        let skip = if epoch == first_epoch {
            progress.batch_in_epoch as usize
        } else {
            0
        };
        bar.inc(skip as u64);
        progress.epoch = epoch;
        if skip == 0 {
            progress.epoch_loss_sum = 0.0;
            progress.epoch_loss_targets = 0;
            progress.epoch_targets = 0;
            progress.epoch_samples = 0;
            progress.epoch_seconds = 0.0;
            progress.epoch_skipped = 0;
        }
        let (mut epoch_parallel, mut epoch_steps) = (None::<ParallelStepStats>, 0u64);
        for (index, batch) in train_set
            .epoch(t.seed, epoch, t.batch_size)
            .enumerate()
            .skip(skip)
        {
            let step = progress.step;
            let lr = schedule.at(step);
            let step_start = Instant::now();
            let out = stepper.step(&batch, step, lr as f32)?;
            let seconds = step_start.elapsed().as_secs_f64();
            epoch_steps += 1;
            if let Some(p) = &out.parallel {
                epoch_parallel.get_or_insert_with(Default::default).add(p);
                run_parallel.get_or_insert_with(Default::default).add(p);
                run_parallel_steps += 1;
            }
            if out.skipped {
                progress.epoch_skipped += 1;
                progress.skipped_steps += 1;
                tracing::warn!(step, "non-finite gradient: optimizer step skipped");
            }
            progress.epoch_loss_sum += out.loss_sum;
            progress.epoch_loss_targets += out.loss_targets as u64;
            progress.epoch_targets += out.targets as u64;
            progress.epoch_samples += batch.batch_size as u64;
            progress.epoch_seconds += seconds;
            progress.step += 1;
            progress.batch_in_epoch = index as u64 + 1;
            progress.train_seconds += seconds;
            progress.samples += batch.batch_size as u64;
            progress.tokens += out.targets as u64;
            write_line(
                &mut metrics_file,
                &metrics_path,
                &MetricsLine::Step(StepRecord {
                    step: progress.step,
                    epoch: epoch + 1,
                    loss: out.loss_sum / out.loss_targets.max(1) as f64,
                    lr,
                    samples_per_s: batch.batch_size as f64 / seconds.max(1e-9),
                    tokens_per_s: out.targets as f64 / seconds.max(1e-9),
                    skipped: out.skipped,
                    parallel: out.parallel,
                }),
            )?;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4}  {:.0} seq/s",
                progress.epoch_loss_sum / progress.epoch_loss_targets.max(1) as f64,
                progress.epoch_samples as f64 / progress.epoch_seconds.max(1e-9)
            ));
            if t.max_steps > 0 && progress.step >= t.max_steps {
                save_state(stepper, &progress)?;
                stopped_at_max = true;
                bar.finish_and_clear();
                if leader {
                    tracing::info!(
                        step = progress.step,
                        "train.max_steps reached: checkpoint saved, stopping"
                    );
                }
                break 'epochs;
            }
            // The epoch's end saves anyway (with its evaluation in the state).
            let every = config.checkpoint.every_steps;
            let last_of_epoch = progress.batch_in_epoch == batches_per_epoch;
            if every > 0 && progress.step.is_multiple_of(every) && !last_of_epoch {
                save_state(stepper, &progress)?;
            }
        }
        bar.finish_and_clear();
        let p = progress.clone();
        progress.epoch = epoch + 1;
        progress.batch_in_epoch = 0;
        let evaluate_now = (epoch + 1) % config.eval.every == 0 || epoch + 1 == t.epochs;
        let model = if evaluate_now {
            Some(stepper.full_model()?)
        } else {
            None
        };
        let mut flags = [false, false];
        if let (true, Some(model)) = (leader, &model) {
            let valid_report = evaluate(model, &valid, config.eval.batch_size, device).report();
            let record = EpochRecord {
                epoch: epoch + 1,
                step: progress.step,
                loss: p.epoch_loss_sum / p.epoch_loss_targets.max(1) as f64,
                lr: schedule.at(progress.step.saturating_sub(1)),
                samples_per_s: p.epoch_samples as f64 / p.epoch_seconds.max(1e-9),
                tokens_per_s: p.epoch_targets as f64 / p.epoch_seconds.max(1e-9),
                skipped_steps: p.epoch_skipped,
                valid: valid_report.clone(),
                parallel: epoch_parallel.map(|p| ParallelStepStats::mean_of(&p, epoch_steps)),
            };
            write_line(
                &mut metrics_file,
                &metrics_path,
                &MetricsLine::Epoch(record.clone()),
            )?;
            tracing::info!(
                epoch = epoch + 1,
                loss = format!("{:.4}", record.loss),
                samples_per_s = format!("{:.0}", record.samples_per_s),
                ndcg10 = format!(
                    "{:.4}",
                    valid_report.get("ndcg@10").copied().unwrap_or(f64::NAN)
                ),
                "epoch done"
            );
            if let Some(&ndcg) = valid_report.get("ndcg@10") {
                if progress.best_ndcg.is_none_or(|best| ndcg > best) {
                    progress.best_ndcg = Some(ndcg);
                    progress.best_epoch = epoch + 1;
                    progress.best_valid = valid_report;
                    progress.since_best = 0;
                    save_checkpoint(model, &checkpoint)?;
                    flags[0] = true;
                } else {
                    progress.since_best += 1;
                    if t.patience > 0 && progress.since_best >= t.patience {
                        tracing::info!(
                            best_epoch = progress.best_epoch,
                            "early stop: no better valid NDCG@10 for {} evaluations",
                            t.patience
                        );
                        flags[1] = true;
                    }
                }
            }
        }
        // The training state at the epoch's end, early stopping included.
        save_state(stepper, &progress)?;
        if evaluate_now && stepper.agree(flags)?[1] {
            break;
        }
    }
    let mut model = stepper.full_model()?;
    if !leader {
        return Ok(None);
    }
    if checkpoint.is_file() {
        load_checkpoint(&mut model, &checkpoint)?;
    } else if !stopped_at_max {
        return Err(RunError::Checkpoint {
            path: checkpoint,
            message: "no best model was saved (no evaluation ran)".into(),
        });
    }
    let test_report = evaluate(&model, &test, config.eval.batch_size, device).report();
    let summary = Summary {
        name: config.output.name.clone(),
        dataset: dataset.name.clone(),
        preset: config.model.preset.clone(),
        device: device_name.to_string(),
        params,
        epochs_run: progress.epoch,
        best_epoch: progress.best_epoch,
        samples_per_s: progress.samples as f64 / progress.train_seconds.max(1e-9),
        tokens_per_s: progress.tokens as f64 / progress.train_seconds.max(1e-9),
        peak_rss_bytes: peak_rss_bytes(),
        wall_seconds: start.elapsed().as_secs_f64(),
        skipped_steps: progress.skipped_steps,
        valid: progress.best_valid.clone(),
        test: test_report,
        checkpoint,
        parallel: run_parallel.map(|p| ParallelStepStats::mean_of(&p, run_parallel_steps)),
    };
    let summary_path = run_dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(|e| io_err(&summary_path, e))?;
    std::fs::write(&summary_path, text).map_err(|e| io_err(&summary_path, e))?;
    Ok(Some(summary))
}

/// Throughput of training steps alone (no evaluation), after `warmup` steps: the figure of
/// `cargo xtask bench train`. Returns (samples_per_s, tokens_per_s, seconds per phase).
pub fn measure_throughput(
    config: &RunConfig,
    device: &Device,
    warmup: usize,
    steps: usize,
) -> Result<Throughput, RunError> {
    let dataset = load_dataset(config)?;
    let (model_config, mut model) = build_model(config, &dataset, device)?;
    let train_set = TrainSet::new(&dataset, model_config.max_len, config.data.windows)?;
    let infos = param_paths(&model);
    let decay: Vec<bool> = infos.iter().map(|p| p.shape.len() > 1).collect();
    let mut optimizer = AdamW::new(AdamWConfig::default(), infos.iter().map(|p| p.numel()));
    let mut values = read_values(&model);
    let batches = crate::measure::full_batches(config, &train_set, warmup + steps);
    let mut th = Throughput::default();
    for (i, batch) in batches.iter().enumerate() {
        let measured = i >= warmup;
        let t0 = Instant::now();
        let out = forward_backward(
            &model,
            batch,
            1.0 / batch.num_targets().max(1) as f32,
            device,
        );
        let t1 = Instant::now();
        optimizer.update(&mut values, &out.grads, 1e-3, &decay);
        model = write_values(model, &values, device);
        let t2 = Instant::now();
        if measured {
            th.forward_backward_s += (t1 - t0).as_secs_f64();
            th.optimizer_s += (t2 - t1).as_secs_f64();
            th.samples += batch.batch_size as u64;
            th.tokens += out.targets as u64;
        }
    }
    th.steps = steps as u64;
    Ok(th)
}

/// Measured training throughput and where the step time goes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Throughput {
    pub steps: u64,
    pub samples: u64,
    pub tokens: u64,
    pub forward_backward_s: f64,
    pub optimizer_s: f64,
}

impl Throughput {
    pub fn seconds(&self) -> f64 {
        self.forward_backward_s + self.optimizer_s
    }
    pub fn samples_per_s(&self) -> f64 {
        self.samples as f64 / self.seconds().max(1e-9)
    }
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds().max(1e-9)
    }
}
