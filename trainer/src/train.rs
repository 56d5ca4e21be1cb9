//! The training loop over any [`Stepper`], composed as burn-train's learner is: epochs of
//! steps in seeded order under the learning-rate schedule, then evaluation, with the
//! policies that decide around it — [`EarlyStopping`], [`CheckpointPolicy`],
//! [`MetricsWriter`], [`EpochProgress`] — each owning its part of the config.

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use meshrec_model::checkpoint::{CheckpointMeta, UserHistories};
use meshrec_model::data::{Dataset, EvalSet, EvalSplit, TrainSet};
use meshrec_model::optim::LrSchedule;
use meshrec_model::transfer::Transferred;
use meshrec_model::ModelConfig;

use crate::checkpoint::Progress;
use crate::checkpoint_policy::CheckpointPolicy;
use crate::config::RunConfig;
use crate::early_stop::{EarlyStopping, Verdict, METRIC};
use crate::elastic::Phase;
use crate::error::RunError;
use crate::heap;
use crate::metrics::{
    peak_rss_bytes, write_summary, EpochRecord, MetricsLine, MetricsWriter, StepRecord, Summary,
};
use crate::model_io::{evaluate, load_checkpoint, save_checkpoint};
use crate::progress::EpochProgress;
use crate::setup::{build_model, load_dataset};
use crate::single::SingleDevice;
use crate::stepper::{HeldMemory, ParallelStepStats, StepResult, Stepper};

/// Trains on one device.
pub fn train(
    config: &RunConfig,
    device: &Device,
    device_name: &str,
    resume: Option<&Path>,
) -> Result<Summary, RunError> {
    let dataset = load_dataset(config)?;
    let (model_config, model) = build_model(config, &dataset, device)?;
    let mut stepper = SingleDevice::new(model, config, device)?;
    let summary = train_with(
        config,
        &dataset,
        &model_config,
        &mut stepper,
        device,
        device_name,
        resume,
        &mut NoHooks,
    )?;
    summary.ok_or(RunError::NoTrainingData)
}

/// Sums of per-step mesh statistics, for the means of an epoch or a run.
#[derive(Default)]
struct StatsSum {
    sum: Option<ParallelStepStats>,
    steps: u64,
}

impl StatsSum {
    fn add(&mut self, stats: &Option<ParallelStepStats>) {
        if let Some(p) = stats {
            self.sum.get_or_insert_with(Default::default).add(p);
            self.steps += 1;
        }
    }

    fn mean(&self) -> Option<ParallelStepStats> {
        self.sum
            .as_ref()
            .map(|s| ParallelStepStats::mean_of(s, self.steps))
    }
}

/// Counts a finished step into the progress (the data position included).
fn record_step(progress: &mut Progress, out: &StepResult, samples: u64, seconds: f64, index: u64) {
    if out.skipped {
        progress.epoch_skipped += 1;
        progress.skipped_steps += 1;
    }
    progress.epoch_loss_sum += out.loss_sum;
    progress.epoch_loss_targets += out.loss_targets as u64;
    progress.epoch_targets += out.targets as u64;
    progress.epoch_samples += samples;
    progress.epoch_seconds += seconds;
    progress.step += 1;
    progress.batch_in_epoch = index + 1;
    progress.train_seconds += seconds;
    progress.samples += samples;
    progress.tokens += out.targets as u64;
}

/// Clears the per-epoch sums at an epoch's start.
/// Raises each rank's peak of each kind to what it holds after this step.
fn peak_memory(peak: &mut Vec<HeldMemory>, now: &[HeldMemory]) {
    if peak.len() != now.len() {
        peak.resize(now.len(), HeldMemory::default());
    }
    for (p, n) in peak.iter_mut().zip(now) {
        *p = p.max(*n);
    }
}

fn start_epoch(progress: &mut Progress, epoch: u64) {
    progress.epoch = epoch;
    progress.epoch_loss_sum = 0.0;
    progress.epoch_loss_targets = 0;
    progress.epoch_targets = 0;
    progress.epoch_samples = 0;
    progress.epoch_seconds = 0.0;
    progress.epoch_skipped = 0;
}

