//! The `local` engine: N ranks as N threads of one process, talking over crossbeam channels.
//!
//! # Design
//! * Every group (the cluster, and every group `split` makes) has three *lanes*, each a full
//!   matrix of unbounded point-to-point channels: one for blocking collectives (driven by the
//!   caller's thread), one for non-blocking collectives (driven by the communicator's
//!   progress thread, started on the first `iall_reduce`), one for tagged send/recv. Within a
//!   lane a pair of ranks sees messages in order, so collectives need no central lock and no
//!   matching beyond a sequence number.
//! * All-reduce: a ring (reduce-scatter then all-gather) for large buffers, recursive
//!   doubling for small ones (`LocalConfig::ring_threshold_bytes`, measured by the `comm`
//!   benchmark). The ring is cut into segments (`segment_bytes`) that pipeline around the
//!   ring. Message buffers are not copied per hop: a segment's buffer is reduced into in
//!   place and forwarded, the last reduction writes the result to both the rank's buffer and
//!   the message, which then travels on as the all-gather message, and the rank that retires
//!   it keeps it in a pool for the next call. Every rank ends with bit-identical results.
//! * All-gather, ragged all-gather and broadcast share one immutable copy (`Arc`) of each
//!   payload with all receivers (a single hop: the fastest schedule in shared memory).
//! * Every message carries the sender's operation, sequence number and buffer length, so
//!   mismatched lengths or collectives are reported (`SizeMismatch`, `CollectiveMismatch`).
//! * Failures: a rank that fails a collective sends an abort carrying its error to all peers,
//!   so nobody waits for it; a dropped peer shows as a closed channel (`PeerLost`); a silent
//!   peer as `Timeout` after `LocalConfig::timeout`; a rank that panics while holding its
//!   communicator poisons the whole cluster (every group), waking every waiting rank.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender, TryRecvError};

use crate::reduce::{combine_final_both, combine_final_into, combine_into, finish_avg};
use crate::request::{Completion, Request};
use crate::stats::{CommStats, OpKind, StatsRecorder};
use crate::{check_rank, chunk_len, chunk_range, CommError, Communicator, ReduceOp, Result};

/// Which all-reduce algorithm the local engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllReduceChoice {
    /// Ring at or above `ring_threshold_bytes`, recursive doubling below.
    Auto,
    /// Always the ring.
    Ring,
    /// Always recursive doubling.
    RecursiveDoubling,
}

/// Settings of a local cluster (shared by every group split from it).
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// How long any single wait for a peer may last before `CommError::Timeout`.
    pub timeout: Duration,
    /// All-reduce algorithm selection.
    pub all_reduce: AllReduceChoice,
    /// Buffers of at least this many bytes use the ring under `Auto`. The default is the
    /// crossover the `comm` benchmark measured on the development machine (2 cores): ring
    /// first faster at 256 KiB for 2 and 3 ranks (64 KiB for 4 oversubscribed ranks).
    pub ring_threshold_bytes: usize,
    /// Pipelining granularity of the ring, in bytes per message.
    pub segment_bytes: usize,
    /// Most bytes of message buffers a lane keeps for reuse between calls.
    pub pool_bytes: usize,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            all_reduce: AllReduceChoice::Auto,
            ring_threshold_bytes: 256 * 1024,
            segment_bytes: 256 * 1024,
            pool_bytes: 512 * 1024 * 1024,
        }
    }
}

impl LocalConfig {
    /// The default configuration with another timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            ..Self::default()
        }
    }
}

/// Why `LocalCluster::run` failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClusterError {
    /// A rank's closure panicked (the group was poisoned, so the others saw errors).
    #[error("rank {rank} panicked: {message}")]
    RankPanicked {
        /// The rank whose closure panicked.
        rank: usize,
        /// Its panic message.
        message: String,
    },
    /// The cluster could not be set up.
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// State shared by every communicator of one cluster.
struct Shared {
    config: LocalConfig,
    /// Dropped (set to `None`) to poison: every `poison_rx` then reports disconnection,
    /// which wakes every rank blocked in a `select!`.
    poison_tx: Mutex<Option<Sender<()>>>,
    poison_rx: Receiver<()>,
    /// (world rank, message, message is a placeholder from `Drop`).
    poison_info: Mutex<Option<(usize, String, bool)>>,
    next_group: AtomicU64,
    pending_splits: Mutex<HashMap<(u64, u64, u32), PendingSplit>>,
}

struct PendingSplit {
    comms: Vec<Option<LocalCommunicator>>,
    left: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent across a panic (whole-value updates).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn new(config: LocalConfig) -> Arc<Self> {
        let (tx, rx) = unbounded();
        Arc::new(Self {
            config,
            poison_tx: Mutex::new(Some(tx)),
            poison_rx: rx,
            poison_info: Mutex::new(None),
            next_group: AtomicU64::new(0),
            pending_splits: Mutex::new(HashMap::new()),
        })
    }

