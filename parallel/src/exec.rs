//! Runs one training step of a layout on one rank: the pipeline schedule's forwards and
//! backwards over this rank's segments with tagged point-to-point messages between stages,
//! then the gradient reductions the layout needs inside the model-parallel group (partial
//! TP gradients, the tied item table between the first and last stage), and the global
//! gradient norm. What the caller adds to a step — DDP's data-parallel reduction fed as
//! backward releases gradients, fault injection, measurements — comes in through
//! [`StepHooks`].

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use meshrec_comm::{Communicator, ReduceOp, Request};
use meshrec_model::data::Batch;
use meshrec_pipeline::timeline::{EventKind, Recorder};
use meshrec_pipeline::{Action, Schedule};

use crate::error::ParallelError;
use crate::layout::Layout;
use crate::mesh::Groups;
use crate::segment::{ForwardInput, ForwardOutput, Segment};

/// Which way a message travels.
#[derive(Clone, Copy)]
enum Direction {
    Activation = 0,
    Gradient = 1,
}

/// Tag of the message into model chunk `k` (activations) or out of it backwards
/// (gradients) for micro-batch `mb`.
fn tag(direction: Direction, mb: usize, k: usize) -> u32 {
    ((mb as u32) << 10) | ((k as u32 & 0x1ff) << 1) | direction as u32
}

/// The loss of one step as seen by this rank's pipeline (summed over micro-batches; the
/// same on every rank of the pipeline after the step).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepLoss {
    pub loss_sum: f64,
    pub targets: usize,
}

/// Splits a batch into `m` micro-batches of contiguous rows (sizes differ by at most one).
pub fn micro_batches(batch: &Batch, m: usize) -> Vec<Batch> {
    (0..m)
        .map(|i| {
            let r = meshrec_comm::chunk_range(batch.batch_size, m, i);
            batch.rows(r.start, r.end)
        })
        .filter(|b| b.batch_size > 0)
        .collect()
}

/// What a caller adds to the executor's step. Every method has a do-nothing default.
pub trait StepHooks {
    /// Whether parameter gradients go to [`StepHooks::grad_ready`] as backward finalises
    /// them (DDP's overlap of the data-parallel reduction with the rest of backward).
    fn releases_grads(&self) -> bool {
        false
    }

    /// A parameter gradient is final for the step: (local chunk, parameter index, this
    /// rank's shape of the parameter, gradient). Called during each chunk's last backward,
    /// only when [`StepHooks::releases_grads`].
    fn grad_ready(
        &mut self,
        chunk: usize,
        param: usize,
        shape: &[usize],
        grad: &[f32],
    ) -> Result<(), ParallelError> {
        let _ = (chunk, param, shape, grad);
        Ok(())
    }

    /// A forward or backward has just computed for `elapsed`; what the hook does here still
    /// counts inside the action's timeline event.
    fn computed(&mut self, action: Action, elapsed: Duration) {
        let _ = (action, elapsed);
    }
}

/// A step with nothing added.
pub struct NoHooks;

impl StepHooks for NoHooks {}

/// Messages this rank sends to itself (two chunks of one device, interleaved schedules with
/// one pipeline rank) skip the communicator.
#[derive(Default)]
struct Mailbox(HashMap<u32, Vec<f32>>);

