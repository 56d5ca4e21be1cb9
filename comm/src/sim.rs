//! The `sim` engine: wraps any communicator, lets it move the real data, and advances a
//! per-rank *virtual* clock by the modelled cost of every operation (formulas of
//! [`crate::cost`], link classes of a [`Topology`]), counting modelled bytes per link class.
//! It is how a cluster is emulated on one machine: everything it reports is modelled, not
//! measured.
//!
//! Clock rules:
//! * Compute is charged by the caller with [`SimClock::advance`].
//! * A blocking collective starts when the last rank arrives (`max` of the ranks' clocks,
//!   exchanged through the inner engine) and ends `cost` later on every rank.
//! * A non-blocking all-reduce runs on a per-rank communication stream: it starts at the max
//!   over ranks of `max(clock, stream free)`, and `wait` moves the clock to its end if that
//!   is later (so compute issued meanwhile overlaps it). The start times are exchanged when
//!   the operation is issued, which synchronises the ranks' real threads at that point.
//! * A message leaves when sent (the sender is busy for `p2p_time`) and is available to the
//!   receiver at `send time + p2p_time`; the send time travels with the message.
//!
//! Collectives are charged on the group's bottleneck link ([`Topology::group_link`]);
//! their bytes are the per-rank bytes of the algorithm, booked on the class of the link to
//! the rank's ring successor.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::communicator::Communicator;
use crate::cost::{self, LinkClass, LinkKind, Topology};
use crate::dtype::{check_reduction, elems_of, DType};
use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::request::{Completion, Request};
use crate::stats::{CommStats, OpKind};

/// What a rank's virtual clock has accumulated (all modelled).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimSnapshot {
    /// Virtual time of the rank, seconds.
    pub now_s: f64,
    /// When the rank's communication stream is next free, seconds.
    pub comm_free_s: f64,
    /// Modelled communication time charged to this rank, seconds.
    pub comm_s: f64,
    /// Compute time charged through [`SimClock::advance`], seconds.
    pub compute_s: f64,
    /// Modelled bytes this rank sent, per link class.
    pub bytes_sent: BTreeMap<LinkKind, u64>,
}

/// One rank's virtual clock, shared by every communicator of that rank (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct SimClock {
    inner: Arc<Mutex<SimSnapshot>>,
}

impl SimClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut SimSnapshot) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Charges `seconds` of compute to this rank.
    pub fn advance(&self, seconds: f64) {
        self.with(|s| {
            s.now_s += seconds.max(0.0);
            s.compute_s += seconds.max(0.0);
        });
    }

    /// The rank's virtual time, seconds.
    pub fn now(&self) -> f64 {
        self.with(|s| s.now_s)
    }

    /// A copy of everything accumulated.
    pub fn snapshot(&self) -> SimSnapshot {
        self.with(|s| s.clone())
    }

    fn book_bytes(&self, kind: LinkKind, bytes: f64) {
        self.with(|s| *s.bytes_sent.entry(kind).or_insert(0) += bytes.max(0.0).round() as u64);
    }
}

/// A communicator whose operations also advance a virtual clock (see the module docs).
pub struct SimCommunicator {
    inner: Box<dyn Communicator>,
    topology: Topology,
    /// Global device of each rank of this group.
    devices: Vec<usize>,
    clock: SimClock,
}

impl std::fmt::Debug for SimCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCommunicator")
            .field("rank", &self.inner.rank())
            .field("devices", &self.devices)
            .field("clock", &self.clock.snapshot())
            .finish()
    }
}

fn encode_time(t: f64) -> [f32; 2] {
    let b = t.to_bits();
    [f32::from_bits((b >> 32) as u32), f32::from_bits(b as u32)]
}

fn decode_time(w: &[f32]) -> f64 {
    f64::from_bits((u64::from(w[0].to_bits()) << 32) | u64::from(w[1].to_bits()))
}

impl SimCommunicator {
    /// Wraps `inner`; rank `r` of `inner` is global device `r` of `topology`.
    pub fn new(inner: Box<dyn Communicator>, topology: Topology) -> Result<Self> {
        let devices = (0..inner.size()).collect();
        Self::with_devices(inner, topology, devices, SimClock::new())
    }