    /// Poisons the cluster. A `placeholder` message (from `Drop`, which cannot see the
    /// panic payload) is replaced by the real one when `LocalCluster::run` catches the panic.
    fn poison(&self, world_rank: usize, message: String, placeholder: bool) {
        {
            let mut info = lock(&self.poison_info);
            let replace = match &*info {
                None => true,
                Some((r, _, true)) => *r == world_rank && !placeholder,
                Some(_) => false,
            };
            if replace {
                *info = Some((world_rank, message, placeholder));
            }
        }
        lock(&self.poison_tx).take();
    }

    fn poisoned(&self) -> Option<CommError> {
        if matches!(self.poison_rx.try_recv(), Err(TryRecvError::Disconnected)) {
            let (world_rank, message, _) = lock(&self.poison_info).clone().unwrap_or((
                usize::MAX,
                "unknown rank panicked".to_owned(),
                false,
            ));
            Some(CommError::Poisoned {
                world_rank,
                message,
            })
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// Collective lanes.

enum Body {
    Empty,
    F32(Vec<f32>),
    SharedF32(Arc<Vec<f32>>),
    SharedBytes(Arc<Vec<u8>>),
    Words(Vec<u64>),
    Abort(CommError),
}

impl Body {
    fn bytes(&self) -> u64 {
        (match self {
            Body::Empty | Body::Abort(_) => 0,
            Body::F32(v) => v.len() * 4,
            Body::SharedF32(v) => v.len() * 4,
            Body::SharedBytes(v) => v.len(),
            Body::Words(v) => v.len() * 8,
        }) as u64
    }
}

struct Msg {
    seq: u64,
    op: OpKind,
    /// The sender's buffer length for this operation (elements or bytes).
    len: usize,
    body: Body,
}

/// One rank's end of one collective lane of a group.
struct Lane {
    rank: usize,
    size: usize,
    tx: Vec<Sender<Msg>>,
    rx: Vec<Receiver<Msg>>,
    seq: u64,
    shared: Arc<Shared>,
    stats: StatsRecorder,
    pool: Vec<Vec<f32>>,
    pool_bytes: usize,
    sent: u64,
    received: u64,
}

impl Lane {
    /// Runs one collective: poison check, statistics, abort broadcast on failure.
    fn run<T>(&mut self, kind: OpKind, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
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

    fn send(&mut self, to: usize, op: OpKind, len: usize, body: Body) -> Result<()> {
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
    fn recv(&mut self, from: usize, op: OpKind, my_len: Option<usize>) -> Result<Body> {
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

    fn recv_f32(
        &mut self,
        from: usize,
        op: OpKind,
        my_len: usize,
        want: usize,
    ) -> Result<Vec<f32>> {
        match self.recv(from, op, Some(my_len))? {
            Body::F32(v) if v.len() == want => Ok(v),
            _ => Err(protocol(op, from)),
        }
    }

    fn take_vec(&mut self, cap: usize) -> Vec<f32> {
        match self.pool.pop() {
            Some(mut v) => {
                self.pool_bytes -= v.capacity() * 4;
                v.clear();
                v.reserve(cap);
                v
            }
            None => Vec::with_capacity(cap),
        }
    }

    fn recycle(&mut self, v: Vec<f32>) {
        let b = v.capacity() * 4;
        if self.pool_bytes + b <= self.shared.config.pool_bytes {
            self.pool_bytes += b;
            self.pool.push(v);
        }
    }

    fn copy_msg(&mut self, data: &[f32]) -> Vec<f32> {
        let mut m = self.take_vec(data.len());
        m.extend_from_slice(data);
        m
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        let ring = match self.shared.config.all_reduce {
            AllReduceChoice::Ring => true,
            AllReduceChoice::RecursiveDoubling => false,
            AllReduceChoice::Auto => buf.len() * 4 >= self.shared.config.ring_threshold_bytes,
        };
        if ring {
            self.ring(RingBuf::InPlace(buf), op, OpKind::AllReduce)
        } else {
            self.recursive_doubling(buf, op)
        }
    }

    fn seg_elems(&self) -> usize {
        (self.shared.config.segment_bytes / 4).max(1)
    }

    /// Ring reduce-scatter (and, for `InPlace`, all-gather). At reduce-scatter step `k` rank
    /// `r` receives chunk `(r - k - 2) mod n`, so it ends with chunk `r` fully reduced.
    fn ring(&mut self, mut b: RingBuf<'_>, op: ReduceOp, kind: OpKind) -> Result<()> {
        let n = self.size;
        let r = self.rank;
        let len = b.len();
        let left = (r + n - 1) % n;
        let right = (r + 1) % n;
        let seg = self.seg_elems();
        let nseg = chunk_len(len, n, 0).div_ceil(seg).max(1);
        let segr = |c: usize, j: usize| -> Range<usize> {
            let cr = chunk_range(len, n, c);
            let s = (cr.start + j * seg).min(cr.end);
            s..(s + seg).min(cr.end)
        };
        let all_gather = matches!(b, RingBuf::InPlace(_));
        // Step 0 sends its own chunk with at most `WINDOW` segments ahead of what this rank
        // has consumed, so segments are read back while still in cache rather than the
        // whole chunk being staged through memory first. The receiver reads step-major, so
        // messages this rank forwards during step 0 wait until its step-0 sends are done.
        const WINDOW: usize = 4;
        let c0 = (r + n - 1) % n;
        let mut next0 = 0;
        while next0 < nseg.min(WINDOW) {
            let m = self.copy_msg(&b.input()[segr(c0, next0)]);
            self.send(right, kind, len, Body::F32(m))?;
            next0 += 1;
        }
        let mut held: Vec<Vec<f32>> = Vec::new();
        for k in 0..n - 1 {
            let c = (r + 2 * n - k - 2) % n;
            let last = k == n - 2;
            for j in 0..nseg {
                if next0 < nseg {
                    let m = self.copy_msg(&b.input()[segr(c0, next0)]);
                    self.send(right, kind, len, Body::F32(m))?;
                    next0 += 1;
                }
                let rg = segr(c, j);
                let mut m = self.recv_f32(left, kind, len, rg.len())?;
                let forward = if !last {
                    combine_into(&mut m, &b.input()[rg], op);
                    Some(m)
                } else {
                    match &mut b {
                        RingBuf::InPlace(buf) => {
                            combine_final_both(&mut m, &mut buf[rg], op, n);
                            Some(m)
                        }
                        RingBuf::Scatter { input, output } => {
                            let off = chunk_range(len, n, r).start;
                            let out = &mut output[rg.start - off..rg.end - off];
                            combine_final_into(out, &m, &input[rg], op, n);
                            self.recycle(m);
                            None
                        }
                    }
                };
                if let Some(m) = forward {
                    if next0 < nseg {
                        held.push(m);
                    } else {
                        for h in held.drain(..) {
                            self.send(right, kind, len, Body::F32(h))?;
                        }
                        self.send(right, kind, len, Body::F32(m))?;
                    }
                }
            }
        }
        if let (true, RingBuf::InPlace(buf)) = (all_gather, b) {
            for k in 0..n - 1 {
                let c = (r + n - k - 1) % n;
                for j in 0..nseg {
                    let rg = segr(c, j);
                    let m = self.recv_f32(left, kind, len, rg.len())?;
                    buf[rg].copy_from_slice(&m);
                    if k < n - 2 {
                        self.send(right, kind, len, Body::F32(m))?;
                    } else {
                        self.recycle(m);
                    }
                }
            }
        }
        Ok(())
    }

    /// Recursive doubling; ranks beyond the largest power of two fold into a partner first
    /// and get the result back at the end. Both partners compute `mine (op) theirs` from the
    /// same two operands, so all ranks end bit-identical.
    fn recursive_doubling(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let kind = OpKind::AllReduce;
        let n = self.size;
        let r = self.rank;
        let len = buf.len();
        let pof2 = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let extra = n - pof2;
        if r >= pof2 {
            let m = self.copy_msg(buf);
            self.send(r - pof2, kind, len, Body::F32(m))?;
            let m = self.recv_f32(r - pof2, kind, len, len)?;
            buf.copy_from_slice(&m);
            self.recycle(m);
            return Ok(());
        }
        if r < extra {
            let m = self.recv_f32(r + pof2, kind, len, len)?;
            combine_into(buf, &m, op);
            self.recycle(m);
        }
        let mut mask = 1;
        while mask < pof2 {
            let partner = r ^ mask;
            let m = self.copy_msg(buf);
            self.send(partner, kind, len, Body::F32(m))?;
            let m = self.recv_f32(partner, kind, len, len)?;
            combine_into(buf, &m, op);
            self.recycle(m);
            mask <<= 1;
        }
        finish_avg(buf, op, n);
        if r < extra {
            let m = self.copy_msg(buf);
            self.send(r + pof2, kind, len, Body::F32(m))?;
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        let want = chunk_len(input.len(), self.size, self.rank);
        if output.len() != want {
            return Err(CommError::BadLength {
                op: OpKind::ReduceScatter,
                what: "output",
                expected: want,
                got: output.len(),
            });
        }
        if self.size == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        self.ring(
            RingBuf::Scatter { input, output },
            op,
            OpKind::ReduceScatter,
        )
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let (n, r, len) = (self.size, self.rank, input.len());
        if output.len() != n * len {
            return Err(CommError::BadLength {
                op: OpKind::AllGather,
                what: "output",
                expected: n * len,
                got: output.len(),
            });
        }
        output[r * len..(r + 1) * len].copy_from_slice(input);
        if n == 1 {
            return Ok(());
        }
        let shared = Arc::new(input.to_vec());
        for p in (0..n).filter(|&p| p != r) {
            self.send(
                p,
                OpKind::AllGather,
                len,
                Body::SharedF32(Arc::clone(&shared)),
            )?;
        }
        // Receive from everyone before judging lengths, so that every rank reports the same
        // mismatch (rank 0 against the first rank that differs from it).
        let mut got: Vec<(usize, Arc<Vec<f32>>)> = Vec::with_capacity(n - 1);
        for p in (0..n).filter(|&p| p != r) {
            match self.recv(p, OpKind::AllGather, None)? {
                Body::SharedF32(v) => got.push((p, v)),
                _ => return Err(protocol(OpKind::AllGather, p)),
            }
        }
        let len_of = |q: usize| -> usize {
            if q == r {
                len
            } else {
                got.iter()
                    .find(|(p, _)| *p == q)
                    .map_or(0, |(_, v)| v.len())
            }
        };
        if let Some(q) = (1..n).find(|&q| len_of(q) != len_of(0)) {
            return Err(CommError::SizeMismatch {
                op: OpKind::AllGather,
                rank: 0,
                len: len_of(0),
                peer: q,
                peer_len: len_of(q),
            });
        }
        for (p, v) in got {
            output[p * len..(p + 1) * len].copy_from_slice(&v);
        }
        Ok(())
    }

    fn all_gatherv_bytes(&mut self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (n, r) = (self.size, self.rank);
        let kind = OpKind::AllGatherV;
        if n > 1 {
            let shared = Arc::new(input.to_vec());
            for p in (0..n).filter(|&p| p != r) {
                self.send(p, kind, input.len(), Body::SharedBytes(Arc::clone(&shared)))?;
            }
        }
        let mut out = Vec::with_capacity(n);
        for p in 0..n {
            if p == r {
                out.push(input.to_vec());
            } else {
                match self.recv(p, kind, None)? {
                    // The last holder of the payload takes it without a copy.
                    Body::SharedBytes(v) => {
                        out.push(Arc::try_unwrap(v).unwrap_or_else(|a| (*a).clone()))
                    }
                    _ => return Err(protocol(kind, p)),
                }
            }
        }
        Ok(out)
    }

    fn gather_words(&mut self, words: Vec<u64>) -> Result<Vec<Vec<u64>>> {
        let (n, r) = (self.size, self.rank);
        for p in (0..n).filter(|&p| p != r) {
            self.send(p, OpKind::Split, words.len(), Body::Words(words.clone()))?;
        }
        let mut out = Vec::with_capacity(n);
        for p in 0..n {
            if p == r {
                out.push(words.clone());
            } else {
                match self.recv(p, OpKind::Split, Some(words.len()))? {
                    Body::Words(w) => out.push(w),
                    _ => return Err(protocol(OpKind::Split, p)),
                }
            }
        }
        Ok(out)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let (n, r, len) = (self.size, self.rank, buf.len());
        let kind = OpKind::Broadcast;
        if r == root {
            if n > 1 {
                let shared = Arc::new(buf.to_vec());
                for p in (0..n).filter(|&p| p != r) {
                    self.send(p, kind, len, Body::SharedF32(Arc::clone(&shared)))?;
                }
            }
            return Ok(());
        }
        match self.recv(root, kind, Some(len))? {
            Body::SharedF32(v) if v.len() == len => buf.copy_from_slice(&v),
            _ => return Err(protocol(kind, root)),
        }
        Ok(())
    }

    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let kind = OpKind::Broadcast;
        if r == root {
            if n > 1 {
                let shared = Arc::new(buf.clone());
                for p in (0..n).filter(|&p| p != r) {
                    self.send(p, kind, buf.len(), Body::SharedBytes(Arc::clone(&shared)))?;
                }
            }
            return Ok(());
        }
        match self.recv(root, kind, None)? {
            Body::SharedBytes(v) => {
                buf.clear();
                buf.extend_from_slice(&v);
            }
            _ => return Err(protocol(kind, root)),
        }
        Ok(())
    }

    /// Dissemination barrier: in round `k` send to `r + 2^k`, receive from `r - 2^k`.
    fn barrier(&mut self) -> Result<()> {
        let (n, r) = (self.size, self.rank);
        let mut d = 1;
        while d < n {
            self.send((r + d) % n, OpKind::Barrier, 0, Body::Empty)?;
            self.recv((r + n - d) % n, OpKind::Barrier, None)?;
            d <<= 1;
        }
        Ok(())
    }
}

enum RingBuf<'a> {
    InPlace(&'a mut [f32]),
    Scatter {
        input: &'a [f32],
        output: &'a mut [f32],
    },
}

impl RingBuf<'_> {
    fn len(&self) -> usize {
        self.input().len()
    }

    fn input(&self) -> &[f32] {
        match self {
            RingBuf::InPlace(b) => b,
            RingBuf::Scatter { input, .. } => input,
        }
    }
}

fn protocol(op: OpKind, peer: usize) -> CommError {
    CommError::Internal(format!("{op}: unexpected message from rank {peer}"))
}

// ---------------------------------------------------------------------------------------
// Point-to-point lane.

enum P2pBody {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

struct P2pMsg {
    tag: u32,
    body: P2pBody,
}

/// Messages from one source: the channel, plus those pulled off it for other tags or later
/// receives. Receives posted for a `(src, tag)` are numbered (`posted`), messages arriving
/// for it too (`arrived`); receive `k` takes message `k`.
struct Mailbox {
    rx: Receiver<P2pMsg>,
    posted: HashMap<u32, u64>,
    arrived: HashMap<u32, u64>,
    stash: HashMap<(u32, u64), P2pBody>,
}

struct P2p {
    rank: usize,
    tx: Vec<Sender<P2pMsg>>,
    inbox: Vec<Mutex<Mailbox>>,
    shared: Arc<Shared>,
}

impl P2p {
    fn post(&self, src: usize, tag: u32) -> u64 {
        let mut mb = lock(&self.inbox[src]);
        let t = mb.posted.entry(tag).or_insert(0);
        *t += 1;
        *t - 1
    }

    fn stash(mb: &mut Mailbox, msg: P2pMsg) {
        let a = mb.arrived.entry(msg.tag).or_insert(0);
        let idx = *a;
        *a += 1;
        mb.stash.insert((msg.tag, idx), msg.body);
    }

    /// Non-blocking: the body of receive `ticket`, if it has arrived.
    fn poll(&self, src: usize, tag: u32, ticket: u64) -> Option<Result<P2pBody>> {
        if let Some(e) = self.shared.poisoned() {
            return Some(Err(e));
        }
        let mut mb = lock(&self.inbox[src]);
        loop {
            if let Some(b) = mb.stash.remove(&(tag, ticket)) {
                return Some(Ok(b));
            }
            match mb.rx.try_recv() {
                Ok(m) => Self::stash(&mut mb, m),
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => {
                    return Some(Err(CommError::PeerLost {
                        rank: src,
                        op: OpKind::Recv,
                    }))
                }
            }
        }
    }

    /// Blocking: waits (at most the timeout per wait) for receive `ticket`.
    fn wait(&self, src: usize, tag: u32, ticket: u64) -> Result<P2pBody> {
        let timeout = self.shared.config.timeout;
        let deadline = Instant::now() + timeout;
        // Held while blocking: one thread at a time pulls from a source; others find their
        // messages in the stash once it lets go.
        let mut mb = lock(&self.inbox[src]);
        loop {
            if let Some(b) = mb.stash.remove(&(tag, ticket)) {
                return Ok(b);
            }
            let msg = select! {
                recv(mb.rx) -> m => match m {
                    Ok(m) => m,
                    Err(_) => {
                        return Err(self
                            .shared
                            .poisoned()
                            .unwrap_or(CommError::PeerLost { rank: src, op: OpKind::Recv }))
                    }
                },
                recv(self.shared.poison_rx) -> _ => {
                    return Err(self.shared.poisoned().unwrap_or(CommError::Internal(
                        "poison channel fired without poison".to_owned(),
                    )))
                }
                default(deadline.saturating_duration_since(Instant::now())) => {
                    return Err(CommError::Timeout { rank: src, op: OpKind::Recv, after: timeout })
                }
            };
            Self::stash(&mut mb, msg);
        }
    }

    fn send(&self, dst: usize, tag: u32, body: P2pBody) -> Result<()> {
        if let Some(e) = self.shared.poisoned() {
            return Err(e);
        }
        self.tx[dst].send(P2pMsg { tag, body }).map_err(|_| {
            self.shared.poisoned().unwrap_or(CommError::PeerLost {
                rank: dst,
                op: OpKind::Send,
            })
        })
    }

    fn expect_f32(&self, src: usize, tag: u32, body: P2pBody, len: usize) -> Result<Vec<f32>> {
        match body {
            P2pBody::F32(v) if v.len() == len => Ok(v),
            P2pBody::F32(v) => Err(CommError::SizeMismatch {
                op: OpKind::Recv,
                rank: self.rank,
                len,
                peer: src,
                peer_len: v.len(),
            }),
            P2pBody::Bytes(_) => Err(CommError::InvalidArgument(format!(
                "rank {src} sent bytes with tag {tag}, rank {} expected f32",
                self.rank
            ))),
        }
    }
}

struct IrecvCompletion {
    p2p: Arc<P2p>,
    src: usize,
    tag: u32,
    ticket: u64,
    len: usize,
    stats: StatsRecorder,
    start: Instant,
}

impl IrecvCompletion {
    fn finish(&self, r: Result<P2pBody>) -> Result<Vec<f32>> {
        let v = self.p2p.expect_f32(self.src, self.tag, r?, self.len)?;
        self.stats
            .record(OpKind::Recv, 0, (v.len() * 4) as u64, self.start.elapsed());
        Ok(v)
    }
}

impl Completion<Vec<f32>> for IrecvCompletion {
    fn poll(&mut self) -> Option<Result<Vec<f32>>> {
        let r = self.p2p.poll(self.src, self.tag, self.ticket)?;
        Some(self.finish(r))
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        let r = self.p2p.wait(self.src, self.tag, self.ticket);
        self.finish(r)
    }
}

// ---------------------------------------------------------------------------------------
// Progress thread for non-blocking collectives.

struct Job {
    buf: Vec<f32>,
    op: ReduceOp,
    reply: Sender<Result<Vec<f32>>>,
}

enum Worker {
    Idle(Box<Lane>),
    Running(Sender<Job>),
    Failed,
}

struct JobCompletion {
    rx: Receiver<Result<Vec<f32>>>,
}

fn worker_gone() -> CommError {
    CommError::Internal("the progress thread ended before answering".to_owned())
}

impl Completion<Vec<f32>> for JobCompletion {
    fn poll(&mut self) -> Option<Result<Vec<f32>>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(worker_gone())),
        }
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        // The worker answers every job: each of its waits is bounded by the timeout.
        self.rx.recv().unwrap_or_else(|_| Err(worker_gone()))
    }
}

// ---------------------------------------------------------------------------------------
// Communicator.

/// One rank of a local cluster (or of a group split from one).
pub struct LocalCommunicator {
    rank: usize,
    size: usize,
    group_id: u64,
    /// World (cluster) rank of each member.
    members: Arc<Vec<usize>>,
    shared: Arc<Shared>,
    lane: RefCell<Lane>,
    worker: RefCell<Worker>,
    p2p: Arc<P2p>,
    stats: StatsRecorder,
    splits: Cell<u64>,
}

impl std::fmt::Debug for LocalCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCommunicator")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("group_id", &self.group_id)
            .field("world_rank", &self.world_rank())
            .finish()
    }
}

impl Drop for LocalCommunicator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Runs before the channels close, so peers see the poison, not a lost peer.
            self.shared.poison(
                self.world_rank(),
                format!(
                    "world rank {} panicked while holding its communicator",
                    self.world_rank()
                ),
                true,
            );
        }
    }
}