/// Saves the training state, telling the hooks (a checkpoint is its own phase for a
/// watchdog: it may take longer than a step without anything being wrong).
fn save(
    checkpoints: &CheckpointPolicy,
    stepper: &mut dyn Stepper,
    progress: &Progress,
    hooks: &mut dyn LoopHooks,
) -> Result<(), RunError> {
    hooks.phase(Phase::Checkpoint, progress.step);
    checkpoints.save(stepper, progress)
}

/// How an epoch's steps ended.
enum EpochEnd {
    Completed,
    /// `train.max_steps` reached (a checkpoint was saved).
    MaxSteps,
}

/// What a run's loop needs besides its stepper: the config, the data and the device.
pub struct LoopInputs<'a> {
    pub config: &'a RunConfig,
    pub dataset: &'a Dataset,
    pub model_config: &'a ModelConfig,
    pub device: &'a Device,
    pub device_name: &'a str,
}

/// What a membership-aware driver hears from the loop and may ask of it. The plain loop
/// has [`NoHooks`].
pub trait LoopHooks {
    /// The loop entered `phase` at `step` (progress, for a watchdog).
    fn phase(&mut self, phase: Phase, step: u64) {
        let _ = (phase, step);
    }

    /// Whether to leave the loop at this step boundary for a membership change (a replica
    /// joining).
    fn regroup_before(&mut self, step: u64) -> bool {
        let _ = step;
        false
    }
}

/// A loop nobody watches.
pub struct NoHooks;

impl LoopHooks for NoHooks {}

/// How the loop ended.
pub enum LoopEnd {
    /// The run is over; the leader has its summary.
    Finished(Option<Box<Summary>>),
    /// A driver asked to regroup at a step boundary (`progress` is where training stands).
    Regroup,
}

/// A run's totals that outlive one pass of the loop (an elastic run re-enters it after a
/// membership change).
pub struct RunTotals {
    start: Instant,
    stats: StatsSum,
    memory_peak: Vec<HeldMemory>,
    heap_step_peak: Option<u64>,
}

impl Default for RunTotals {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            stats: StatsSum::default(),
            memory_peak: Vec::new(),
            heap_step_peak: None,
        }
    }
}

/// The training loop over any [`Stepper`]: epochs in seeded order, the learning-rate
/// schedule, evaluation with early stopping, the best model, training-state checkpoints
/// (`--resume` continues from one exactly), `metrics.jsonl` and `summary.json` (written by
/// the leader, which alone returns the summary). `hooks` hear the loop's phases (a watched
/// MPI rank's health file).
#[allow(clippy::too_many_arguments)]
pub fn train_with(
    config: &RunConfig,
    dataset: &Dataset,
    model_config: &ModelConfig,
    stepper: &mut dyn Stepper,
    device: &Device,
    device_name: &str,
    resume: Option<&Path>,
    hooks: &mut dyn LoopHooks,
) -> Result<Option<Summary>, RunError> {
    let mut totals = RunTotals::default();
    let checkpoints = CheckpointPolicy::new(config)?;
    let mut progress = match resume {
        Some(path) => checkpoints.resume(path, config, stepper)?,
        None => Progress::default(),
    };
    let inputs = LoopInputs {
        config,
        dataset,
        model_config,
        device,
        device_name,
    };
    let from = resume.map(|_| progress.step);
    match run_loop(&inputs, stepper, &mut progress, &mut totals, from, hooks)? {
        LoopEnd::Finished(summary) => Ok(summary.map(|s| *s)),
        LoopEnd::Regroup => Err(RunError::Parallel(
            "the loop stopped to regroup without an elastic driver".into(),
        )),
    }
}

