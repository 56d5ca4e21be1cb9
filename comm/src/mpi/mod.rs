//! The `mpi` engine (feature `mpi`): rsmpi over the system MPI (OpenMPI on Debian), one
//! process per rank, launched by `mpirun -np N`.
//!
//! # Ownership of MPI itself
//! MPI can be initialised once per process and must be finalised after every communicator
//! is freed. [`MpiRuntime::init`] initialises it (asking for `MPI_THREAD_MULTIPLE`, needing at
//! least `MPI_THREAD_SERIALIZED`: the `Send`-but-not-`Sync` communicators may move between
//! threads, and with MULTIPLE different communicators may be used by different threads at
//! once — [`MpiRuntime::concurrent_threads`] says which) and
//! returns an `Arc`; every [`MpiCommunicator`] holds a clone, so `MPI_Finalize` runs when the
//! runtime and the last communicator are dropped. A second `init` in one process fails.
//!
//! # Operations
//! MPI's own collectives do the work: `MPI_Allreduce` (in place), `MPI_Reduce_scatter` (with
//! the counts of `chunk_range`), `MPI_Allgather`, `MPI_Allgatherv`, `MPI_Bcast`,
//! `MPI_Barrier`, `MPI_Iallreduce` for `iall_reduce`, `MPI_Isend` and matched probes
//! (`MPI_Improbe` + `MPI_Mrecv`) for point-to-point, `MPI_Comm_split` for `split`. `Avg` is
//! `MPI_SUM` followed by one division on every rank.
//!
//! Typed reductions map [`DType`] to an MPI datatype: `F32` and `I64` to `MPI_FLOAT` and
//! `MPI_INT64_T` (rsmpi's `Equivalence`) with the built-in operations; `F16` and `Bf16`
//! travel as `MPI_UINT16_T` and reduce with user-defined operations (`MPI_Op_create`, made
//! with the runtime) that add in `f32` and round back at every step, as the local engine and
//! NCCL do. A user operation keeps MPI's own algorithm and the halves' bandwidth, where
//! gathering and reducing in `f32` would move `n` times the bytes.
//!
//! # Failures
//! * Sizes: with `MpiConfig::check_sizes` (default) the ranks compare the *shape* of a
//!   collective — operation, length, element type, reduction or root — before running it,
//!   so that a disagreement is an error on every rank (`SizeMismatch` naming rank 0 and the
//!   first rank that differs, `CollectiveMismatch`, or `InvalidArgument` for a type, a
//!   reduction or a root) instead of MPI undefined behaviour. The comparison (one small
//!   `MPI_Allgather`, a round trip) runs once per shape and communicator, not per call:
//!   `ShapeChecks` (in the source) says what that does and does not catch. In short, a
//!   disagreement at the first call of a shape is an error; one where some rank repeats a
//!   shape that passed before is not detected, and ends the job through the watchdog (or
//!   MPI's own error). Turn it off to skip even the first check.
//! * Timeouts: point-to-point receives, sends and non-blocking waits poll with a deadline and
//!   return `Timeout`. Blocking collectives cannot be interrupted in MPI; a watchdog thread
//!   aborts the process (and with it, through `mpirun`, the job) when one exceeds
//!   `MpiConfig::timeout`, printing which operation and rank: a clear failure, never a hang.
//!   Arming it costs a collective two plain atomic stores (the thread samples them).
//! * A dead peer: `mpirun` tears the whole job down when a rank exits abnormally, so the
//!   survivors end rather than observing `PeerLost`.
//!
//! Statistics: byte counts are *modelled* (`CommStats::bytes_modelled`) for collectives, from
//! the ring algorithm's per-rank traffic, since MPI's wire traffic is not visible.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::c_void;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mpi::collective::{CommunicatorCollectives, Root};
use mpi::environment::Universe;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{Color, Communicator as _, SimpleCommunicator};
use mpi::Threading;