/// Both ends of a full matrix of channels: `tx[src][dst]` and `rx[dst][src]`.
struct Matrix<T> {
    tx: Vec<Vec<Sender<T>>>,
    rx: Vec<Vec<Receiver<T>>>,
}

fn matrix<T>(m: usize) -> Matrix<T> {
    let mut tx: Vec<Vec<Sender<T>>> = (0..m).map(|_| Vec::with_capacity(m)).collect();
    let mut rx: Vec<Vec<Receiver<T>>> = (0..m).map(|_| Vec::with_capacity(m)).collect();
    // Sources in ascending order, so rx[dst] ends up indexed by source.
    for row in tx.iter_mut() {
        for rx_row in rx.iter_mut() {
            let (s, r) = unbounded();
            row.push(s);
            rx_row.push(r);
        }
    }
    Matrix { tx, rx }
}

fn build_group(shared: &Arc<Shared>, members: Vec<usize>) -> Vec<LocalCommunicator> {
    let m = members.len();
    let group_id = shared.next_group.fetch_add(1, Ordering::Relaxed);
    let members = Arc::new(members);
    let Matrix { tx: btx, rx: brx } = matrix::<Msg>(m);
    let Matrix { tx: wtx, rx: wrx } = matrix::<Msg>(m);
    let Matrix { tx: ptx, rx: prx } = matrix::<P2pMsg>(m);
    let lanes =
        |tx: Vec<Vec<Sender<Msg>>>, rx: Vec<Vec<Receiver<Msg>>>, stats: &[StatsRecorder]| {
            tx.into_iter()
                .zip(rx)
                .enumerate()
                .map(|(rank, (tx, rx))| Lane {
                    rank,
                    size: m,
                    tx,
                    rx,
                    seq: 0,
                    shared: Arc::clone(shared),
                    stats: stats[rank].clone(),
                    pool: Vec::new(),
                    pool_bytes: 0,
                    sent: 0,
                    received: 0,
                })
                .collect::<Vec<_>>()
        };
    let stats: Vec<StatsRecorder> = (0..m).map(|_| StatsRecorder::new(false)).collect();
    let blocking = lanes(btx, brx, &stats);
    let workers = lanes(wtx, wrx, &stats);
    blocking
        .into_iter()
        .zip(workers)
        .zip(ptx.into_iter().zip(prx))
        .enumerate()
        .map(|(rank, ((lane, wlane), (ptx, prx)))| LocalCommunicator {
            rank,
            size: m,
            group_id,
            members: Arc::clone(&members),
            shared: Arc::clone(shared),
            lane: RefCell::new(lane),
            worker: RefCell::new(Worker::Idle(Box::new(wlane))),
            p2p: Arc::new(P2p {
                rank,
                tx: ptx,
                inbox: prx
                    .into_iter()
                    .map(|rx| {
                        Mutex::new(Mailbox {
                            rx,
                            posted: HashMap::new(),
                            arrived: HashMap::new(),
                            stash: HashMap::new(),
                        })
                    })
                    .collect(),
                shared: Arc::clone(shared),
            }),
            stats: stats[rank].clone(),
            splits: Cell::new(0),
        })
        .collect()
}

