//! `meshrec profile`: the per-layer cost profile of the run's model measured on the real
//! backend (forward and backward seconds of the embedding, each block and the head), in
//! the format the balance crate's partitioner, rebalancer and simulator read.
//!
//! How the three kinds are told apart: the model is rebuilt with two extra blocks and run
//! on one rank as one chunk per block (an interleaved schedule on one pipeline rank), so
//! every middle chunk is a bare block; the first chunk's excess over a block is the
//! embedding and the last chunk's the head. Times are medians over the repeats; the bytes
//! come from the model's shape formulas (the same ones the simulator uses).

use burn::tensor::Device;
use meshrec_balance::{CostProfile, LayerCost, LayerKind};
use meshrec_comm::LocalCluster;
use meshrec_model::data::TrainSet;
use meshrec_parallel::exec::{micro_batches, run_schedule, NoHooks};
use meshrec_parallel::layout::Layout;
use meshrec_parallel::mesh::{Groups, Mesh};
use meshrec_parallel::rank::{build_segments, initial_state};
use meshrec_pipeline::schedule::{Schedule, ScheduleKind};
use meshrec_pipeline::timeline::{EventKind, Recorder};

use crate::config::RunConfig;
use crate::error::RunError;
use crate::setup::{dataset_model_config, load_dataset, side_inputs};

/// Forward and backward seconds of one chunk, one entry per timed repeat.
type Samples = (Vec<f64>, Vec<f64>);

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// Measures the profile of `config`'s model for micro-batches of `micro_batch` sequences
/// (`warmup` untimed repeats, then `repeats` timed ones). With `copies > 1` that many
/// copies run at once and their times are averaged: the cost of a layer on a rank that
/// shares the machine with `copies - 1` busy others (how mesh ranks run on one host).
pub fn measure_profile(
    config: &RunConfig,
    device: &Device,
    micro_batch: usize,
    warmup: usize,
    repeats: usize,
    copies: usize,
) -> Result<CostProfile, RunError> {
    let dataset = load_dataset(config)?;
    let model_config = dataset_model_config(config, &dataset)?;
    let side = side_inputs(config, &dataset, &model_config, device)?;
    let n = model_config.n_layers;
    let mut probe = model_config.clone();
    probe.n_layers = n + 2;
    let train_set = TrainSet::new(&dataset, probe.max_len, config.data.windows)?;
    let batch = train_set
        .epoch(config.train.seed, 0, micro_batch)
        .find(|b| b.batch_size == micro_batch)
        .ok_or(RunError::NoTrainingData)?;
    let chunks = n + 2;
    let layout =
        Layout::uniform(Mesh::new(1, 1, 1).map_err(parallel)?, chunks, chunks).map_err(parallel)?;
    let schedule = Schedule::new(ScheduleKind::Interleaved, 1, 1, chunks).map_err(parallel)?;
    let (_, initial) = initial_state(&probe, &side, config.train.seed, device);
    let one_copy = || -> Result<Vec<(f64, f64)>, RunError> {
        let times = LocalCluster::run(1, |comm| -> Result<Vec<Samples>, RunError> {
            let groups = Groups::new(Box::new(comm), layout.mesh).map_err(parallel)?;
            let mut segments = build_segments(&probe, &side, &layout, &groups, &initial, device)
                .map_err(parallel)?;
            let micro = micro_batches(&batch, 1);
            let mut per_chunk = vec![(Vec::new(), Vec::new()); chunks];
            for i in 0..warmup + repeats {
                for s in &mut segments {
                    s.zero_grads();
                }
                let mut recorder = Recorder::new();
                run_schedule(
                    &mut segments,
                    &layout,
                    &schedule,
                    &groups,
                    &micro,
                    1.0 / batch.num_targets().max(1) as f32,
                    &mut recorder,
                    &mut NoHooks,
                )
                .map_err(parallel)?;
                if i < warmup {
                    continue;
                }
                let mut fwd = vec![0.0; chunks];
                let mut bwd = vec![0.0; chunks];
                for e in recorder.events() {
                    let (Some(c), d) = (e.chunk, e.end_s - e.start_s) else {
                        continue;
                    };
                    match e.kind {
                        EventKind::Forward => fwd[c] += d,
                        EventKind::Backward => bwd[c] += d,
                        _ => {}
                    }
                }
                for c in 0..chunks {
                    per_chunk[c].0.push(fwd[c]);
                    per_chunk[c].1.push(bwd[c]);
                }
            }
            Ok(per_chunk)
        })
        .map_err(|e| RunError::Parallel(e.to_string()))?
        .pop()
        .ok_or_else(|| RunError::Parallel("the profiling rank returned nothing".into()))??;
        Ok(times
            .into_iter()
            .map(|(f, b)| (median(f), median(b)))
            .collect())
    };
    let runs: Vec<Result<Vec<(f64, f64)>, RunError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..copies.max(1)).map(|_| scope.spawn(one_copy)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(RunError::Parallel("a profiling thread panicked".into()))
                })
            })
            .collect()
    });
    let mut med = vec![(0.0, 0.0); chunks];
    let runs: Vec<Vec<(f64, f64)>> = runs.into_iter().collect::<Result<_, _>>()?;
    for run in &runs {
        for (m, t) in med.iter_mut().zip(run) {
            m.0 += t.0 / runs.len() as f64;
            m.1 += t.1 / runs.len() as f64;
        }
    }
    let block = (
        median(med[1..=n].iter().map(|t| t.0).collect()),
        median(med[1..=n].iter().map(|t| t.1).collect()),
    );
    let excess = |t: (f64, f64)| ((t.0 - block.0).max(0.0), (t.1 - block.1).max(0.0));
    let shape = model_config.shape(&config.model.preset);
    let tokens = (micro_batch as u64 * shape.seq_len) as f64;
    let state_per_param = shape.precision.state_bytes_per_param();
    let layer = |index: usize, kind: LayerKind, (fwd_s, bwd_s): (f64, f64)| {
        let params = shape.layer_params(index).unwrap_or(0);
        LayerCost::measured(
            kind,
            fwd_s,
            bwd_s,
            params * u64::from(shape.precision.param_bytes),
            params * state_per_param,
            (shape
                .layer_activation_bytes_per_token(index, 1)
                .unwrap_or(0.0)
                * tokens) as u64,
            (shape.boundary_bytes_per_token() * tokens) as u64,
        )
    };
    let mut layers = vec![layer(0, LayerKind::Embedding, excess(med[0]))];
    for b in 0..n {
        layers.push(layer(b + 1, LayerKind::Block(b as u32), block));
    }
    layers.push(layer(n + 1, LayerKind::Head, excess(med[n + 1])));
    CostProfile::measured(micro_batch as u64, layers).map_err(|e| RunError::Parallel(e.to_string()))
}

fn parallel(e: impl std::fmt::Display) -> RunError {
    RunError::Parallel(e.to_string())
}

/// The profile as a table, one line per layer.
pub fn render(profile: &CostProfile) -> String {
    let mut out = format!(
        "MEASURED per-layer costs, micro-batch {} sequences (bytes from the shape formulas)\n| layer | fwd ms | bwd ms | params MB | state MB | activations MB |\n|---|---|---|---|---|---|\n",
        profile.micro_batch
    );
    for l in &profile.layers {
        out.push_str(&format!(
            "| {:?} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            l.kind,
            l.fwd_s * 1e3,
            l.bwd_s * 1e3,
            l.param_bytes as f64 / 1e6,
            l.state_bytes as f64 / 1e6,
            l.act_bytes as f64 / 1e6
        ));
    }
    out
}