use crate::communicator::{check_rank, chunk_len, chunk_range, Communicator};
use crate::cost;
use crate::dtype::{check_reduction, elems, elems_of, with_elems_mut, DType};
use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::reduce::{finish_avg, with_dtype, Kernel};
use crate::request::Request;
use crate::stats::{CommStats, OpKind, StatsRecorder};

mod call;
mod half_ops;
mod requests;
mod watchdog;

use call::{byte, check, count, datatype, float, mpi_op, recv_ptr, send_ptr, tag_of};
use half_ops::{op_index, HalfOps};
use requests::{
    poll_until, try_receive, Buf, IallreduceCompletion, IrecvCompletion, RawRequest, SendCompletion,
};
use watchdog::{Watch, Watchdog};

/// Settings of the MPI engine.
#[derive(Debug, Clone)]
pub struct MpiConfig {
    /// Longest wait for a peer: point-to-point and non-blocking waits return `Timeout`
    /// after it; a blocking collective past it aborts the job (see the module docs).
    pub timeout: Duration,
    /// Compare the ranks' lengths (and operation, element type, reduction, root) to report
    /// `SizeMismatch` and the like instead of MPI undefined behaviour: once per shape of
    /// call, not per call (see the module docs for what that catches).
    pub check_sizes: bool,
}

impl Default for MpiConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            check_sizes: true,
        }
    }
}

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// The process-wide MPI environment (see the module docs).
pub struct MpiRuntime {
    universe: Universe,
    /// `MPI_IN_PLACE` of the MPI library in use, when known (the constant is a macro that
    /// rsmpi does not export: `(void*)1` in Open MPI, `(void*)-1` in MPICH and derivatives).
    in_place: Option<usize>,
    watchdog: Watchdog,
    /// Whether the library granted MPI_THREAD_MULTIPLE: communicators may then be used from
    /// several threads at once (each still by one thread at a time).
    concurrent: bool,
    /// The user operations of the half-precision types (see the module docs).
    half_ops: HalfOps,
}

// SAFETY: MPI is initialised with at least MPI_THREAD_SERIALIZED (checked in `init`), so MPI
// calls may come from any thread; the communicators built on this runtime are `Send` but not
// `Sync`, which serialises the calls each one makes, callers use several communicators from
// several threads only when `concurrent_threads` says MULTIPLE was granted, and the runtime
// itself is only used to create communicators and to finalise.
unsafe impl Send for MpiRuntime {}
// SAFETY: as above; shared references to the runtime make no MPI calls.
unsafe impl Sync for MpiRuntime {}

impl std::fmt::Debug for MpiRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiRuntime")
            .field("in_place", &self.in_place)
            .finish()
    }
}

impl MpiRuntime {
    /// Initialises MPI for this process (once).
    pub fn init() -> Result<Arc<Self>> {
        if INITIALISED.swap(true, Ordering::SeqCst) {
            return Err(CommError::Mpi(
                "MPI was already initialised in this process".into(),
            ));
        }
        let (universe, level) =
            mpi::initialize_with_threading(Threading::Multiple).ok_or_else(|| {
                CommError::Mpi("MPI_Init_thread failed or MPI already initialised".into())
            })?;
        if level < Threading::Serialized {
            return Err(CommError::Mpi(format!(
                "the MPI library provides thread level {level:?}, meshrec needs Serialized"
            )));
        }
        let version = mpi::environment::library_version().unwrap_or_default();
        let in_place = if version.contains("Open MPI") {
            Some(1usize)
        } else if version.contains("MPICH") || version.contains("Intel") {
            Some(usize::MAX)
        } else {
            None
        };
        let half_ops = HalfOps::create()?;
        Ok(Arc::new(Self {
            universe,
            in_place,
            watchdog: Watchdog::default(),
            concurrent: level >= Threading::Multiple,
            half_ops,
        }))
    }

    /// The communicator of every process of the job.
    pub fn world(self: &Arc<Self>, config: MpiConfig) -> MpiCommunicator {
        MpiCommunicator::new(self.universe.world(), config, Arc::clone(self))
    }