impl LocalCommunicator {
    /// This rank's rank in the cluster it was split from (the world).
    pub fn world_rank(&self) -> usize {
        self.members[self.rank]
    }

    /// World ranks of all members, in group rank order.
    pub fn world_ranks(&self) -> &[usize] {
        &self.members
    }

    /// The cluster's configuration.
    pub fn config(&self) -> &LocalConfig {
        &self.shared.config
    }

    /// `split` returning the concrete type.
    pub fn split_local(&self, color: u32, key: u32) -> Result<LocalCommunicator> {
        let seq = self.splits.get();
        self.splits.set(seq + 1);
        let all = self.lane.borrow_mut().run(OpKind::Split, |l| {
            l.gather_words(vec![u64::from(color), u64::from(key)])
        })?;
        let mut chosen: Vec<(u64, usize)> = all
            .iter()
            .enumerate()
            .filter(|(_, w)| w.first() == Some(&u64::from(color)))
            .map(|(p, w)| (w.get(1).copied().unwrap_or(0), p))
            .collect();
        chosen.sort_unstable();
        let new_rank = chosen
            .iter()
            .position(|&(_, p)| p == self.rank)
            .ok_or_else(|| CommError::Internal("split: own rank missing from its color".into()))?;
        let world: Vec<usize> = chosen.iter().map(|&(_, p)| self.members[p]).collect();
        let key = (self.group_id, seq, color);
        let mut pending = lock(&self.shared.pending_splits);
        let entry = pending.entry(key).or_insert_with(|| {
            let comms = build_group(&self.shared, world.clone());
            PendingSplit {
                left: comms.len(),
                comms: comms.into_iter().map(Some).collect(),
            }
        });
        let comm = entry
            .comms
            .get_mut(new_rank)
            .and_then(Option::take)
            .ok_or_else(|| CommError::Internal("split: communicator already taken".into()))?;
        entry.left -= 1;
        if entry.left == 0 {
            pending.remove(&key);
        }
        Ok(comm)
    }