    /// Wraps `inner` whose rank `r` is global device `devices[r]`, charging `clock`.
    pub fn with_devices(
        inner: Box<dyn Communicator>,
        topology: Topology,
        devices: Vec<usize>,
        clock: SimClock,
    ) -> Result<Self> {
        if devices.len() != inner.size() {
            return Err(CommError::InvalidArgument(format!(
                "sim: {} devices given for a group of {}",
                devices.len(),
                inner.size()
            )));
        }
        if topology.devices_per_node == 0
            || !topology.intra.is_valid()
            || !topology.inter.is_valid()
        {
            return Err(CommError::InvalidArgument(format!(
                "sim: invalid topology {topology:?}"
            )));
        }
        Ok(Self {
            inner,
            topology,
            devices,
            clock,
        })
    }

    /// This rank's clock (shared with communicators split from this one).
    pub fn clock(&self) -> &SimClock {
        &self.clock
    }

    /// Virtual time of this rank, seconds.
    pub fn virtual_time_s(&self) -> f64 {
        self.clock.now()
    }

    /// The global devices of this group, by rank.
    pub fn devices(&self) -> &[usize] {
        &self.devices
    }

    /// The bottleneck link of this group.
    pub fn group_link(&self) -> LinkClass {
        self.topology.group_link(&self.devices)
    }

    fn successor_kind(&self) -> LinkKind {
        let n = self.devices.len();
        let r = self.inner.rank();
        self.topology
            .link_kind(self.devices[r], self.devices[(r + 1) % n])
    }