/// The loop from `progress` on (updated as steps finish, so a driver that catches an error
/// knows where training stood). `metrics_from`: the step whose metrics lines to keep when
/// reopening `metrics.jsonl` (a resume or a new leader), none to start it afresh.
pub fn run_loop(
    inputs: &LoopInputs<'_>,
    stepper: &mut dyn Stepper,
    progress: &mut Progress,
    totals: &mut RunTotals,
    metrics_from: Option<u64>,
    hooks: &mut dyn LoopHooks,
) -> Result<LoopEnd, RunError> {
    let LoopInputs {
        config,
        dataset,
        model_config,
        device,
        device_name,
    } = *inputs;
    let leader = stepper.is_leader();
    let train_set = TrainSet::new(dataset, model_config.max_len, config.data.windows)?;
    if train_set.is_empty() {
        return Err(RunError::NoTrainingData);
    }
    let valid = EvalSet::new(dataset, model_config.max_len, EvalSplit::Valid);
    let test = EvalSet::new(dataset, model_config.max_len, EvalSplit::Test);
    let run_dir = config.run_dir();
    let best_model = run_dir.join("best.safetensors");
    // What serving needs beside the weights: the model config, the item id map, and the
    // users' histories (the sidecar `best.users.tsv`).
    let serving_meta = CheckpointMeta::new(config.model.preset.clone(), model_config, dataset);
    let users = UserHistories::from_dataset(dataset);
    let checkpoints = CheckpointPolicy::new(config)?;
    let early_stop = EarlyStopping {
        patience: config.train.patience,
    };
    let mut metrics = MetricsWriter::open(&run_dir, metrics_from, leader)?;
    if leader {
        let copy = run_dir.join("config.toml");
        std::fs::write(&copy, checkpoints.config_text()).map_err(|e| RunError::io(&copy, e))?;
    }
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
            params = model_config.num_params(),
            "training {} on {}",
            config.model.preset,
            dataset.name
        );
    }

    let mut stopped_at_max = false;
    let first_epoch = progress.epoch;
    for epoch in first_epoch..t.epochs {
        let skip = if epoch == first_epoch {
            progress.batch_in_epoch
        } else {
            0
        };
        if skip == 0 {
            start_epoch(progress, epoch);
        }
        let mut bar = EpochProgress::new(epoch + 1, batches_per_epoch, skip, leader);
        let mut epoch_stats = StatsSum::default();
        let mut end = EpochEnd::Completed;
        for (index, batch) in train_set
            .epoch(t.seed, epoch, t.batch_size)
            .enumerate()
            .skip(skip as usize)
        {
            let step = progress.step;
            if hooks.regroup_before(step) {
                return Ok(LoopEnd::Regroup);
            }
            hooks.phase(Phase::Step, step);
            let lr = schedule.at(step);
            let step_start = Instant::now();
            // One rank measures the process (its ranks share the heap).
            let heap_start = leader.then(heap::reset_peak).flatten();
            let moved_before = Transferred::now();
            let out = stepper.step(&batch, step, lr as f32)?;
            let moved = Transferred::now().since(moved_before);
            let heap_step = heap::peak()
                .zip(heap_start)
                .map(|(p, s)| p.saturating_sub(s));
            totals.heap_step_peak = totals.heap_step_peak.max(heap_step);
            let seconds = step_start.elapsed().as_secs_f64();
            epoch_stats.add(&out.parallel);
            totals.stats.add(&out.parallel);
            peak_memory(&mut totals.memory_peak, &out.memory);
            if out.skipped {
                tracing::warn!(step, "non-finite gradient: optimizer step skipped");
            }
            record_step(
                progress,
                &out,
                batch.batch_size as u64,
                seconds,
                index as u64,
            );
            metrics.write(&MetricsLine::Step(StepRecord {
                step: progress.step,
                epoch: epoch + 1,
                loss: out.loss_sum / out.loss_targets.max(1) as f64,
                lr,
                samples_per_s: batch.batch_size as f64 / seconds.max(1e-9),
                tokens_per_s: out.targets as f64 / seconds.max(1e-9),
                skipped: out.skipped,
                parallel: out.parallel,
                migration: out.migration.clone(),
                memory: out.memory.clone(),
                heap_step_peak_bytes: heap_step,
                host_transfer_bytes: moved.total(),
            }))?;
            bar.step(
                progress.step,
                progress.epoch_loss_sum / progress.epoch_loss_targets.max(1) as f64,
                progress.epoch_samples as f64 / progress.epoch_seconds.max(1e-9),
            );
            if t.max_steps > 0 && progress.step >= t.max_steps {
                save(&checkpoints, stepper, progress, hooks)?;
                end = EpochEnd::MaxSteps;
                break;
            }
            if checkpoints.due_mid_epoch(progress, batches_per_epoch) {
                save(&checkpoints, stepper, progress, hooks)?;
            }
        }
        bar.finish();
        if let EpochEnd::MaxSteps = end {
            stopped_at_max = true;
            if leader {
                tracing::info!(
                    step = progress.step,
                    "train.max_steps reached: checkpoint saved, stopping"
                );
            }
            break;
        }
        let done = progress.clone();
        progress.epoch = epoch + 1;
        progress.batch_in_epoch = 0;
        let evaluate_now = (epoch + 1) % config.eval.every == 0 || epoch + 1 == t.epochs;
        let mut stop = false;
        if evaluate_now {
            hooks.phase(Phase::Eval, progress.step);
            let model = stepper.full_model()?;
            if leader {
                let valid_report =
                    evaluate(&model, &valid, config.eval.batch_size, device).report();
                let record = EpochRecord {
                    epoch: epoch + 1,
                    step: progress.step,
                    loss: done.epoch_loss_sum / done.epoch_loss_targets.max(1) as f64,
                    lr: schedule.at(progress.step.saturating_sub(1)),
                    samples_per_s: done.epoch_samples as f64 / done.epoch_seconds.max(1e-9),
                    tokens_per_s: done.epoch_targets as f64 / done.epoch_seconds.max(1e-9),
                    skipped_steps: done.epoch_skipped,
                    valid: valid_report.clone(),
                    parallel: epoch_stats.mean(),
                };
                metrics.write(&MetricsLine::Epoch(record.clone()))?;
                tracing::info!(
                    epoch = epoch + 1,
                    loss = format!("{:.4}", record.loss),
                    samples_per_s = format!("{:.0}", record.samples_per_s),
                    ndcg10 = format!(
                        "{:.4}",
                        valid_report.get(METRIC).copied().unwrap_or(f64::NAN)
                    ),
                    "epoch done"
                );
                match early_stop.observe(progress, epoch + 1, &valid_report) {
                    Verdict::Improved => {
                        save_checkpoint(&model, &best_model, &serving_meta, Some(&users))?
                    }
                    Verdict::NoBetter => {}
                    Verdict::Stop => {
                        tracing::info!(
                            best_epoch = progress.best_epoch,
                            "early stop: no better valid NDCG@10 for {} evaluations",
                            early_stop.patience
                        );
                        stop = true;
                    }
                }
            }
        }
        // The training state at the epoch's end, early stopping included.
        save(&checkpoints, stepper, progress, hooks)?;
        if evaluate_now && stepper.leader_decides_stop(stop, progress)? {
            break;
        }
    }
    hooks.phase(Phase::Eval, progress.step);
    let mut model = stepper.full_model()?;
    if !leader {
        return Ok(LoopEnd::Finished(None));
    }
    if best_model.is_file() {
        load_checkpoint(&mut model, &best_model)?;
    } else if !stopped_at_max {
        return Err(RunError::Checkpoint {
            path: best_model,
            message: "no best model was saved (no evaluation ran)".into(),
        });
    }
    let test_report = evaluate(&model, &test, config.eval.batch_size, device).report();
    let cold = dataset.cold_items();
    let cold_test = test.filtered(|target| cold[target as usize]);
    let test_cold = evaluate(&model, &cold_test, config.eval.batch_size, device).report();
    let summary = Summary {
        name: config.output.name.clone(),
        dataset: dataset.name.clone(),
        preset: config.model.preset.clone(),
        device: device_name.to_string(),
        params: model_config.num_params(),
        shape: model_config.shape(&config.model.preset),
        epochs_run: progress.epoch,
        best_epoch: progress.best_epoch,
        samples_per_s: progress.samples as f64 / progress.train_seconds.max(1e-9),
        tokens_per_s: progress.tokens as f64 / progress.train_seconds.max(1e-9),
        peak_rss_bytes: peak_rss_bytes(),
        wall_seconds: totals.start.elapsed().as_secs_f64(),
        skipped_steps: progress.skipped_steps,
        valid: progress.best_valid.clone(),
        test: test_report,
        test_cold,
        test_cold_users: cold_test.len(),
        checkpoint: best_model,
        parallel: totals.stats.mean(),
        memory_peak: totals.memory_peak.clone(),
        heap_step_peak_bytes: totals.heap_step_peak,
        membership: Vec::new(),
    };
    write_summary(&run_dir, &summary)?;
    Ok(LoopEnd::Finished(Some(Box::new(summary))))
}
