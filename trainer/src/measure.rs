//! Steady-state step measurements (no evaluation, no files): any layout's steps (the
//! figures of `cargo xtask bench strategies` and of the simulator's validation), and the
//! single-device step split into forward/backward and optimizer (`meshrec bench`). Every
//! number here is measured on this machine.

use std::time::Instant;

use burn::tensor::Device;
use meshrec_comm::LocalCluster;
use meshrec_model::data::{Batch, TrainSet};
use serde::Serialize;

use meshrec_model::device::Residency;
use meshrec_model::device_optim::DeviceAdamW;
use meshrec_model::dropout::seed_step;
use meshrec_model::optim::{AdamW, AdamWConfig};
use meshrec_model::params::{param_paths, read_values, write_values};
use meshrec_model::step::{forward_backward_on_device, forward_backward_placed};
use meshrec_model::transfer::Transferred;

use crate::config::RunConfig;
use crate::error::RunError;
use crate::hybrid::launch::{in_rank_pool, leader_result};
use crate::hybrid::rank::MeshRank;
use crate::setup::{build_model, dataset_model_config, dropout_seed, load_dataset, side_inputs};
use crate::single::SingleDevice;
use crate::stepper::{ParallelStepStats, StepResult, Stepper};

/// Measured steps of one layout.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub steps: usize,
    /// Median wall time of a step (on the leader, which waits for the slowest rank when the
    /// step ends with a collective over all ranks).
    pub step_s: f64,
    pub samples_per_s: f64,
    pub tokens_per_s: f64,
    /// Means per step over the measured steps (on a mesh).
    pub parallel: Option<ParallelStepStats>,
    /// Mean loss of the first and last measured step (a sanity check that it trains).
    pub loss_first: f64,
    pub loss_last: f64,
    /// Mean bytes a measured step copied between host and device (the leader's, counted).
    pub host_transfer_bytes_per_step: f64,
}

/// The first `n` full batches of the run's data order (epochs repeat as needed).
fn full_batches(config: &RunConfig, train_set: &TrainSet, n: usize) -> Vec<Batch> {
    (0..)
        .flat_map(|e| {
            train_set
                .epoch(config.train.seed, e, config.train.batch_size)
                .collect::<Vec<_>>()
        })
        .filter(|b| b.batch_size == config.train.batch_size)
        .take(n)
        .collect()
}

fn run_steps(
    stepper: &mut dyn Stepper,
    batches: &[Batch],
    warmup: usize,
    lr: f32,
) -> Result<Option<Measured>, RunError> {
    let mut times = Vec::new();
    let (mut samples, mut tokens) = (0u64, 0u64);
    let (mut sum, mut n) = (None::<ParallelStepStats>, 0u64);
    let mut losses = Vec::new();
    let mut moved = 0u64;
    for (i, batch) in batches.iter().enumerate() {
        let t0 = Instant::now();
        let before = Transferred::now();
        let out: StepResult = stepper.step(batch, i as u64, lr)?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= warmup {
            moved += Transferred::now().since(before).total();
            times.push(dt);
            samples += batch.batch_size as u64;
            tokens += out.targets as u64;
            losses.push(out.loss_sum / out.loss_targets.max(1) as f64);
            if let Some(p) = &out.parallel {
                sum.get_or_insert_with(Default::default).add(p);
                n += 1;
            }
        }
    }
    if !stepper.is_leader() || times.is_empty() {
        return Ok(None);
    }
    let total: f64 = times.iter().sum();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Some(Measured {
        steps: times.len(),
        step_s: sorted[sorted.len() / 2],
        samples_per_s: samples as f64 / total,
        tokens_per_s: tokens as f64 / total,
        parallel: sum.map(|s| ParallelStepStats::mean_of(&s, n)),
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
        host_transfer_bytes_per_step: moved as f64 / times.len() as f64,
    }))
}

/// Runs `warmup + steps` training steps of the config's layout (one device, or the mesh
/// as threads on the local engine) and measures the last `steps`.
pub fn measure_layout(
    config: &RunConfig,
    device: &Device,
    warmup: usize,
    steps: usize,
) -> Result<Measured, RunError> {
    let dataset = load_dataset(config)?;
    let model_config = dataset_model_config(config, &dataset)?;
    let train_set = TrainSet::new(&dataset, model_config.max_len, config.data.windows)?;
    let batches = full_batches(config, &train_set, warmup + steps);
    if batches.len() < warmup + steps {
        return Err(RunError::NoTrainingData);
    }
    let lr = config.train.lr as f32;
    if !config.uses_mesh_executor() {
        let (_, model) = build_model(config, &dataset, device)?;
        let mut single = SingleDevice::new(model, config, device)?;
        run_steps(&mut single, &batches, warmup, lr)?
            .ok_or_else(|| RunError::Parallel("the single device measured nothing".into()))
    } else {
        let side = side_inputs(config, &dataset, &model_config, device)?;
        let results = LocalCluster::run(config.parallel.world_size(), |comm| {
            in_rank_pool(config, || {
                let mut rank = MeshRank::new(
                    Box::new(comm),
                    config,
                    &model_config,
                    side.clone(),
                    device,
                    true,
                )?;
                run_steps(&mut rank, &batches, warmup, lr)
            })
        })
        .map_err(|e| RunError::Parallel(e.to_string()))?;
        leader_result(results)
    }
}

