//! Data-parallel gradient averaging as DDP does it, on a communication thread: gradients
//! are packed into buckets the moment backward releases them, each full bucket is
//! compressed (any `meshrec-compress` method, with error feedback) and reduced over the DP
//! group while backward goes on. A step's reduction can be waited for at once
//! (synchronous DP) or later (bounded-staleness asynchronous DP, see the trainer).
//!
//! Under ZeRO-2 ([`ZeroStage::Gradients`]) each bucket is laid out shard-major
//! ([`ShardLayout`]) and reduce-scattered instead of all-reduced: every rank gets back only
//! its shard of each gradient, and the full reduced gradient never exists anywhere.
//!
//! The thread owns a communicator of its own (split from the DP group), so the step's
//! other collectives never interleave with its messages. Where the engine cannot take
//! calls from two threads at once, the same worker runs inline at each bucket boundary.

use std::collections::VecDeque;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use meshrec_comm::{Communicator, ReduceOp};
use meshrec_compress::{Compressor, MemoryBank, MemoryOptions, MethodConfig, Payload};
use meshrec_pipeline::ZeroStage;

use crate::error::ParallelError;
use crate::exec::StepHooks;
use crate::segment::Segment;
use crate::zero::ShardLayout;

/// How a DP group reduces gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct DpSettings {
    /// Bucket size (DDP's `bucket_cap_mb`); a gradient is never split across buckets.
    pub bucket_bytes: usize,
    /// Identity reduces dense f32 sums; anything else goes through the compressor.
    pub method: MethodConfig,
    /// The compressor's per-bucket state: error feedback, DGC's momentum correction,
    /// local clipping and sparsity warm-up, and the run seed mixed into shared seeds.
    pub memory: MemoryOptions,
    /// Reduce on a thread of its own (overlapping backward) rather than inline.
    pub threaded: bool,
    /// ZeRO-2 reduce-scatters the buckets (dense only); other stages all-reduce them.
    pub zero: ZeroStage,
}

/// Where one gradient sits in a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    chunk: usize,
    param: usize,
    len: usize,
    /// The gradient as a matrix, PyTorch's PowerSGD view: the first dimension by the
    /// rest (a vector is one row).
    matrix: (usize, usize),
}

/// `shape` as `(rows, cols)`: the first dimension by the product of the others; a vector
/// (or a scalar) is a single row.
fn matrix_view(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [rows, rest @ ..] => (*rows, rest.iter().product()),
    }
}

enum Job {
    Bucket {
        step: u64,
        data: Vec<f32>,
        id: u64,
        /// Each gradient of the bucket as a matrix, in order (per-layer PowerSGD).
        layers: Vec<(usize, usize)>,
        /// ZeRO-2: `data` is laid out shard-major and is reduce-scattered.
        scatter: Option<ShardLayout>,
    },
    Snapshot,
    Restore(MemoryBank),
}

struct BucketDone {
    step: u64,
    data: Vec<f32>,
    dense_bytes: u64,
    wire_bytes: u64,
    sent_bytes: u64,
}

enum Reply {
    Bucket(BucketDone),
    Snapshot(Vec<u8>),
}

/// The reducing side: the DP communicator, the compressor and its per-bucket memories.
struct Worker {
    comm: Box<dyn Communicator>,
    compressor: Option<Box<dyn Compressor>>,
    bank: MemoryBank,
    options: MemoryOptions,
    payload: Payload,
}