    /// `split` returning the concrete type; the new group charges the same clock.
    pub fn split_sim(&self, color: u32, key: u32) -> Result<SimCommunicator> {
        let inner = self.inner.split(color, key)?;
        let me = self.devices[self.inner.rank()] as u64;
        let all = inner.all_gatherv_bytes(&me.to_le_bytes())?;
        let devices = all
            .iter()
            .map(|b| {
                <[u8; 8]>::try_from(b.as_slice())
                    .map(|a| u64::from_le_bytes(a) as usize)
                    .map_err(|_| CommError::Internal("sim: bad device id in split".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::with_devices(inner, self.topology, devices, self.clock.clone())
    }

    /// Max over ranks of `local` (one small all-gather on the inner engine).
    fn max_over_ranks(&self, local: f64) -> Result<f64> {
        if self.inner.size() == 1 {
            return Ok(local);
        }
        let all = self.inner.all_gatherv_bytes(&local.to_le_bytes())?;
        let mut m = local;
        for b in all {
            let a = <[u8; 8]>::try_from(b.as_slice())
                .map_err(|_| CommError::Internal("sim: bad clock message".into()))?;
            m = m.max(f64::from_le_bytes(a));
        }
        Ok(m)
    }

    /// Runs a blocking collective: synchronises clocks, charges `cost_s` and `bytes`.
    fn collective<T>(&self, cost_s: f64, bytes: f64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = self.max_over_ranks(self.clock.now())?;
        let r = f()?;
        let kind = self.successor_kind();
        self.clock.with(|s| {
            s.now_s = s.now_s.max(start + cost_s);
            s.comm_s += cost_s;
        });
        self.clock.book_bytes(kind, bytes);
        Ok(r)
    }

    fn n(&self) -> usize {
        self.inner.size()
    }

    /// Runs an all-reduce of `bytes` bytes (of whatever element type: the model charges
    /// bytes, so a narrower type costs proportionally less) and charges its model.
    fn all_reduce_charged(&self, bytes: usize, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let (n, s, l) = (self.n(), bytes as f64, self.group_link());
        let sent = match cost::all_reduce_algorithm(n, s, &l) {
            cost::AllReduceAlgorithm::Ring => cost::ring_all_reduce_bytes_per_rank(n, s),
            cost::AllReduceAlgorithm::RecursiveDoubling => {
                cost::recursive_doubling_all_reduce_bytes_per_rank(n, s)
            }
        };
        self.collective(cost::all_reduce_time(n, s, &l), sent, f)
    }

    /// Runs a reduce-scatter of an input of `bytes` bytes and charges its model.
    fn reduce_scatter_charged(&self, bytes: usize, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let (n, s, l) = (self.n(), bytes as f64, self.group_link());
        self.collective(
            cost::reduce_scatter_time(n, s, &l),
            cost::ring_gather_scatter_bytes_per_rank(n, s),
            f,
        )
    }

    fn p2p_link(&self, peer: usize) -> Result<(LinkKind, LinkClass)> {
        let d = *self.devices.get(peer).ok_or(CommError::InvalidRank {
            what: "peer",
            rank: peer,
            size: self.devices.len(),
        })?;
        let kind = self.topology.link_kind(self.devices[self.inner.rank()], d);
        Ok((kind, self.topology.link(kind)))
    }

    /// Charges a send of `bytes` to `dst`; returns the send time to put in the message.
    fn charge_send(&self, dst: usize, bytes: f64) -> Result<f64> {
        let (kind, link) = self.p2p_link(dst)?;
        let t = cost::p2p_time(bytes, &link);
        let start = self.clock.with(|s| {
            let start = s.now_s;
            s.now_s += t;
            s.comm_s += t;
            start
        });
        self.clock.book_bytes(kind, bytes);
        Ok(start)
    }

    fn charge_recv(clock: &SimClock, sent_at: f64, cost_s: f64) {
        clock.with(|s| s.now_s = s.now_s.max(sent_at + cost_s));
    }
}

struct SimIallReduce {
    inner: Request<Vec<f32>>,
    clock: SimClock,
    end: f64,
}

impl Completion<Vec<f32>> for SimIallReduce {
    fn poll(&mut self) -> Option<Result<Vec<f32>>> {
        if self.inner.test() {
            let r = std::mem::replace(&mut self.inner, Request::ready(Ok(Vec::new()))).wait();
            SimCommunicator::charge_recv(&self.clock, self.end, 0.0);
            Some(r)
        } else {
            None
        }
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        let r = self.inner.wait();
        SimCommunicator::charge_recv(&self.clock, self.end, 0.0);
        r
    }
}

struct SimIrecv {
    inner: Request<Vec<f32>>,
    clock: SimClock,
    link: LinkClass,
}

impl SimIrecv {
    fn finish(clock: &SimClock, link: &LinkClass, r: Result<Vec<f32>>) -> Result<Vec<f32>> {
        // The wire message carries two extra words (the send time); report user lengths.
        let mut v = r.map_err(|e| match e {
            CommError::SizeMismatch {
                op,
                rank,
                len,
                peer,
                peer_len,
            } => CommError::SizeMismatch {
                op,
                rank,
                len: len.saturating_sub(2),
                peer,
                peer_len: peer_len.saturating_sub(2),
            },
            e => e,
        })?;
        if v.len() < 2 {
            return Err(CommError::Internal(
                "sim: message without its send time".into(),
            ));
        }
        let sent_at = decode_time(&v[v.len() - 2..]);
        v.truncate(v.len() - 2);
        SimCommunicator::charge_recv(clock, sent_at, cost::p2p_time((v.len() * 4) as f64, link));
        Ok(v)
    }
}

impl Completion<Vec<f32>> for SimIrecv {
    fn poll(&mut self) -> Option<Result<Vec<f32>>> {
        if self.inner.test() {
            let r = std::mem::replace(&mut self.inner, Request::ready(Ok(Vec::new()))).wait();
            Some(Self::finish(&self.clock, &self.link, r))
        } else {
            None
        }
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        let r = self.inner.wait();
        Self::finish(&self.clock, &self.link, r)
    }
}

impl Communicator for SimCommunicator {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.all_reduce_charged(std::mem::size_of_val(buf), || {
            self.inner.all_reduce(buf, op)
        })
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        self.reduce_scatter_charged(std::mem::size_of_val(input), || {
            self.inner.reduce_scatter(input, output, op)
        })
    }

    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        // Checked before the clocks are exchanged, so a refused call costs no communication.
        check_reduction(OpKind::AllReduce, "buffer", dtype, op, buf.len())?;
        self.all_reduce_charged(buf.len(), || self.inner.all_reduce_bytes(buf, dtype, op))
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
        self.reduce_scatter_charged(input.len(), || {
            self.inner.reduce_scatter_bytes(input, output, dtype, op)
        })
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let (n, l) = (self.n(), self.group_link());
        let s = (input.len() * 4 * n) as f64;
        self.collective(
            cost::all_gather_time(n, s, &l),
            cost::ring_gather_scatter_bytes_per_rank(n, s),
            || self.inner.all_gather(input, output),
        )
    }

    fn all_gatherv_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        let start = self.max_over_ranks(self.clock.now())?;
        let out = self.inner.all_gatherv_bytes(input)?;
        let (n, l) = (self.n(), self.group_link());
        let total: usize = out.iter().map(Vec::len).sum();
        let cost_s = cost::all_gather_time(n, total as f64, &l);
        self.clock.with(|s| {
            s.now_s = s.now_s.max(start + cost_s);
            s.comm_s += cost_s;
        });
        // A rank forwards everything but its successor's own payload around the ring.
        self.clock.book_bytes(
            self.successor_kind(),
            (total - out[(self.rank() + 1) % n].len()) as f64,
        );
        Ok(out)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let (n, s, l) = (self.n(), (buf.len() * 4) as f64, self.group_link());
        let bytes = if self.rank() == root { s } else { 0.0 };
        self.collective(cost::broadcast_time(n, s, &l), bytes, || {
            self.inner.broadcast(buf, root)
        })
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let start = self.max_over_ranks(self.clock.now())?;
        let sent = buf.len();
        self.inner.broadcast_bytes(buf, root)?;
        let (n, s, l) = (self.n(), buf.len() as f64, self.group_link());
        let cost_s = cost::broadcast_time(n, s, &l);
        self.clock.with(|c| {
            c.now_s = c.now_s.max(start + cost_s);
            c.comm_s += cost_s;
        });
        if self.rank() == root {
            self.clock.book_bytes(self.successor_kind(), sent as f64);
        }
        Ok(())
    }

    fn send(&self, dst: usize, tag: u32, data: &[f32]) -> Result<()> {
        let sent_at = self.charge_send(dst, (data.len() * 4) as f64)?;
        let mut m = Vec::with_capacity(data.len() + 2);
        m.extend_from_slice(data);
        m.extend_from_slice(&encode_time(sent_at));
        self.inner.send(dst, tag, &m)
    }

    fn send_bytes(&self, dst: usize, tag: u32, data: &[u8]) -> Result<()> {
        let sent_at = self.charge_send(dst, data.len() as f64)?;
        let mut m = Vec::with_capacity(data.len() + 8);
        m.extend_from_slice(data);
        m.extend_from_slice(&sent_at.to_le_bytes());
        self.inner.send_bytes(dst, tag, &m)
    }

    fn recv_bytes(&self, src: usize, tag: u32) -> Result<Vec<u8>> {
        let (_, link) = self.p2p_link(src)?;
        let mut v = self.inner.recv_bytes(src, tag)?;
        if v.len() < 8 {
            return Err(CommError::Internal(
                "sim: message without its send time".into(),
            ));
        }
        let at = v.len() - 8;
        let sent_at = <[u8; 8]>::try_from(&v[at..])
            .map(f64::from_le_bytes)
            .unwrap_or(0.0);
        v.truncate(at);
        Self::charge_recv(&self.clock, sent_at, cost::p2p_time(v.len() as f64, &link));
        Ok(v)
    }

    fn barrier(&self) -> Result<()> {
        let (n, l) = (self.n(), self.group_link());
        self.collective(cost::barrier_time(n, &l), 0.0, || self.inner.barrier())
    }

    fn iall_reduce(&self, buf: Vec<f32>, op: ReduceOp) -> Result<Request<Vec<f32>>> {
        let (n, s, l) = (self.n(), (buf.len() * 4) as f64, self.group_link());
        let ready = self.clock.with(|c| c.now_s.max(c.comm_free_s));
        let start = self.max_over_ranks(ready)?;
        let cost_s = cost::all_reduce_time(n, s, &l);
        let end = start + cost_s;
        self.clock.with(|c| {
            c.comm_free_s = end;
            c.comm_s += cost_s;
        });
        self.clock.book_bytes(
            self.successor_kind(),
            cost::ring_all_reduce_bytes_per_rank(n, s),
        );
        let inner = self.inner.iall_reduce(buf, op)?;
        Ok(Request::pending(Box::new(SimIallReduce {
            inner,
            clock: self.clock.clone(),
            end,
        })))
    }

    fn isend(&self, dst: usize, tag: u32, data: Vec<f32>) -> Result<Request<()>> {
        let sent_at = self.charge_send(dst, (data.len() * 4) as f64)?;
        let mut m = data;
        m.extend_from_slice(&encode_time(sent_at));
        self.inner.isend(dst, tag, m)
    }

    fn irecv(&self, src: usize, tag: u32, len: usize) -> Result<Request<Vec<f32>>> {
        let (_, link) = self.p2p_link(src)?;
        let inner = self.inner.irecv(src, tag, len + 2)?;
        Ok(Request::pending(Box::new(SimIrecv {
            inner,
            clock: self.clock.clone(),
            link,
        })))
    }

    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(self.split_sim(color, key)?))
    }

    fn stats(&self) -> CommStats {
        self.inner.stats()
    }

    fn reset_stats(&self) {
        self.inner.reset_stats();
    }
}