    fn start_worker(&self) -> Result<Sender<Job>> {
        let mut w = self.worker.borrow_mut();
        if let Worker::Running(tx) = &*w {
            return Ok(tx.clone());
        }
        let Worker::Idle(mut lane) = std::mem::replace(&mut *w, Worker::Failed) else {
            return Err(CommError::Internal(
                "the progress thread could not be started".into(),
            ));
        };
        let (tx, rx) = unbounded::<Job>();
        std::thread::Builder::new()
            .name(format!("meshrec-comm-g{}-r{}", self.group_id, self.rank))
            .spawn(move || {
                for job in rx {
                    let Job { mut buf, op, reply } = job;
                    let r = lane
                        .run(OpKind::AllReduce, |l| l.all_reduce(&mut buf, op))
                        .map(|()| buf);
                    let _ = reply.send(r);
                }
            })
            .map_err(|e| CommError::Internal(format!("spawning the progress thread: {e}")))?;
        *w = Worker::Running(tx.clone());
        Ok(tx)
    }
}

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.lane
            .borrow_mut()
            .run(OpKind::AllReduce, |l| l.all_reduce(buf, op))
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        self.lane.borrow_mut().run(OpKind::ReduceScatter, |l| {
            l.reduce_scatter(input, output, op)
        })
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        self.lane
            .borrow_mut()
            .run(OpKind::AllGather, |l| l.all_gather(input, output))
    }

    fn all_gatherv_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.lane
            .borrow_mut()
            .run(OpKind::AllGatherV, |l| l.all_gatherv_bytes(input))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.lane.borrow_mut().run(OpKind::Broadcast, |l| {
            check_rank("root", root, l.size)?;
            l.broadcast(buf, root)
        })
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.lane.borrow_mut().run(OpKind::Broadcast, |l| {
            check_rank("root", root, l.size)?;
            l.broadcast_bytes(buf, root)
        })
    }

    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> Result<()> {
        self.isend(dst, tag, data.to_vec())?.wait()
    }

    fn recv(&self, src: usize, tag: u32, buf: &mut [f32]) -> Result<()> {
        let v = self.irecv(src, tag, buf.len())?.wait()?;
        buf.copy_from_slice(&v);
        Ok(())
    }

    fn send_bytes(&self, dst: usize, tag: u32, data: &[u8]) -> Result<()> {
        check_rank("destination", dst, self.size)?;
        let t0 = Instant::now();
        self.p2p.send(dst, tag, P2pBody::Bytes(data.to_vec()))?;
        self.stats
            .record(OpKind::Send, data.len() as u64, 0, t0.elapsed());
        Ok(())
    }

    fn recv_bytes(&self, src: usize, tag: u32) -> Result<Vec<u8>> {
        check_rank("source", src, self.size)?;
        let t0 = Instant::now();
        let ticket = self.p2p.post(src, tag);
        match self.p2p.wait(src, tag, ticket)? {
            P2pBody::Bytes(b) => {
                self.stats
                    .record(OpKind::Recv, 0, b.len() as u64, t0.elapsed());
                Ok(b)
            }
            P2pBody::F32(_) => Err(CommError::InvalidArgument(format!(
                "rank {src} sent f32 with tag {tag}, rank {} expected bytes",
                self.rank
            ))),
        }
    }

    fn barrier(&self) -> Result<()> {
        self.lane.borrow_mut().run(OpKind::Barrier, Lane::barrier)
    }

    fn iall_reduce(&self, buf: Vec<f32>, op: ReduceOp) -> Result<Request<Vec<f32>>> {
        if let Some(e) = self.shared.poisoned() {
            return Err(e);
        }
        if self.size == 1 {
            self.stats.record(OpKind::AllReduce, 0, 0, Duration::ZERO);
            return Ok(Request::ready(Ok(buf)));
        }
        let tx = self.start_worker()?;
        let (reply, rx) = crossbeam_channel::bounded(1);
        tx.send(Job { buf, op, reply }).map_err(|_| worker_gone())?;
        Ok(Request::pending(Box::new(JobCompletion { rx })))
    }

    fn isend(&self, dst: usize, tag: u32, data: Vec<f32>) -> Result<Request<()>> {
        check_rank("destination", dst, self.size)?;
        // Eager: the message moves into the receiver's unbounded channel, so the send is
        // complete once queued.
        let t0 = Instant::now();
        let bytes = (data.len() * 4) as u64;
        self.p2p.send(dst, tag, P2pBody::F32(data))?;
        self.stats.record(OpKind::Send, bytes, 0, t0.elapsed());
        Ok(Request::ready(Ok(())))
    }

    fn irecv(&self, src: usize, tag: u32, len: usize) -> Result<Request<Vec<f32>>> {
        check_rank("source", src, self.size)?;
        let ticket = self.p2p.post(src, tag);
        Ok(Request::pending(Box::new(IrecvCompletion {
            p2p: Arc::clone(&self.p2p),
            src,
            tag,
            ticket,
            len,
            stats: self.stats.clone(),
            start: Instant::now(),
        })))
    }

    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(self.split_local(color, key)?))
    }

    fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    fn reset_stats(&self) {
        self.stats.reset();
    }
}