impl Worker {
    fn run(&mut self, job: Job) -> Result<Reply, ParallelError> {
        match job {
            Job::Snapshot => Ok(Reply::Snapshot(self.bank.to_bytes().map_err(|e| {
                ParallelError::Dp {
                    rank: self.comm.rank(),
                    message: format!("saving compressor memory: {e}"),
                }
            })?)),
            Job::Restore(bank) => {
                self.bank = bank;
                Ok(Reply::Snapshot(Vec::new()))
            }
            Job::Bucket {
                step,
                mut data,
                id,
                layers,
                scatter,
            } => {
                let before = self.comm.stats().total().bytes_sent;
                let rank = self.comm.rank();
                let dense_bytes = 4 * data.len() as u64;
                let wire_bytes = match self.compressor.as_mut() {
                    None if scatter.is_some() => {
                        let block = data.len() / self.comm.size();
                        let mut mine = vec![0.0f32; block];
                        self.comm.reduce_scatter(&data, &mut mine, ReduceOp::Sum)?;
                        data = mine;
                        dense_bytes
                    }
                    None => {
                        self.comm.all_reduce(&mut data, ReduceOp::Sum)?;
                        dense_bytes
                    }
                    Some(c) => {
                        let memory = self
                            .bank
                            .get_or_insert(id, data.len(), self.options)
                            .and_then(|m| {
                                m.set_layers(&layers)?;
                                Ok(m)
                            })
                            .map_err(|e| ParallelError::Dp {
                                rank,
                                message: format!("bucket {id}: {e}"),
                            })?;
                        let report = meshrec_compress::sync_with(
                            self.comm.as_ref(),
                            &mut data,
                            c.as_mut(),
                            memory,
                            &mut self.payload,
                        )
                        .map_err(|e| ParallelError::Dp {
                            rank,
                            message: format!("bucket {id}: {e}"),
                        })?;
                        // The compressed protocol averages; the step wants the sum.
                        let n = self.comm.size() as f32;
                        data.iter_mut().for_each(|x| *x *= n);
                        report.payload_bytes as u64
                    }
                };
                let sent_bytes = self.comm.stats().total().bytes_sent - before;
                Ok(Reply::Bucket(BucketDone {
                    step,
                    dense_bytes,
                    wire_bytes,
                    data,
                    sent_bytes,
                }))
            }
        }
    }
}

enum Exec {
    Thread {
        jobs: Option<Sender<Job>>,
        replies: Receiver<Result<Reply, ParallelError>>,
        handle: Option<JoinHandle<()>>,
    },
    Inline {
        worker: Box<Worker>,
        done: VecDeque<Result<Reply, ParallelError>>,
    },
}

/// One step whose buckets are on their way.
struct InFlight {
    step: u64,
    buckets: Vec<Vec<Slot>>,
    done: Vec<BucketDone>,
}

/// Under ZeRO-2, which DP rank this is of how many: the reduced buckets hold its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scatter {
    rank: usize,
    size: usize,
}

/// A step's gradients reduced over the DP group (sums of every rank's contribution): whole,
/// or under ZeRO-2 this rank's shard of each.
pub struct ReducedStep {
    pub step: u64,
    buckets: Vec<Vec<Slot>>,
    done: Vec<BucketDone>,
    scatter: Option<Scatter>,
}

/// What a step's reduction moved.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DpTraffic {
    /// The gradient as dense f32.
    pub dense_bytes: u64,
    /// The compressor's payloads (dense bytes without compression).
    pub wire_bytes: u64,
    /// What this rank put on its links for it.
    pub sent_bytes: u64,
}

impl DpTraffic {
    /// Dense bytes over the compressor's payload bytes (1 without compression, and when
    /// nothing was reduced).
    pub fn compression_ratio(&self) -> f64 {
        if self.wire_bytes == 0 {
            1.0
        } else {
            self.dense_bytes as f64 / self.wire_bytes as f64
        }
    }

    pub fn add(&mut self, other: DpTraffic) {
        self.dense_bytes += other.dense_bytes;
        self.wire_bytes += other.wire_bytes;
        self.sent_bytes += other.sent_bytes;
    }
}

/// The gradient buffer a bucket slot's reduced values go to.
fn home<'a>(segments: &'a mut [Segment], s: &Slot) -> Result<&'a mut Vec<f32>, ParallelError> {
    segments
        .get_mut(s.chunk)
        .and_then(|seg| seg.grads.get_mut(s.param))
        .ok_or_else(|| {
            ParallelError::State(format!(
                "reduced gradient for chunk {} parameter {} has no home",
                s.chunk, s.param
            ))
        })
}

