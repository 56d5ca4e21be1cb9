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
use meshrec_model::params::{init_normal, param_paths, read_values, write_values};
use meshrec_model::step::{evaluate_batch, forward_backward};
use meshrec_model::{ModelConfig, Recommender};
use serde::Serialize;

use crate::config::RunConfig;

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

/// Builds and seeds the model for a dataset.
pub fn build_model(
    config: &RunConfig,
    dataset: &Dataset,
    device: &Device,
) -> Result<(ModelConfig, Recommender), RunError> {
    let genres = dataset.features.as_ref();
    let model_config = config.model_config(dataset.num_items, genres.map(|f| f.num_genres))?;
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

/// Trains to convergence (early stopping on valid NDCG@10), evaluates the best checkpoint on
/// the test split and writes the run's files. `device` must have autodiff enabled.
/// One optimizer step's outcome on the global batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepResult {
    pub loss_sum: f64,
    pub targets: usize,
    /// The gradient was not finite: the optimizer step was skipped.
    pub skipped: bool,
    /// Measured on a mesh: utilization, bubble, bytes by group.
    pub parallel: Option<ParallelStepStats>,
}

/// What one step of a mesh measured (DESIGN.md's definitions), agreed over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ParallelStepStats {
    /// Per rank compute-busy / wall: mean and min over ranks.
    pub utilization_mean: f64,
    pub utilization_min: f64,
    /// Mean over ranks of the idle fraction outside forward and backward.
    pub bubble: f64,
    /// Bytes rank 0 sent in the step, by group.
    pub comm_bytes_dp: u64,
    pub comm_bytes_tp: u64,
    pub comm_bytes_pp: u64,
}

impl ParallelStepStats {
    fn add(&mut self, other: &Self) {
        self.utilization_mean += other.utilization_mean;
        self.utilization_min += other.utilization_min;
        self.bubble += other.bubble;
        self.comm_bytes_dp += other.comm_bytes_dp;
        self.comm_bytes_tp += other.comm_bytes_tp;
        self.comm_bytes_pp += other.comm_bytes_pp;
    }