/// Throughput of training steps alone (no evaluation), after `warmup` steps: the figure of
/// `cargo xtask bench train`. The loss and AdamW run where `train.residency` places them
/// (host buffers on Flex, the device on a GPU backend, whose queue is drained at each phase
/// boundary so the split is honest). Returns samples and seconds per phase.
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
    let residency = config.train.residency(device)?;
    enum Optimizer {
        Host(AdamW, Vec<Vec<f32>>),
        Device(DeviceAdamW),
    }
    let adamw = AdamWConfig::default();
    let mut optimizer = match residency {
        Residency::Host => Optimizer::Host(
            AdamW::new(adamw, infos.iter().map(|p| p.numel())),
            read_values(&model),
        ),
        Residency::Device => Optimizer::Device(DeviceAdamW::new(adamw, &infos, device)),
    };
    let batches = full_batches(config, &train_set, warmup + steps);
    let mut th = Throughput {
        residency: format!("{residency:?}").to_lowercase(),
        ..Throughput::default()
    };
    let sync = |device: &Device| {
        device
            .sync()
            .map_err(|e| RunError::Parallel(format!("device: {e:?}")))
    };
    for (i, batch) in batches.iter().enumerate() {
        let measured = i >= warmup;
        let scale = 1.0 / batch.num_targets().max(1) as f32;
        let seed = dropout_seed(config.train.seed, i as u64);
        seed_step(residency, device, seed);
        let before = Transferred::now();
        let t0 = Instant::now();
        let (t1, targets) = match &mut optimizer {
            Optimizer::Host(optimizer, values) => {
                let out = forward_backward_placed(&model, batch, scale, residency, device);
                let t1 = Instant::now();
                optimizer.update(values, &out.grads, 1e-3, &decay);
                model = write_values(model, values, device);
                (t1, out.targets)
            }
            Optimizer::Device(optimizer) => {
                let out = forward_backward_on_device(&model, batch, scale, residency, device);
                sync(device)?;
                let t1 = Instant::now();
                model = optimizer.update(model, out.grads, 1e-3, 1.0, &decay);
                sync(device)?;
                (t1, out.targets)
            }
        };
        let t2 = Instant::now();
        if measured {
            th.forward_backward_s += (t1 - t0).as_secs_f64();
            th.optimizer_s += (t2 - t1).as_secs_f64();
            th.samples += batch.batch_size as u64;
            th.tokens += targets as u64;
            th.host_transfer_bytes += Transferred::now().since(before).total();
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
    /// Bytes the measured steps copied between host and device, all together.
    pub host_transfer_bytes: u64,
    /// Where the loss and AdamW ran (`host` or `device`).
    pub residency: String,
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

/// The machine's measured f32 matrix-product peak: the best of five 1024³ products through
/// `model::kernels::matmul_into` (the `gemm` crate on every rayon thread, what the host loss
/// uses), in GFLOP/s (`2 · 1024³` FLOPs each). The ceiling `fraction_of_peak` is taken of.
pub fn sgemm_peak_gflops() -> f64 {
    use meshrec_model::kernels::{matmul_into, MatRef};
    const N: usize = 1024;
    let a: Vec<f32> = (0..N * N)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let b: Vec<f32> = (0..N * N)
        .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
        .collect();
    let mut c = vec![0.0f32; N * N];
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let t = Instant::now();
        matmul_into(
            &mut c,
            MatRef::row_major(&a, N, N),
            MatRef::row_major(&b, N, N),
            false,
        );
        best = best.min(t.elapsed().as_secs_f64());
    }
    // The product is used, so it is not optimised away.
    std::hint::black_box(&c);
    2.0 * (N * N * N) as f64 / best / 1e9
}

/// FLOPs of one training step per sequence by `balance::shape`'s formulas
/// (`train_flops_per_token` — forward and backward of every block and of the
/// catalogue-wide head — times the sequence positions, padding included: they are
/// computed too).
pub fn train_flops_per_sequence(shape: &meshrec_balance::ModelShape, seq_len: usize) -> f64 {
    shape.train_flops_per_token() * seq_len as f64
}