    /// Whether different communicators may make MPI calls from different threads at the
    /// same time (`MPI_THREAD_MULTIPLE` granted); otherwise only one thread may call MPI.
    pub fn concurrent_threads(&self) -> bool {
        self.concurrent
    }

    /// The MPI library's version string.
    pub fn library_version(&self) -> String {
        mpi::environment::library_version().unwrap_or_default()
    }

    /// The MPI operation reducing `dtype` with `op` (`Avg` is a sum here; the division
    /// follows).
    fn reduce_op(&self, dtype: DType, op: ReduceOp) -> ffi::MPI_Op {
        match dtype {
            DType::F32 | DType::I64 => mpi_op(op),
            DType::F16 => self.half_ops.f16[op_index(op)],
            DType::Bf16 => self.half_ops.bf16[op_index(op)],
        }
    }
}

impl Drop for MpiRuntime {
    fn drop(&mut self) {
        // Before `universe` drops, which finalises MPI: operations must be freed first.
        self.half_ops.free();
    }
}

/// The shape of a collective call: what every rank must pass alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    op: OpKind,
    len: usize,
    dtype: Option<DType>,
    reduce: Option<ReduceOp>,
    root: Option<usize>,
}

const REDUCE_OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min];

impl Shape {
    fn reduction(op: OpKind, len: usize, dtype: DType, reduce: ReduceOp) -> Self {
        Self {
            op,
            len,
            dtype: Some(dtype),
            reduce: Some(reduce),
            root: None,
        }
    }

    fn plain(op: OpKind, len: usize) -> Self {
        Self {
            op,
            len,
            dtype: None,
            reduce: None,
            root: None,
        }
    }

    /// The shape as words for the all-gather (0 for "none", else 1 + index).
    fn words(&self) -> [u64; 5] {
        let idx = |i: Option<usize>| i.map_or(0, |i| i as u64 + 1);
        [
            self.op as u64,
            self.len as u64,
            idx(self
                .dtype
                .and_then(|d| DType::ALL.iter().position(|&x| x == d))),
            idx(self
                .reduce
                .and_then(|r| REDUCE_OPS.iter().position(|&x| x == r))),
            idx(self.root),
        ]
    }
}