impl ReducedStep {
    /// Writes every reduced gradient into its segment's gradient buffer. Under ZeRO-2 the
    /// buffer is replaced by this rank's shard (see [`meshrec_pipeline::zero_shard`]), so
    /// the full-size accumulator is freed until the next step needs it.
    pub fn write_into(&self, segments: &mut [Segment]) -> Result<(), ParallelError> {
        for (slots, done) in self.buckets.iter().zip(&self.done) {
            if let Some(Scatter { rank, size }) = self.scatter {
                let layout = ShardLayout::new(slots.iter().map(|s| s.len), size);
                for (i, s) in slots.iter().enumerate() {
                    *home(segments, s)? = layout.shard_of(&done.data, rank, i).to_vec();
                }
                continue;
            }
            let mut at = 0;
            for s in slots {
                home(segments, s)?.copy_from_slice(&done.data[at..at + s.len]);
                at += s.len;
            }
        }
        Ok(())
    }

    pub fn traffic(&self) -> DpTraffic {
        let mut t = DpTraffic::default();
        for d in &self.done {
            t.add(DpTraffic {
                dense_bytes: d.dense_bytes,
                wire_bytes: d.wire_bytes,
                sent_bytes: d.sent_bytes,
            });
        }
        t
    }
}

/// The DP reducer of one rank (see the module docs).
pub struct DpEngine {
    exec: Exec,
    rank: usize,
    scatter: Option<Scatter>,
    cap_elems: usize,
    filling: Vec<f32>,
    filling_slots: Vec<Slot>,
    building: Option<InFlight>,
    in_flight: VecDeque<InFlight>,
}

impl DpEngine {
    /// An engine reducing over `comm` (a communicator only this engine uses), with the
    /// compressor memories of `memory` (bytes from [`DpEngine::memory_bytes`]) if resuming.
    pub fn new(
        comm: Box<dyn Communicator>,
        settings: &DpSettings,
        memory: Option<&[u8]>,
    ) -> Result<Self, ParallelError> {
        let rank = comm.rank();
        let size = comm.size();
        let dp_err = |message: String| ParallelError::Dp { rank, message };
        let scatter = settings
            .zero
            .shards_gradients()
            .then_some(Scatter { rank, size });
        if scatter.is_some() && settings.method != MethodConfig::Identity {
            return Err(dp_err(
                "ZeRO-2 reduce-scatters dense gradients; a compressor's all-reduce protocol leaves \
                 every rank the whole gradient"
                    .into(),
            ));
        }
        if settings.bucket_bytes < 4 {
            return Err(dp_err(format!(
                "bucket size {} bytes is below one f32",
                settings.bucket_bytes
            )));
        }
        let compressor = match settings.method {
            MethodConfig::Identity => None,
            ref m => Some(m.build().map_err(|e| dp_err(e.to_string()))?),
        };
        let bank = match memory {
            Some(bytes) => MemoryBank::from_bytes(bytes)
                .map_err(|e| dp_err(format!("compressor memory: {e}")))?,
            None => MemoryBank::new(),
        };
        let worker = Worker {
            comm,
            compressor,
            bank,
            options: settings.memory,
            payload: Payload::new(),
        };
        let exec = if settings.threaded {
            let (jobs, job_rx) = crossbeam_channel::unbounded::<Job>();
            let (reply_tx, replies) = crossbeam_channel::unbounded();
            let mut worker = worker;
            let handle = std::thread::Builder::new()
                .name(format!("dp-reduce-{rank}"))
                .spawn(move || {
                    for job in job_rx {
                        let reply = worker.run(job);
                        let failed = reply.is_err();
                        if reply_tx.send(reply).is_err() || failed {
                            break;
                        }
                    }
                })
                .map_err(|e| dp_err(format!("cannot start the reduction thread: {e}")))?;
            Exec::Thread {
                jobs: Some(jobs),
                replies,
                handle: Some(handle),
            }
        } else {
            Exec::Inline {
                worker: Box::new(worker),
                done: VecDeque::new(),
            }
        };
        Ok(Self {
            exec,
            rank,
            scatter,
            cap_elems: settings.bucket_bytes / 4,
            filling: Vec::new(),
            filling_slots: Vec::new(),
            building: None,
            in_flight: VecDeque::new(),
        })
    }

