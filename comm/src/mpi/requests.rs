//! Non-blocking MPI operations as [`crate::request::Request`] completions: sends, receives
//! and the all-reduce, polled until done or timed out.

use std::os::raw::c_int;
use std::time::{Duration, Instant};

use mpi::ffi;

use super::call::{check, float, recv_ptr};
use crate::cost;
use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::reduce::finish_avg;
use crate::request::Completion;
use crate::stats::{OpKind, StatsRecorder};

pub(super) enum Buf {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

/// An MPI request that owns its buffer.
pub(super) struct RawRequest {
    pub(super) req: ffi::MPI_Request,
    pub(super) buf: Option<Buf>,
    /// A send buffer MPI reads until completion (when `MPI_IN_PLACE` is unknown).
    pub(super) keep: Option<Vec<f32>>,
    pub(super) peer: usize,
    pub(super) op: OpKind,
    pub(super) timeout: Duration,
}

// SAFETY: MPI_THREAD_SERIALIZED; the request is used by one thread at a time.
unsafe impl Send for RawRequest {}

impl RawRequest {
    fn test(&mut self) -> Result<bool> {
        let mut flag: c_int = 0;
        // SAFETY: `req` is an active request from MPI_Isend / MPI_Iallreduce.
        check(
            unsafe { ffi::MPI_Test(&mut self.req, &mut flag, ffi::RSMPI_STATUS_IGNORE) },
            "MPI_Test",
        )?;
        Ok(flag != 0)
    }

    pub(super) fn wait(mut self) -> Result<Option<Buf>> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if self.test()? {
                return Ok(self.buf.take());
            }
            if Instant::now() >= deadline {
                // MPI may still use the buffer: leak it rather than free memory in use.
                std::mem::forget(self.buf.take());
                std::mem::forget(self.keep.take());
                return Err(CommError::Timeout {
                    rank: self.peer,
                    op: self.op,
                    after: self.timeout,
                });
            }
            std::thread::yield_now();
        }
    }
}

pub(super) struct SendCompletion(pub(super) Option<RawRequest>);

