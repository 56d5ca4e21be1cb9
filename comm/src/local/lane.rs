//! One rank's end of a collective *lane*: a full matrix of point-to-point channels of one
//! group, with per-operation sequence numbers, checked receives (operation, length, element
//! type), abort broadcast on failure, and a pool that recycles message buffers. Every
//! collective algorithm of the engine is written against this.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{select, Receiver, Sender};
use half::{bf16, f16};

use super::board::Board;
use super::shared::Shared;
use crate::dtype::DType;
use crate::error::{CommError, Result};
use crate::reduce::Kernel;
use crate::stats::{OpKind, StatsRecorder};

/// Reduction data in flight: a vector of one element type, moved (never copied) from hop to
/// hop.
pub(super) enum Elems {
    F32(Vec<f32>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Elems {
    pub(super) fn dtype(&self) -> DType {
        match self {
            Elems::F32(_) => DType::F32,
            Elems::I64(_) => DType::I64,
            Elems::F16(_) => DType::F16,
            Elems::Bf16(_) => DType::Bf16,
        }
    }

    fn len(&self) -> usize {
        match self {
            Elems::F32(v) => v.len(),
            Elems::I64(v) => v.len(),
            Elems::F16(v) => v.len(),
            Elems::Bf16(v) => v.len(),
        }
    }
}

pub(super) enum Body {
    Empty,
    Elems(Elems),
    SharedF32(Arc<Vec<f32>>),
    SharedBytes(Arc<Vec<u8>>),
    Words(Vec<u64>),
    /// "My buffer of this element type is published on the board" (the in-place algorithms).
    Ready(DType),
    Abort(CommError),
}

impl Body {
    fn bytes(&self) -> u64 {
        (match self {
            Body::Empty | Body::Ready(_) | Body::Abort(_) => 0,
            Body::Elems(e) => e.len() * e.dtype().size(),
            Body::SharedF32(v) => v.len() * 4,
            Body::SharedBytes(v) => v.len(),
            Body::Words(v) => v.len() * 8,
        }) as u64
    }
}

pub(super) struct Msg {
    seq: u64,
    op: OpKind,
    /// The sender's buffer length for this operation (elements or bytes).
    len: usize,
    body: Body,
}

/// Recycled message buffers, one shelf per element type, bounded in bytes all together.
#[derive(Default)]
pub(super) struct Pool {
    f32: Vec<Vec<f32>>,
    i64: Vec<Vec<i64>>,
    f16: Vec<Vec<f16>>,
    bf16: Vec<Vec<bf16>>,
    bytes: usize,
}

/// An element type reduction messages carry: its variant of [`Elems`] and its pool shelf.
pub(super) trait Wire: Kernel {
    fn wrap(v: Vec<Self>) -> Elems;
    /// The vector, or the message back when it holds another type.
    fn unwrap(e: Elems) -> Result<Vec<Self>, Elems>;
    fn shelf(p: &mut Pool) -> &mut Vec<Vec<Self>>;
}

macro_rules! wire {
    ($t:ty, $variant:ident, $shelf:ident) => {
        impl Wire for $t {
            fn wrap(v: Vec<$t>) -> Elems {
                Elems::$variant(v)
            }
            fn unwrap(e: Elems) -> Result<Vec<$t>, Elems> {
                match e {
                    Elems::$variant(v) => Ok(v),
                    other => Err(other),
                }
            }
            fn shelf(p: &mut Pool) -> &mut Vec<Vec<$t>> {
                &mut p.$shelf
            }
        }
    };
}

wire!(f32, F32, f32);
wire!(i64, I64, i64);
wire!(f16, F16, f16);
wire!(bf16, Bf16, bf16);

/// One rank's end of one collective lane of a group.
pub(super) struct Lane {
    pub(super) rank: usize,
    pub(super) size: usize,
    tx: Vec<Sender<Msg>>,
    rx: Vec<Receiver<Msg>>,
    seq: u64,
    pub(super) shared: Arc<Shared>,
    stats: StatsRecorder,
    pool: Pool,
    sent: u64,
    received: u64,
    /// Where this lane's ranks publish buffers for the in-place algorithms (shared by the
    /// lane's ranks).
    pub(super) board: Arc<Board>,
}

pub(super) fn protocol(op: OpKind, peer: usize) -> CommError {
    CommError::Internal(format!("{op}: unexpected message from rank {peer}"))
}

/// Rank `rank` reduces `mine` but rank `peer` reduces `theirs`.
pub(super) fn type_mismatch(
    op: OpKind,
    rank: usize,
    mine: DType,
    peer: usize,
    theirs: DType,
) -> CommError {
    CommError::InvalidArgument(format!(
        "{op}: rank {rank} reduces {mine} but rank {peer} sent {theirs}"
    ))
}

impl Lane {
    pub(super) fn new(
        rank: usize,
        tx: Vec<Sender<Msg>>,
        rx: Vec<Receiver<Msg>>,
        shared: Arc<Shared>,
        stats: StatsRecorder,
        board: Arc<Board>,
    ) -> Self {
        Self {
            rank,
            size: tx.len(),
            tx,
            rx,
            seq: 0,
            shared,
            stats,
            pool: Pool::default(),
            sent: 0,
            received: 0,
            board,
        }
    }

    /// Counts bytes moved without a message (the in-place algorithms read and write peers'
    /// buffers directly).
    pub(super) fn count(&mut self, sent: u64, received: u64) {
        self.sent += sent;
        self.received += received;
    }

    /// The sequence number of the operation in progress (the same on every rank of the lane
    /// while all call the same collectives).
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// Runs one collective: poison check, statistics, abort broadcast on failure.
    pub(super) fn run<T>(
        &mut self,
        kind: OpKind,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        if let Some(e) = self.shared.poisoned() {
            return Err(e);
        }
        let t0 = Instant::now();
        self.sent = 0;
        self.received = 0;
        let r = f(self);
        match &r {
            Ok(_) => self
                .stats
                .record(kind, self.sent, self.received, t0.elapsed()),
            Err(e) => {
                // Tell every peer, so that none waits for this rank until its timeout. Peers
                // that finished already drop it as stale (older sequence number).
                for p in (0..self.size).filter(|&p| p != self.rank) {
                    let _ = self.tx[p].send(Msg {
                        seq: self.seq,
                        op: kind,
                        len: 0,
                        body: Body::Abort(e.clone()),
                    });
                }
            }
        }
        self.seq += 1;
        r
    }

    pub(super) fn send(&mut self, to: usize, op: OpKind, len: usize, body: Body) -> Result<()> {
        self.sent += body.bytes();
        self.tx[to]
            .send(Msg {
                seq: self.seq,
                op,
                len,
                body,
            })
            .map_err(|_| {
                self.shared
                    .poisoned()
                    .or_else(|| self.pending_abort())
                    .unwrap_or(CommError::PeerLost { rank: to, op })
            })
    }

    /// An abort of the current operation already queued by some peer: a peer that failed
    /// and then went away is reported by its original error, not merely by its absence.
    fn pending_abort(&self) -> Option<CommError> {
        for rx in &self.rx {
            while let Ok(m) = rx.try_recv() {
                if let (true, Body::Abort(e)) = (m.seq == self.seq, m.body) {
                    return Some(e);
                }
            }
        }
        None
    }

    /// Next message of this operation from `from`; checks the operation and, when `my_len`
    /// is given, that the sender's length equals it.
    pub(super) fn recv(&mut self, from: usize, op: OpKind, my_len: Option<usize>) -> Result<Body> {
        let timeout = self.shared.config.timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let msg = select! {
                recv(self.rx[from]) -> m => match m {
                    Ok(m) => m,
                    Err(_) => {
                        return Err(self
                            .shared
                            .poisoned()
                            .or_else(|| self.pending_abort())
                            .unwrap_or(CommError::PeerLost { rank: from, op }))
                    }
                },
                recv(self.shared.poison_rx) -> _ => {
                    return Err(self.shared.poisoned().unwrap_or(CommError::Internal(
                        "poison channel fired without poison".to_owned(),
                    )))
                }
                default(deadline.saturating_duration_since(Instant::now())) => {
                    return Err(CommError::Timeout { rank: from, op, after: timeout })
                }
            };
            if msg.seq < self.seq {
                continue; // left over from an operation that was aborted
            }
            if let Body::Abort(e) = msg.body {
                return Err(e);
            }
            if msg.seq > self.seq || msg.op != op {
                return Err(CommError::CollectiveMismatch {
                    rank: self.rank,
                    op,
                    peer: from,
                    peer_op: msg.op,
                });
            }
            if let Some(len) = my_len {
                if msg.len != len {
                    return Err(CommError::SizeMismatch {
                        op,
                        rank: self.rank,
                        len,
                        peer: from,
                        peer_len: msg.len,
                    });
                }
            }
            self.received += msg.body.bytes();
            return Ok(msg.body);
        }
    }

    /// A reduction message of `want` elements of `T` from `from` (sender's buffer length
    /// checked against `my_len`); a peer reducing another element type is named as such.
    pub(super) fn recv_elems<T: Wire>(
        &mut self,
        from: usize,
        op: OpKind,
        my_len: usize,
        want: usize,
    ) -> Result<Vec<T>> {
        match self.recv(from, op, Some(my_len))? {
            Body::Elems(e) => match T::unwrap(e) {
                Ok(v) if v.len() == want => Ok(v),
                Ok(_) => Err(protocol(op, from)),
                Err(other) => Err(type_mismatch(op, self.rank, T::DTYPE, from, other.dtype())),
            },
            // A peer that chose the in-place algorithm (possible only when it reduces another
            // type, as the choice depends on the byte size).
            Body::Ready(d) if d != T::DTYPE => Err(type_mismatch(op, self.rank, T::DTYPE, from, d)),
            _ => Err(protocol(op, from)),
        }
    }

    /// Sends a reduction message.
    pub(super) fn send_elems<T: Wire>(
        &mut self,
        to: usize,
        op: OpKind,
        len: usize,
        v: Vec<T>,
    ) -> Result<()> {
        self.send(to, op, len, Body::Elems(T::wrap(v)))
    }

    fn take_vec<T: Wire>(&mut self, cap: usize) -> Vec<T> {
        match T::shelf(&mut self.pool).pop() {
            Some(mut v) => {
                self.pool.bytes -= v.capacity() * std::mem::size_of::<T>();
                v.clear();
                v.reserve(cap);
                v
            }
            None => Vec::with_capacity(cap),
        }
    }

    /// Keeps a message buffer for the next call, up to `LocalConfig::pool_bytes`.
    pub(super) fn recycle<T: Wire>(&mut self, v: Vec<T>) {
        let b = v.capacity() * std::mem::size_of::<T>();
        if self.pool.bytes + b <= self.shared.config.pool_bytes {
            self.pool.bytes += b;
            T::shelf(&mut self.pool).push(v);
        }
    }

    /// A message buffer (pooled when possible) holding a copy of `data`.
    pub(super) fn copy_msg<T: Wire>(&mut self, data: &[T]) -> Vec<T> {
        let mut m = self.take_vec(data.len());
        m.extend_from_slice(data);
        m
    }
}