    fn submit(&mut self, job: Job) -> Result<(), ParallelError> {
        let rank = self.rank;
        match &mut self.exec {
            Exec::Thread { jobs, .. } => {
                jobs.as_ref()
                    .and_then(|j| j.send(job).ok())
                    .ok_or_else(|| ParallelError::Dp {
                        rank,
                        message: "the reduction thread has stopped".into(),
                    })
            }
            Exec::Inline { worker, done } => {
                done.push_back(worker.run(job));
                Ok(())
            }
        }
    }

    fn receive(&mut self, block: bool) -> Result<Option<Reply>, ParallelError> {
        let rank = self.rank;
        let reply = match &mut self.exec {
            Exec::Thread { replies, .. } => {
                if block {
                    Some(replies.recv().map_err(|_| ParallelError::Dp {
                        rank,
                        message: "the reduction thread ended without replying".into(),
                    })?)
                } else {
                    replies.try_recv().ok()
                }
            }
            Exec::Inline { done, .. } => done.pop_front(),
        };
        reply.transpose()
    }

    /// Starts collecting step `step`'s gradients.
    pub fn begin_step(&mut self, step: u64) -> Result<(), ParallelError> {
        if self.building.is_some() {
            return Err(ParallelError::Step(format!(
                "DP step {step} begun before the previous one ended"
            )));
        }
        self.building = Some(InFlight {
            step,
            buckets: Vec::new(),
            done: Vec::new(),
        });
        Ok(())
    }

    /// Takes one final gradient (the callback of `run_schedule_releasing`) of a parameter of
    /// `shape` on this rank; launches the open bucket once it reaches the cap.
    pub fn push(
        &mut self,
        chunk: usize,
        param: usize,
        shape: &[usize],
        grad: &[f32],
    ) -> Result<(), ParallelError> {
        let matrix = matrix_view(shape);
        if matrix.0 * matrix.1 != grad.len() {
            return Err(ParallelError::Dp {
                rank: self.rank,
                message: format!(
                    "chunk {chunk} parameter {param}: shape {shape:?} does not hold its {} gradient values",
                    grad.len()
                ),
            });
        }
        if self.filling.capacity() == 0 {
            self.filling.reserve(self.cap_elems.max(grad.len()));
        }
        self.filling.extend_from_slice(grad);
        self.filling_slots.push(Slot {
            chunk,
            param,
            len: grad.len(),
            matrix,
        });
        if self.filling.len() >= self.cap_elems {
            self.launch()?;
        }
        Ok(())
    }

    fn launch(&mut self) -> Result<(), ParallelError> {
        let building = self
            .building
            .as_mut()
            .ok_or_else(|| ParallelError::Step("DP gradient pushed outside a step".into()))?;
        let id = building.buckets.len() as u64;
        let step = building.step;
        let layers = self.filling_slots.iter().map(|s| s.matrix).collect();
        let slots = std::mem::take(&mut self.filling_slots);
        let mut data = std::mem::take(&mut self.filling);
        let scatter = match self.scatter {
            Some(Scatter { size, .. }) => {
                let layout = ShardLayout::new(slots.iter().map(|s| s.len), size);
                let mut at = 0;
                let grads = slots.iter().map(|s| {
                    at += s.len;
                    &data[at - s.len..at]
                });
                data = layout.pack_all(grads)?;
                Some(layout)
            }
            None => None,
        };
        building.buckets.push(slots);
        self.submit(Job::Bucket {
            step,
            data,
            id,
            layers,
            scatter,
        })
    }

    /// Launches the last bucket. Every parameter of `segments` must have been pushed exactly
    /// once.
    pub fn end_step(&mut self, segments: &[Segment]) -> Result<(), ParallelError> {
        if !self.filling_slots.is_empty() {
            self.launch()?;
        }
        let building = self
            .building
            .take()
            .ok_or_else(|| ParallelError::Step("DP step ended before it began".into()))?;
        let expected: usize = segments.iter().map(|s| s.grads.len()).sum();
        let mut seen: Vec<(usize, usize)> = building
            .buckets
            .iter()
            .flatten()
            .map(|s| (s.chunk, s.param))
            .collect();
        let pushed = seen.len();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != pushed || pushed != expected {
            return Err(ParallelError::Step(format!(
                "data-parallel reduction saw {pushed} gradients ({} distinct) of {expected}",
                seen.len()
            )));
        }
        self.in_flight.push_back(building);
        Ok(())
    }