    fn mean_of(sum: &Self, steps: u64) -> Self {
        let n = steps.max(1);
        Self {
            utilization_mean: sum.utilization_mean / n as f64,
            utilization_min: sum.utilization_min / n as f64,
            bubble: sum.bubble / n as f64,
            comm_bytes_dp: sum.comm_bytes_dp / n,
            comm_bytes_tp: sum.comm_bytes_tp / n,
            comm_bytes_pp: sum.comm_bytes_pp / n,
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
}

/// The single-device stepper: the model in burn, parameters and AdamW on the host.
pub struct SingleDevice {
    model: Recommender,
    values: Vec<Vec<f32>>,
    optimizer: AdamW,
    decay: Vec<bool>,
    clip_norm: f64,
    seed: u64,
    device: Device,
}

impl SingleDevice {
    pub fn new(model: Recommender, config: &RunConfig, device: &Device) -> Self {
        let infos = param_paths(&model);
        Self {
            values: read_values(&model),
            optimizer: AdamW::new(adamw_config(config), infos.iter().map(|p| p.numel())),
            decay: infos.iter().map(|p| p.shape.len() > 1).collect(),
            clip_norm: config.train.clip_norm,
            seed: config.train.seed,
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
}

/// Trains on one device.
pub fn train(config: &RunConfig, device: &Device, device_name: &str) -> Result<Summary, RunError> {
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
    )?;
    summary.ok_or(RunError::NoTrainingData)
}

/// The training loop over any [`Stepper`]: epochs in seeded order, the learning-rate
/// schedule, evaluation with early stopping, the best checkpoint, `metrics.jsonl` and
/// `summary.json` (written by the leader, which alone returns the summary).
pub fn train_with(
    config: &RunConfig,
    dataset: &Dataset,
    model_config: &ModelConfig,
    stepper: &mut dyn Stepper,
    device: &Device,
    device_name: &str,
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
    let mut metrics_file = None;
    if leader {
        std::fs::create_dir_all(&run_dir).map_err(|e| io_err(&run_dir, e))?;
        metrics_file =
            Some(std::fs::File::create(&metrics_path).map_err(|e| io_err(&metrics_path, e))?);
        let config_copy = run_dir.join("config.toml");
        std::fs::write(&config_copy, toml::to_string(config).unwrap_or_default())
            .map_err(|e| io_err(&config_copy, e))?;
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

    let mut step = 0u64;
    let (mut best_ndcg, mut best_epoch, mut since_best) = (f64::NEG_INFINITY, 0u64, 0u64);
    let mut best_valid = BTreeMap::new();
    let (mut train_seconds, mut samples, mut tokens) = (0.0f64, 0u64, 0u64);
    let mut epochs_run = 0;
    let (mut run_parallel, mut run_parallel_steps) = (None::<ParallelStepStats>, 0u64);
    for epoch in 0..t.epochs {
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
        let epoch_start = Instant::now();
        let (mut loss_sum, mut count, mut epoch_samples, mut skipped) = (0.0f64, 0u64, 0u64, 0u64);
        let (mut epoch_parallel, mut epoch_steps) = (None::<ParallelStepStats>, 0u64);
        for batch in train_set.epoch(t.seed, epoch, t.batch_size) {
            let lr = schedule.at(step);
            let out = stepper.step(&batch, step, lr as f32)?;
            epoch_steps += 1;
            if let Some(p) = &out.parallel {
                epoch_parallel.get_or_insert_with(Default::default).add(p);
                run_parallel.get_or_insert_with(Default::default).add(p);
                run_parallel_steps += 1;
            }
            if out.skipped {
                skipped += 1;
                tracing::warn!(step, "non-finite gradient norm: step skipped");
            }
            loss_sum += out.loss_sum;
            count += out.targets as u64;
            epoch_samples += batch.batch_size as u64;
            step += 1;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4}  {:.0} seq/s",
                loss_sum / count.max(1) as f64,
                epoch_samples as f64 / epoch_start.elapsed().as_secs_f64()
            ));
        }
        let seconds = epoch_start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        train_seconds += seconds;
        samples += epoch_samples;
        tokens += count;
        epochs_run = epoch + 1;
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
                step,
                loss: loss_sum / count.max(1) as f64,
                lr: schedule.at(step.saturating_sub(1)),
                samples_per_s: epoch_samples as f64 / seconds,
                tokens_per_s: count as f64 / seconds,
                skipped_steps: skipped,
                valid: valid_report.clone(),
                parallel: epoch_parallel.map(|p| ParallelStepStats::mean_of(&p, epoch_steps)),
            };
            if let Some(file) = metrics_file.as_mut() {
                let line = serde_json::to_string(&record).map_err(|e| io_err(&metrics_path, e))?;
                writeln!(file, "{line}").map_err(|e| io_err(&metrics_path, e))?;
            }
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
                if ndcg > best_ndcg {
                    best_ndcg = ndcg;
                    best_epoch = epoch + 1;
                    best_valid = valid_report;
                    since_best = 0;
                    save_checkpoint(model, &checkpoint)?;
                    flags[0] = true;
                } else {
                    since_best += 1;
                    if t.patience > 0 && since_best >= t.patience {
                        tracing::info!(
                            best_epoch,
                            "early stop: no better valid NDCG@10 for {} evaluations",
                            t.patience
                        );
                        flags[1] = true;
                    }
                }
            }
        }
        if evaluate_now && stepper.agree(flags)?[1] {
            break;
        }
    }
    let mut model = stepper.full_model()?;
    if !leader {
        return Ok(None);
    }
    load_checkpoint(&mut model, &checkpoint)?;
    let test_report = evaluate(&model, &test, config.eval.batch_size, device).report();
    let summary = Summary {
        name: config.output.name.clone(),
        dataset: dataset.name.clone(),
        preset: config.model.preset.clone(),
        device: device_name.to_string(),
        params,
        epochs_run,
        best_epoch,
        samples_per_s: samples as f64 / train_seconds.max(1e-9),
        tokens_per_s: tokens as f64 / train_seconds.max(1e-9),
        peak_rss_bytes: peak_rss_bytes(),
        wall_seconds: start.elapsed().as_secs_f64(),
        valid: best_valid,
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
    let (_, mut model) = build_model(config, &dataset, device)?;
    let model_config = config.model_config(
        dataset.num_items,
        dataset.features.as_ref().map(|f| f.num_genres),
    )?;
    let train_set = TrainSet::new(&dataset, model_config.max_len, config.data.windows)?;
    let infos = param_paths(&model);
    let decay: Vec<bool> = infos.iter().map(|p| p.shape.len() > 1).collect();
    let mut optimizer = AdamW::new(AdamWConfig::default(), infos.iter().map(|p| p.numel()));
    let mut values = read_values(&model);
    let batches: Vec<_> = (0..)
        .flat_map(|e| {
            train_set
                .epoch(config.train.seed, e, config.train.batch_size)
                .collect::<Vec<_>>()
        })
        .filter(|b| b.batch_size == config.train.batch_size)
        .take(warmup + steps)
        .collect();
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