impl Completion<()> for SendCompletion {
    fn poll(&mut self) -> Option<Result<()>> {
        let r = self.0.as_mut()?;
        match r.test() {
            Ok(true) => {
                self.0 = None;
                Some(Ok(()))
            }
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn wait(self: Box<Self>) -> Result<()> {
        match self.0 {
            Some(r) => r.wait().map(|_| ()),
            None => Ok(()),
        }
    }
}

pub(super) struct IallreduceCompletion {
    pub(super) req: Option<RawRequest>,
    pub(super) op: ReduceOp,
    pub(super) n: usize,
    pub(super) stats: StatsRecorder,
    pub(super) start: Instant,
}

impl IallreduceCompletion {
    fn finish(&self, b: Option<Buf>) -> Result<Vec<f32>> {
        match b {
            Some(Buf::F32(mut v)) => {
                finish_avg(&mut v, self.op, self.n);
                let s = cost::ring_all_reduce_bytes_per_rank(self.n, (v.len() * 4) as f64) as u64;
                self.stats
                    .record(OpKind::AllReduce, s, s, self.start.elapsed());
                Ok(v)
            }
            _ => Err(CommError::Internal("iall_reduce lost its buffer".into())),
        }
    }
}

impl Completion<Vec<f32>> for IallreduceCompletion {
    fn poll(&mut self) -> Option<Result<Vec<f32>>> {
        let r = self.req.as_mut()?;
        match r.test() {
            Ok(true) => {
                let b = self.req.take().and_then(|mut r| r.buf.take());
                Some(self.finish(b))
            }
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn wait(mut self: Box<Self>) -> Result<Vec<f32>> {
        match self.req.take() {
            Some(r) => {
                let b = r.wait()?;
                self.finish(b)
            }
            None => Err(CommError::Internal("iall_reduce waited twice".into())),
        }
    }
}

/// Matched probe and receive (`MPI_Improbe` + `MPI_Mrecv`) of a whole message of `T`
/// (whose MPI type is `dt`) from `src` with `tag`; `None` if none is there yet.
pub(super) fn try_receive<T: Copy + Default>(
    comm: ffi::MPI_Comm,
    src: usize,
    tag: c_int,
    dt: ffi::MPI_Datatype,
) -> Result<Option<Vec<T>>> {
    let mut flag: c_int = 0;
    let mut msg = std::mem::MaybeUninit::<ffi::MPI_Message>::uninit();
    let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
    // SAFETY: out-pointers to local storage; `comm` is a live communicator handle.
    check(
        unsafe {
            ffi::MPI_Improbe(
                src as c_int,
                tag,
                comm,
                &mut flag,
                msg.as_mut_ptr(),
                status.as_mut_ptr(),
            )
        },
        "MPI_Improbe",
    )?;
    if flag == 0 {
        return Ok(None);
    }
    // SAFETY: both were written because `flag` is set.
    let (mut msg, status) = unsafe { (msg.assume_init(), status.assume_init()) };
    let mut cnt: c_int = 0;
    // SAFETY: `status` came from the probe.
    check(
        unsafe { ffi::MPI_Get_count(&status, dt, &mut cnt) },
        "MPI_Get_count",
    )?;
    let mut v = vec![T::default(); usize::try_from(cnt).unwrap_or(0)];
    // SAFETY: `v` holds `cnt` elements of the probed message's type; receiving also when
    // the count is undefined (negative) consumes the message instead of leaving it queued.
    check(
        unsafe {
            ffi::MPI_Mrecv(
                recv_ptr(&mut v),
                cnt.max(0),
                dt,
                &mut msg,
                ffi::RSMPI_STATUS_IGNORE,
            )
        },
        "MPI_Mrecv",
    )?;
    if cnt < 0 {
        return Err(CommError::InvalidArgument(format!(
            "message from rank {src} with tag {tag} is not a whole number of the expected type"
        )));
    }
    Ok(Some(v))
}

/// A posted receive, matched lazily by probing (receives posted for one `(src, tag)` are
/// matched in the order they are tested / waited; post and wait in order for MPI ordering).
/// It must complete before its communicator is dropped (it uses the communicator's handle).
pub(super) struct IrecvCompletion {
    pub(super) comm: ffi::MPI_Comm,
    pub(super) rank: usize,
    pub(super) src: usize,
    pub(super) tag: c_int,
    pub(super) len: usize,
    pub(super) timeout: Duration,
    pub(super) stats: StatsRecorder,
    pub(super) start: Instant,
}

// SAFETY: MPI_THREAD_SERIALIZED; the handle is a plain MPI object handle.
unsafe impl Send for IrecvCompletion {}

impl IrecvCompletion {
    fn finish(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        if v.len() != self.len {
            return Err(CommError::SizeMismatch {
                op: OpKind::Recv,
                rank: self.rank,
                len: self.len,
                peer: self.src,
                peer_len: v.len(),
            });
        }
        self.stats
            .record(OpKind::Recv, 0, (v.len() * 4) as u64, self.start.elapsed());
        Ok(v)
    }
}

impl Completion<Vec<f32>> for IrecvCompletion {
    fn poll(&mut self) -> Option<Result<Vec<f32>>> {
        match try_receive::<f32>(self.comm, self.src, self.tag, float()) {
            Ok(Some(v)) => Some(self.finish(v)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        let v = poll_until(self.src, OpKind::Recv, self.timeout, || {
            try_receive::<f32>(self.comm, self.src, self.tag, float())
        })?;
        self.finish(v)
    }
}

/// Polls `probe` until it yields or `timeout` passes.
pub(super) fn poll_until<T>(
    src: usize,
    op: OpKind,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut spins = 0u32;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(CommError::Timeout {
                rank: src,
                op,
                after: timeout,
            });
        }
        spins += 1;
        if spins < 1000 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}