/// The error every rank reports when rank `q`'s shape words `theirs` differ from rank 0's
/// `first` (every rank gathered the same words, so every rank reports the same error).
fn shape_mismatch(first: &[u64], q: usize, theirs: &[u64]) -> CommError {
    let op = |w: u64| {
        OpKind::ALL
            .get(w as usize)
            .copied()
            .unwrap_or(OpKind::AllReduce)
    };
    let name = |w: u64, names: &[&'static str]| -> &'static str {
        w.checked_sub(1)
            .and_then(|i| names.get(i as usize).copied())
            .unwrap_or("none")
    };
    let dtypes = DType::ALL.map(DType::name);
    let reduces = ["Sum", "Avg", "Max", "Min"];
    let kind = op(first[0]);
    if first[0] != theirs[0] {
        CommError::CollectiveMismatch {
            rank: 0,
            op: kind,
            peer: q,
            peer_op: op(theirs[0]),
        }
    } else if first[1] != theirs[1] {
        CommError::SizeMismatch {
            op: kind,
            rank: 0,
            len: first[1] as usize,
            peer: q,
            peer_len: theirs[1] as usize,
        }
    } else if first[2] != theirs[2] {
        CommError::InvalidArgument(format!(
            "{kind}: rank 0 reduces {} but rank {q} reduces {}",
            name(first[2], &dtypes),
            name(theirs[2], &dtypes)
        ))
    } else if first[3] != theirs[3] {
        CommError::InvalidArgument(format!(
            "{kind}: rank 0 reduces with {} but rank {q} with {}",
            name(first[3], &reduces),
            name(theirs[3], &reduces)
        ))
    } else {
        CommError::InvalidArgument(format!(
            "{kind}: rank 0 passes root {} but rank {q} root {}",
            first[4].saturating_sub(1),
            theirs[4].saturating_sub(1)
        ))
    }
}

/// Amortised shape checks of one communicator (`MpiConfig::check_sizes`).
///
/// The first call of each [`Shape`] all-gathers the ranks' shapes and fails on every rank
/// alike when they differ; once a shape has passed, later calls of that shape skip the check
/// (no round trip). Ranks agree on skipping without talking, because their caches are equal:
/// each holds exactly the shapes that passed a check, inserted at the same call on every
/// rank (a passed check means every rank had that shape, and every rank runs the same
/// sequence of collectives). The cache is bounded; when full it is emptied, which happens at
/// the same call everywhere for the same reason.
///
/// What is caught: any disagreement at a call whose shape is new on *every* rank — the first
/// call of every shape, so a buffer that is wrong from its first use, or ranks that call
/// different collectives, or reduce different types, or with different operations, or from
/// different roots. What is not: a disagreement where some rank's shape passed a check
/// before (say rank 1 passes the length of an earlier bucket). If every rank's shape is
/// cached, all skip the check and MPI runs with mismatched arguments, which is erroneous
/// MPI (Open MPI typically aborts on a truncation error or hangs until the watchdog aborts
/// the job). If some ranks' shapes are cached and others' are not, the latter wait in a check
/// that the former never join; the checks run on a duplicate of the communicator, so that
/// wait can never be matched against the data collective, and ends when the watchdog
/// aborts the job after `MpiConfig::timeout`. Either way the job ends with a message, but
/// not with the `SizeMismatch` of the first case.
struct ShapeChecks {
    /// A duplicate of the communicator for the checks, made (collectively) at the first
    /// check, which every rank reaches at the same call because all caches start empty.
    checker: Option<SimpleCommunicator>,
    passed: HashSet<Shape>,
    /// The shape of the last call, when it is in `passed`: loops repeat one shape, and a
    /// comparison is cheaper than hashing.
    last: Option<Shape>,
}

/// Most shapes one communicator remembers as checked.
const MAX_CHECKED_SHAPES: usize = 4096;

/// One rank of an MPI communicator.
pub struct MpiCommunicator {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    world_rank: i32,
    config: MpiConfig,
    stats: StatsRecorder,
    watch: Arc<Watch>,
    /// Freed (its duplicate communicator) before `runtime` drops.
    checks: RefCell<ShapeChecks>,
    /// Declared last: dropped after `comm` is freed, finalising MPI if it is the last.
    runtime: Arc<MpiRuntime>,
}

// SAFETY: see `MpiRuntime`: the communicator is not `Sync`, so its own MPI calls never
// overlap, and concurrent use of several communicators needs MPI_THREAD_MULTIPLE.
unsafe impl Send for MpiCommunicator {}

impl std::fmt::Debug for MpiCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCommunicator")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("world_rank", &self.world_rank)
            .finish()
    }
}

impl MpiCommunicator {
    fn new(comm: SimpleCommunicator, config: MpiConfig, runtime: Arc<MpiRuntime>) -> Self {
        let rank = comm.rank() as usize;
        let size = comm.size() as usize;
        let world_rank = runtime.universe.world().rank();
        let watch = runtime.watchdog.register(config.timeout, world_rank);
        Self {
            comm,
            rank,
            size,
            world_rank,
            config,
            stats: StatsRecorder::new(true),
            watch,
            checks: RefCell::new(ShapeChecks {
                checker: None,
                passed: HashSet::new(),
                last: None,
            }),
            runtime,
        }
    }