    /// Steps launched and not yet taken, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = u64> + '_ {
        self.in_flight.iter().map(|f| f.step)
    }

    fn absorb(&mut self, reply: Reply) -> Result<(), ParallelError> {
        let Reply::Bucket(done) = reply else {
            return Err(ParallelError::Step(
                "compressor snapshot arrived among bucket results".into(),
            ));
        };
        let flight = self
            .in_flight
            .iter_mut()
            .find(|f| f.step == done.step && f.done.len() < f.buckets.len())
            .ok_or_else(|| {
                ParallelError::Step(format!("reduced bucket of unknown step {}", done.step))
            })?;
        flight.done.push(done);
        Ok(())
    }

    /// Whether the oldest step's buckets have all come back (never blocks).
    pub fn oldest_ready(&mut self) -> Result<bool, ParallelError> {
        while let Some(reply) = self.receive(false)? {
            self.absorb(reply)?;
        }
        Ok(self
            .in_flight
            .front()
            .is_some_and(|f| f.done.len() == f.buckets.len()))
    }

    /// The oldest step's reduced gradients, waiting for them if needed.
    pub fn take_oldest(&mut self) -> Result<ReducedStep, ParallelError> {
        loop {
            match self.in_flight.front() {
                None => {
                    return Err(ParallelError::Step("no DP reduction in flight".into()));
                }
                Some(f) if f.done.len() == f.buckets.len() => break,
                Some(_) => {
                    let reply = self.receive(true)?.ok_or_else(|| {
                        ParallelError::Step("inline DP reduction lost a bucket".into())
                    })?;
                    self.absorb(reply)?;
                }
            }
        }
        let f = self.in_flight.pop_front().expect("checked above");
        Ok(ReducedStep {
            step: f.step,
            buckets: f.buckets,
            done: f.done,
            scatter: self.scatter,
        })
    }

    fn idle(&self, what: &str) -> Result<(), ParallelError> {
        if !self.in_flight.is_empty() || self.building.is_some() {
            return Err(ParallelError::Step(format!(
                "compressor memory {what} while reductions are in flight"
            )));
        }
        Ok(())
    }

    /// Replaces the compressor memories with checkpointed ones (bytes of
    /// [`DpEngine::memory_bytes`]); only between steps with nothing in flight.
    pub fn restore_memory(&mut self, bytes: &[u8]) -> Result<(), ParallelError> {
        self.idle("restored")?;
        let bank = MemoryBank::from_bytes(bytes).map_err(|e| ParallelError::Dp {
            rank: self.rank,
            message: format!("compressor memory: {e}"),
        })?;
        self.submit(Job::Restore(bank))?;
        self.receive(true).map(|_| ())
    }

    /// Drops the compressor memories (the buckets changed shape); between steps only.
    pub fn reset_memory(&mut self) -> Result<(), ParallelError> {
        self.idle("reset")?;
        self.submit(Job::Restore(MemoryBank::new()))?;
        self.receive(true).map(|_| ())
    }

    /// The compressor memories (error-feedback residuals, warm starts) for a checkpoint;
    /// only between steps with nothing in flight.
    pub fn memory_bytes(&mut self) -> Result<Vec<u8>, ParallelError> {
        self.idle("saved")?;
        self.submit(Job::Snapshot)?;
        match self.receive(true)? {
            Some(Reply::Snapshot(bytes)) => Ok(bytes),
            _ => Err(ParallelError::Step(
                "the reduction thread answered a snapshot with something else".into(),
            )),
        }
    }
}

/// DDP as a step hook: every gradient joins a bucket the moment backward finalises it.
impl StepHooks for DpEngine {
    fn releases_grads(&self) -> bool {
        true
    }

    fn grad_ready(
        &mut self,
        chunk: usize,
        param: usize,
        shape: &[usize],
        grad: &[f32],
    ) -> Result<(), ParallelError> {
        self.push(chunk, param, shape, grad)
    }
}

impl Drop for DpEngine {
    fn drop(&mut self) {
        if let Exec::Thread { jobs, handle, .. } = &mut self.exec {
            // Closing the queue ends the thread once it has finished what it holds.
            jobs.take();
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}