/// Executes `schedule` for this rank's `segments` (its local chunks, in local order) on
/// `micro` micro-batches; parameter gradients accumulate in the segments (scaled by
/// `grad_scale`, typically `1 / targets of the global batch`). Records every forward,
/// backward, send and receive in `timeline`; `hooks` sees every computed action and, if it
/// asks, every parameter gradient the moment it is final.
#[allow(clippy::too_many_arguments)]
pub fn run_schedule(
    segments: &mut [Segment],
    layout: &Layout,
    schedule: &Schedule,
    groups: &Groups,
    micro: &[Batch],
    grad_scale: f32,
    timeline: &mut Recorder,
    hooks: &mut dyn StepHooks,
) -> Result<StepLoss, ParallelError> {
    let pp_rank = groups.coord.pp;
    let d_model = segment_width(segments)?;
    let actions = schedule
        .per_device
        .get(pp_rank)
        .ok_or_else(|| ParallelError::Step(format!("the schedule has no stage {pp_rank}")))?;
    if micro.len() != schedule.micro_batches {
        return Err(ParallelError::Step(format!(
            "{} micro-batches given, the schedule expects {}",
            micro.len(),
            schedule.micro_batches
        )));
    }
    let tp = groups.tp.as_ref();
    let pp = groups.pp.as_ref();
    let mut mailbox = Mailbox::default();
    let mut sends: Vec<Request<()>> = Vec::new();
    let mut loss = StepLoss::default();
    // The position of each local chunk's last backward in this stage's list.
    let mut last_backward = vec![usize::MAX; segments.len()];
    for (i, a) in actions.iter().enumerate() {
        if let Action::Backward { chunk, .. } = *a {
            if let Some(slot) = last_backward.get_mut(chunk) {
                *slot = i;
            }
        }
    }
    for (position, action) in actions.iter().enumerate() {
        match *action {
            Action::Forward {
                micro_batch: mb,
                chunk,
            } => {
                let k = layout.model_chunk(pp_rank, chunk);
                let batch = &micro[mb];
                let input = if layout.is_first_chunk(k) {
                    ForwardInput::Ids(batch)
                } else {
                    let len = batch.batch_size * layout.local_seq_len(batch.seq_len) * d_model;
                    let src = layout.device_of_chunk(k - 1);
                    let values = receive(
                        pp,
                        &mut mailbox,
                        pp_rank,
                        src,
                        tag(Direction::Activation, mb, k),
                        len,
                        timeline,
                        mb,
                        chunk,
                    )?;
                    ForwardInput::Activations(values)
                };
                let segment = segments.get_mut(chunk).ok_or_else(|| {
                    ParallelError::Step(format!("stage {pp_rank} has no local chunk {chunk}"))
                })?;
                let out = timeline.record(EventKind::Forward, Some(mb), Some(chunk), || {
                    let start = Instant::now();
                    let out = segment.forward(mb, batch, input, grad_scale, tp);
                    hooks.computed(*action, start.elapsed());
                    out
                })?;
                match out {
                    ForwardOutput::Activations(values) => {
                        let dst = layout.device_of_chunk(k + 1);
                        send(
                            pp,
                            &mut mailbox,
                            &mut sends,
                            pp_rank,
                            dst,
                            tag(Direction::Activation, mb, k + 1),
                            values,
                            timeline,
                            mb,
                            chunk,
                        )?;
                    }
                    ForwardOutput::Loss { loss_sum, targets } => {
                        loss.loss_sum += loss_sum;
                        loss.targets += targets;
                    }
                }
            }
            Action::Backward {
                micro_batch: mb,
                chunk,
            } => {
                let k = layout.model_chunk(pp_rank, chunk);
                let batch = &micro[mb];
                let grad = if layout.is_last_chunk(k) {
                    None
                } else {
                    let len = batch.batch_size * layout.local_seq_len(batch.seq_len) * d_model;
                    let src = layout.device_of_chunk(k + 1);
                    Some(receive(
                        pp,
                        &mut mailbox,
                        pp_rank,
                        src,
                        tag(Direction::Gradient, mb, k),
                        len,
                        timeline,
                        mb,
                        chunk,
                    )?)
                };
                let segment = segments.get_mut(chunk).ok_or_else(|| {
                    ParallelError::Step(format!("stage {pp_rank} has no local chunk {chunk}"))
                })?;
                let releasing = last_backward[chunk] == position && hooks.releases_grads();
                let dx = timeline.record(EventKind::Backward, Some(mb), Some(chunk), || {
                    let start = Instant::now();
                    let dx = if releasing {
                        let mut per_param = |p: usize, shape: &[usize], g: &[f32]| {
                            hooks.grad_ready(chunk, p, shape, g)
                        };
                        segment.backward_releasing(mb, grad, tp, Some(&mut per_param))
                    } else {
                        segment.backward(mb, grad, tp)
                    };
                    hooks.computed(*action, start.elapsed());
                    dx
                })?;
                if let Some(dx) = dx {
                    let dst = layout.device_of_chunk(k - 1);
                    send(
                        pp,
                        &mut mailbox,
                        &mut sends,
                        pp_rank,
                        dst,
                        tag(Direction::Gradient, mb, k - 1),
                        dx,
                        timeline,
                        mb,
                        chunk,
                    )?;
                }
            }
        }
    }
    for request in sends {
        request.wait()?;
    }
    // The loss lives on the last stage; every stage reports it.
    if layout.mesh.pp > 1 {
        let mut both = [loss.loss_sum as f32, loss.targets as f32];
        pp.all_reduce(&mut both, ReduceOp::Sum)?;
        loss = StepLoss {
            loss_sum: f64::from(both[0]),
            targets: both[1].round() as usize,
        };
    }
    Ok(loss)
}

fn segment_width(segments: &[Segment]) -> Result<usize, ParallelError> {
    segments
        .first()
        .map(|s| s.d_model())
        .ok_or_else(|| ParallelError::Step("this rank holds no model chunk".into()))
}

#[allow(clippy::too_many_arguments)]
fn receive(
    pp: &dyn Communicator,
    mailbox: &mut Mailbox,
    me: usize,
    src: usize,
    tag: u32,
    len: usize,
    timeline: &mut Recorder,
    mb: usize,
    chunk: usize,
) -> Result<Vec<f32>, ParallelError> {
    if src == me {
        return mailbox.0.remove(&tag).ok_or_else(|| {
            ParallelError::Step(format!(
                "stage {me}: message {tag} to itself was never sent"
            ))
        });
    }
    timeline
        .record(EventKind::Recv, Some(mb), Some(chunk), || {
            let mut buf = vec![0.0f32; len];
            pp.recv(src, tag, &mut buf)?;
            Ok::<_, meshrec_comm::CommError>(buf)
        })
        .map_err(ParallelError::from)
}