    /// The rsmpi communicator (for raw MPI calls beside this engine, e.g. benchmarks).
    pub fn raw(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// This process's rank in `MPI_COMM_WORLD`.
    pub fn world_rank(&self) -> usize {
        self.world_rank as usize
    }

    /// The engine settings.
    pub fn config(&self) -> &MpiConfig {
        &self.config
    }

    /// How many call shapes (operation, length, element type, reduction or root) passed the
    /// size check and are not checked again (see the module docs); equal on every rank.
    pub fn checked_shapes(&self) -> usize {
        self.checks.borrow().passed.len()
    }

    /// `split` returning the concrete type.
    pub fn split_mpi(&self, color: u32, key: u32) -> Result<MpiCommunicator> {
        let t0 = Instant::now();
        let c = c_int::try_from(color)
            .map_err(|_| CommError::InvalidArgument(format!("color {color} above i32 range")))?;
        let k = c_int::try_from(key)
            .map_err(|_| CommError::InvalidArgument(format!("key {key} above i32 range")))?;
        self.watch.arm(OpKind::Split);
        let sub = self.comm.split_by_color_with_key(Color::with_value(c), k);
        self.watch.disarm();
        let sub =
            sub.ok_or_else(|| CommError::Mpi("MPI_Comm_split gave no communicator".into()))?;
        self.stats.record(OpKind::Split, 0, 0, t0.elapsed());
        Ok(MpiCommunicator::new(
            sub,
            self.config.clone(),
            Arc::clone(&self.runtime),
        ))
    }

    /// Every rank's `len`, all-gathered (one small `MPI_Allgather`).
    fn lengths(&self, len: usize) -> Vec<u64> {
        let mut all = vec![0u64; self.size];
        self.comm.all_gather_into(&(len as u64), &mut all[..]);
        all
    }

    /// With `check_sizes`, fails on every rank when the ranks' shapes differ; checked once
    /// per shape (see [`ShapeChecks`]).
    fn check_shape(&self, shape: Shape) -> Result<()> {
        if !self.config.check_sizes || self.size == 1 {
            return Ok(());
        }
        let mut checks = self.checks.borrow_mut();
        if checks.last == Some(shape) {
            return Ok(());
        }
        if checks.passed.contains(&shape) {
            checks.last = Some(shape);
            return Ok(());
        }
        let checker = checks.checker.get_or_insert_with(|| self.comm.duplicate());
        let mut all = vec![0u64; 5 * self.size];
        checker.all_gather_into(&shape.words()[..], &mut all[..]);
        let first = &all[..5];
        if let Some((q, theirs)) = all.chunks_exact(5).enumerate().find(|(_, w)| *w != first) {
            return Err(shape_mismatch(first, q, theirs));
        }
        if checks.passed.len() >= MAX_CHECKED_SHAPES {
            checks.passed.clear();
        }
        checks.passed.insert(shape);
        checks.last = Some(shape);
        Ok(())
    }

    /// Runs a blocking collective under the watchdog and records statistics.
    fn collective<T>(
        &self,
        op: OpKind,
        sent: f64,
        received: f64,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        // The TSC clock: two `std::time::Instant` reads cost ~8 % of a 1 KB all-reduce.
        let t0 = quanta::Instant::now();
        self.watch.arm(op);
        let r = f();
        self.watch.disarm();
        if r.is_ok() {
            let elapsed = quanta::Instant::now().duration_since(t0);
            self.stats.record(op, sent as u64, received as u64, elapsed);
        }
        r
    }

    /// The reductions of every element type (the `f32` methods and the byte interface).
    fn all_reduce_typed<T: Kernel>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let n = self.size;
        let bytes = cost::ring_all_reduce_bytes_per_rank(n, std::mem::size_of_val(buf) as f64);
        self.collective(OpKind::AllReduce, bytes, bytes, || {
            self.check_shape(Shape::reduction(OpKind::AllReduce, buf.len(), T::DTYPE, op))?;
            if n == 1 {
                return Ok(());
            }
            let cnt = count(buf.len(), "all_reduce")?;
            let copy;
            let send = match self.in_place() {
                Some(p) => p,
                None => {
                    copy = buf.to_vec();
                    send_ptr(&copy)
                }
            };
            // SAFETY: `buf` holds `cnt` elements of the datatype; `send` is MPI_IN_PLACE or a
            // copy of them.
            check(
                unsafe {
                    ffi::MPI_Allreduce(
                        send,
                        recv_ptr(buf),
                        cnt,
                        datatype(T::DTYPE),
                        self.runtime.reduce_op(T::DTYPE, op),
                        self.comm.as_raw(),
                    )
                },
                "MPI_Allreduce",
            )?;
            finish_avg(buf, op, n);
            Ok(())
        })
    }