// ---------------------------------------------------------------------------------------
// Cluster.

/// A group of `n` local ranks (threads of this process).
#[derive(Debug)]
pub struct LocalCluster {
    comms: Vec<LocalCommunicator>,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

impl LocalCluster {
    /// A cluster of `n >= 1` ranks with the default configuration.
    pub fn new(n: usize) -> Result<Self> {
        Self::with_config(n, LocalConfig::default())
    }

    /// A cluster of `n >= 1` ranks.
    pub fn with_config(n: usize, config: LocalConfig) -> Result<Self> {
        if n == 0 {
            return Err(CommError::InvalidArgument(
                "a local cluster needs at least one rank".into(),
            ));
        }
        if config.segment_bytes < 4 {
            return Err(CommError::InvalidArgument(format!(
                "segment_bytes {} is below one f32",
                config.segment_bytes
            )));
        }
        let shared = Shared::new(config);
        Ok(Self {
            comms: build_group(&shared, (0..n).collect()),
        })
    }

    /// The `n` communicators, rank order; hand each to its own thread.
    pub fn into_communicators(self) -> Vec<LocalCommunicator> {
        self.comms
    }

    /// Runs `f` on `n` scoped threads, one per rank, with the default configuration, and
    /// returns the results in rank order. A panicking rank poisons the group (the others'
    /// calls fail with `CommError::Poisoned`) and makes this return `RankPanicked`.
    pub fn run<T, F>(n: usize, f: F) -> Result<Vec<T>, ClusterError>
    where
        T: Send,
        F: Fn(LocalCommunicator) -> T + Sync,
    {
        Self::run_with_config(n, LocalConfig::default(), f)
    }

    /// [`LocalCluster::run`] with a configuration.
    pub fn run_with_config<T, F>(
        n: usize,
        config: LocalConfig,
        f: F,
    ) -> Result<Vec<T>, ClusterError>
    where
        T: Send,
        F: Fn(LocalCommunicator) -> T + Sync,
    {
        let comms = Self::with_config(n, config)?.into_communicators();
        let f = &f;
        let results: Vec<std::thread::Result<T>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let shared = Arc::clone(&c.shared);
                    let rank = c.rank;
                    s.spawn(move || {
                        let r = catch_unwind(AssertUnwindSafe(|| f(c)));
                        if let Err(p) = &r {
                            shared.poison(rank, panic_message(p.as_ref()), false);
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(Err))
                .collect()
        });
        let mut out = Vec::with_capacity(n);
        let mut first_panic = None;
        for (rank, r) in results.into_iter().enumerate() {
            match r {
                Ok(v) => out.push(v),
                Err(p) => {
                    if first_panic.is_none() {
                        first_panic = Some(ClusterError::RankPanicked {
                            rank,
                            message: panic_message(p.as_ref()),
                        });
                    }
                }
            }
        }
        match first_panic {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}