#[allow(clippy::too_many_arguments)]
fn send(
    pp: &dyn Communicator,
    mailbox: &mut Mailbox,
    sends: &mut Vec<Request<()>>,
    me: usize,
    dst: usize,
    tag: u32,
    values: Vec<f32>,
    timeline: &mut Recorder,
    mb: usize,
    chunk: usize,
) -> Result<(), ParallelError> {
    if dst == me {
        mailbox.0.insert(tag, values);
        return Ok(());
    }
    let request = timeline.record(EventKind::Send, Some(mb), Some(chunk), || {
        pp.isend(dst, tag, values)
    })?;
    sends.push(request);
    Ok(())
}

/// Completes the gradients inside the model-parallel group: sums the partial gradients of
/// replicated parameters over TP, and the tied item table between the first and the last
/// pipeline stage. After it every rank holds exactly the gradient of its slice.
pub fn reduce_model_parallel_grads(
    segments: &mut [Segment],
    groups: &Groups,
) -> Result<(), ParallelError> {
    if groups.mesh.tp > 1 {
        let mut fused = Vec::new();
        for s in segments.iter() {
            for (spec, g) in s.specs.iter().zip(&s.grads) {
                if spec.tp_partial_grad {
                    fused.extend_from_slice(g);
                }
            }
        }
        if !fused.is_empty() {
            groups.tp.all_reduce(&mut fused, ReduceOp::Sum)?;
            let mut at = 0;
            for s in segments.iter_mut() {
                for (spec, g) in s.specs.iter().zip(s.grads.iter_mut()) {
                    if spec.tp_partial_grad {
                        let n = g.len();
                        g.copy_from_slice(&fused[at..at + n]);
                        at += n;
                    }
                }
            }
        }
    }
    // The item table and the fusion are held by the first and the last stage; the tied
    // parameters by full path, (chunk, parameter) of each holder on this rank.
    let mut tied: BTreeMap<&str, Vec<(usize, usize)>> = BTreeMap::new();
    for (c, s) in segments.iter().enumerate() {
        for (i, spec) in s.specs.iter().enumerate() {
            if spec.is_tied() {
                tied.entry(spec.full_path.as_str())
                    .or_default()
                    .push((c, i));
            }
        }
    }
    let tied: Vec<Vec<(usize, usize)>> = tied.into_values().collect();
    match &groups.embed {
        // Interleaving on one pipeline rank puts the originals and their copies in one
        // process.
        None => {
            for holders in tied.iter().filter(|h| h.len() == 2) {
                let (a, b) = (holders[0], holders[1]);
                let sum: Vec<f32> = segments[a.0].grads[a.1]
                    .iter()
                    .zip(&segments[b.0].grads[b.1])
                    .map(|(x, y)| x + y)
                    .collect();
                segments[a.0].grads[a.1].copy_from_slice(&sum);
                segments[b.0].grads[b.1].copy_from_slice(&sum);
            }
        }
        // The first stage's and the last stage's copies: one of each per rank, fused in
        // full-path order (the same on both sides) into one all-reduce.
        Some(embed) => {
            let mut fused = Vec::new();
            for &(c, i) in tied.iter().flatten() {
                fused.extend_from_slice(&segments[c].grads[i]);
            }
            if !fused.is_empty() {
                embed.all_reduce(&mut fused, ReduceOp::Sum)?;
                let mut at = 0;
                for &(c, i) in tied.iter().flatten() {
                    let g = &mut segments[c].grads[i];
                    let n = g.len();
                    g.copy_from_slice(&fused[at..at + n]);
                    at += n;
                }
            }
        }
    }
    Ok(())
}

/// The L2 norm of the full model's gradient, each element counted once (replicas on TP rank
/// 0, tied copies never), agreed over the TP and PP groups.
pub fn global_grad_norm(segments: &[Segment], groups: &Groups) -> Result<f64, ParallelError> {
    let mut sum = 0.0f64;
    for s in segments {
        for (spec, g) in s.specs.iter().zip(&s.grads) {
            if spec.counts_in_norm(groups.coord) {
                sum += g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
            }
        }
    }
    // The collectives are f32: ample for a clipping threshold.
    let mut parts = [sum as f32];
    if groups.mesh.tp > 1 {
        groups.tp.all_reduce(&mut parts, ReduceOp::Sum)?;
    }
    if groups.mesh.pp > 1 {
        groups.pp.all_reduce(&mut parts, ReduceOp::Sum)?;
    }
    Ok(f64::from(parts[0]).sqrt())
}