    fn reduce_scatter_typed<T: Kernel>(
        &self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let (n, len) = (self.size, input.len());
        let want = chunk_len(len, n, self.rank);
        if output.len() != want {
            return Err(CommError::BadLength {
                op: OpKind::ReduceScatter,
                what: "output",
                expected: want,
                got: output.len(),
            });
        }
        let bytes =
            cost::ring_gather_scatter_bytes_per_rank(n, std::mem::size_of_val(input) as f64);
        self.collective(OpKind::ReduceScatter, bytes, bytes, || {
            self.check_shape(Shape::reduction(OpKind::ReduceScatter, len, T::DTYPE, op))?;
            count(len, "reduce_scatter")?;
            let counts: Vec<c_int> = (0..n)
                .map(|r| chunk_range(len, n, r).len() as c_int)
                .collect();
            // SAFETY: `input` holds sum(counts) elements; `output` holds counts[rank].
            check(
                unsafe {
                    ffi::MPI_Reduce_scatter(
                        send_ptr(input),
                        recv_ptr(output),
                        counts.as_ptr(),
                        datatype(T::DTYPE),
                        self.runtime.reduce_op(T::DTYPE, op),
                        self.comm.as_raw(),
                    )
                },
                "MPI_Reduce_scatter",
            )?;
            finish_avg(output, op, n);
            Ok(())
        })
    }

    fn in_place(&self) -> Option<*const c_void> {
        self.runtime.in_place.map(|p| p as *const c_void)
    }

    fn start_isend(&self, dst: usize, tag: u32, data: Buf) -> Result<RawRequest> {
        check_rank("destination", dst, self.size)?;
        let t = tag_of(tag)?;
        let (ptr, n, dt) = match &data {
            Buf::F32(v) => (send_ptr(v), v.len(), float()),
            Buf::U8(v) => (send_ptr(v), v.len(), byte()),
        };
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        // SAFETY: the buffer is owned by the returned request and outlives the operation
        // (waits either complete it or leak the buffer on timeout).
        check(
            unsafe {
                ffi::MPI_Isend(
                    ptr,
                    count(n, "send")?,
                    dt,
                    dst as c_int,
                    t,
                    self.comm.as_raw(),
                    req.as_mut_ptr(),
                )
            },
            "MPI_Isend",
        )?;
        // SAFETY: initialised by the successful MPI_Isend.
        let req = unsafe { req.assume_init() };
        Ok(RawRequest {
            req,
            buf: Some(data),
            keep: None,
            peer: dst,
            op: OpKind::Send,
            timeout: self.config.timeout,
        })
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.all_reduce_typed(buf, op)
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        self.reduce_scatter_typed(input, output, op)
    }

    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_reduction(OpKind::AllReduce, "buffer", dtype, op, buf.len())?;
        with_dtype!(dtype, T => {
            with_elems_mut::<T, _>(buf, |s| self.all_reduce_typed(s, op))
        })
    }

    fn reduce_scatter_bytes(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        check_reduction(OpKind::ReduceScatter, "input", dtype, op, input.len())?;
        elems_of(OpKind::ReduceScatter, "output", dtype, output.len())?;
        with_dtype!(dtype, T => {
            let input = elems::<T>(input);
            with_elems_mut::<T, _>(output, |o| self.reduce_scatter_typed(&input, o, op))
        })
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let (n, len) = (self.size, input.len());
        if output.len() != n * len {
            return Err(CommError::BadLength {
                op: OpKind::AllGather,
                what: "output",
                expected: n * len,
                got: output.len(),
            });
        }
        let bytes = cost::ring_gather_scatter_bytes_per_rank(n, (n * len * 4) as f64);
        self.collective(OpKind::AllGather, bytes, bytes, || {
            self.check_shape(Shape::plain(OpKind::AllGather, len))?;
            let cnt = count(len, "all_gather")?;
            count(n * len, "all_gather")?;
            // SAFETY: `input` holds `cnt` floats, `output` n * cnt.
            check(
                unsafe {
                    ffi::MPI_Allgather(
                        send_ptr(input),
                        cnt,
                        float(),
                        recv_ptr(output),
                        cnt,
                        float(),
                        self.comm.as_raw(),
                    )
                },
                "MPI_Allgather",
            )
        })
    }

    fn all_gatherv_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.size;
        let t0 = Instant::now();
        self.watch.arm(OpKind::AllGatherV);
        let r = (|| {
            let lens = self.lengths(input.len());
            let total: u64 = lens.iter().sum();
            let mut counts = Vec::with_capacity(n);
            let mut displs = Vec::with_capacity(n);
            let mut at = 0u64;
            for &l in &lens {
                counts.push(count(l as usize, "all_gatherv")?);
                displs.push(count(at as usize, "all_gatherv")?);
                at += l;
            }
            count(total as usize, "all_gatherv")?;
            let mut all = vec![0u8; total as usize];
            if total == 0 {
                return Ok((lens.iter().map(|_| Vec::new()).collect(), 0));
            }
            // SAFETY: counts/displs describe `all` exactly; `input` holds counts[rank] bytes.
            check(
                unsafe {
                    ffi::MPI_Allgatherv(
                        send_ptr(input),
                        counts[self.rank],
                        byte(),
                        recv_ptr(&mut all),
                        counts.as_ptr(),
                        displs.as_ptr(),
                        byte(),
                        self.comm.as_raw(),
                    )
                },
                "MPI_Allgatherv",
            )?;
            let mut out = Vec::with_capacity(n);
            let mut at = 0usize;
            for &l in &lens {
                out.push(all[at..at + l as usize].to_vec());
                at += l as usize;
            }
            Ok((out, total))
        })();
        self.watch.disarm();
        let (out, total) = r?;
        self.stats.record(
            OpKind::AllGatherV,
            cost::ring_gather_scatter_bytes_per_rank(n, total as f64) as u64,
            (total as usize - input.len()) as u64,
            t0.elapsed(),
        );
        Ok(out)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_rank("root", root, self.size)?;
        let s = (buf.len() * 4) as f64;
        let (sent, recvd) = if self.rank == root {
            (s, 0.0)
        } else {
            (0.0, s)
        };
        self.collective(OpKind::Broadcast, sent, recvd, || {
            self.check_shape(Shape {
                root: Some(root),
                ..Shape::plain(OpKind::Broadcast, buf.len())
            })?;
            let cnt = count(buf.len(), "broadcast")?;
            // SAFETY: `buf` holds `cnt` floats on every rank (checked above when enabled).
            check(
                unsafe {
                    ffi::MPI_Bcast(
                        recv_ptr(buf),
                        cnt,
                        float(),
                        root as c_int,
                        self.comm.as_raw(),
                    )
                },
                "MPI_Bcast",
            )
        })
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_rank("root", root, self.size)?;
        self.collective(OpKind::Broadcast, 0.0, 0.0, || {
            let mut len = buf.len() as u64;
            self.comm
                .process_at_rank(root as c_int)
                .broadcast_into(&mut len);
            let cnt = count(len as usize, "broadcast_bytes")?;
            buf.resize(len as usize, 0);
            // SAFETY: every rank's `buf` now holds the root's length.
            check(
                unsafe {
                    ffi::MPI_Bcast(
                        recv_ptr(buf),
                        cnt,
                        byte(),
                        root as c_int,
                        self.comm.as_raw(),
                    )
                },
                "MPI_Bcast",
            )
        })
    }

    fn send_bytes(&self, dst: usize, tag: u32, data: &[u8]) -> Result<()> {
        let t0 = Instant::now();
        self.start_isend(dst, tag, Buf::U8(data.to_vec()))?.wait()?;
        self.stats
            .record(OpKind::Send, data.len() as u64, 0, t0.elapsed());
        Ok(())
    }

    fn recv_bytes(&self, src: usize, tag: u32) -> Result<Vec<u8>> {
        check_rank("source", src, self.size)?;
        let t = tag_of(tag)?;
        let t0 = Instant::now();
        let comm = self.comm.as_raw();
        let v = poll_until(src, OpKind::Recv, self.config.timeout, || {
            try_receive::<u8>(comm, src, t, byte())
        })?;
        self.stats
            .record(OpKind::Recv, 0, v.len() as u64, t0.elapsed());
        Ok(v)
    }

    fn barrier(&self) -> Result<()> {
        self.collective(OpKind::Barrier, 0.0, 0.0, || {
            self.comm.barrier();
            Ok(())
        })
    }

    fn iall_reduce(&self, mut buf: Vec<f32>, op: ReduceOp) -> Result<Request<Vec<f32>>> {
        let start = Instant::now();
        let n = self.size;
        if n == 1 {
            self.stats.record(OpKind::AllReduce, 0, 0, Duration::ZERO);
            return Ok(Request::ready(Ok(buf)));
        }
        // No length pre-check here: it would make the start blocking (MPI requires equal
        // counts on all ranks for non-blocking collectives too).
        let cnt = count(buf.len(), "iall_reduce")?;
        let send_copy = match self.in_place() {
            Some(_) => None,
            None => Some(buf.clone()),
        };
        let send = match (&send_copy, self.in_place()) {
            (Some(c), _) => send_ptr(c),
            (None, Some(p)) => p,
            (None, None) => return Err(CommError::Internal("no send buffer".into())),
        };
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        // SAFETY: `buf`'s heap storage does not move when the Vec moves into the request,
        // which owns it until completion.
        check(
            unsafe {
                ffi::MPI_Iallreduce(
                    send,
                    recv_ptr(&mut buf),
                    cnt,
                    float(),
                    mpi_op(op),
                    self.comm.as_raw(),
                    req.as_mut_ptr(),
                )
            },
            "MPI_Iallreduce",
        )?;
        // SAFETY: initialised by the successful call.
        let req = unsafe { req.assume_init() };
        let raw = RawRequest {
            req,
            buf: Some(Buf::F32(buf)),
            keep: send_copy,
            peer: self.rank,
            op: OpKind::AllReduce,
            timeout: self.config.timeout,
        };
        Ok(Request::pending(Box::new(IallreduceCompletion {
            req: Some(raw),
            op,
            n,
            stats: self.stats.clone(),
            start,
        })))
    }

    fn isend(&self, dst: usize, tag: u32, data: Vec<f32>) -> Result<Request<()>> {
        let t0 = Instant::now();
        let bytes = (data.len() * 4) as u64;
        let r = self.start_isend(dst, tag, Buf::F32(data))?;
        self.stats.record(OpKind::Send, bytes, 0, t0.elapsed());
        Ok(Request::pending(Box::new(SendCompletion(Some(r)))))
    }

    fn irecv(&self, src: usize, tag: u32, len: usize) -> Result<Request<Vec<f32>>> {
        check_rank("source", src, self.size)?;
        let tag = tag_of(tag)?;
        Ok(Request::pending(Box::new(IrecvCompletion {
            comm: self.comm.as_raw(),
            rank: self.rank,
            src,
            tag,
            len,
            timeout: self.config.timeout,
            stats: self.stats.clone(),
            start: Instant::now(),
        })))
    }

    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(self.split_mpi(color, key)?))
    }

    fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    fn reset_stats(&self) {
        self.stats.reset();
    }
}
