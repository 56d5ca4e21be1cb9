//! `LocalCommunicator`, one rank of a group: builds a group's lanes (blocking collectives,
//! the progress thread's collectives, point-to-point), splits groups, and implements
//! [`Communicator`] by running each operation's algorithm on the right lane.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::board::Board;
use super::config::LocalConfig;
use super::lane::{Lane, Msg};
use super::p2p::{self, P2p, P2pBody, P2pMsg};
use super::progress::Worker;
use super::shared::{lock, AbortHandle, Shared};
use super::{barrier, broadcast, gather, reduction};
use crate::communicator::{check_rank, Communicator};
use crate::dtype::DType;
use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::request::Request;
use crate::stats::{CommStats, OpKind, StatsRecorder};

/// Communicators a `split` has built, waiting for their ranks to collect them; keyed by
/// (parent group, the parent's split count, color). Cluster-wide, like group ids.
type PendingSplits = Mutex<HashMap<(u64, u64, u32), PendingSplit>>;

struct PendingSplit {
    comms: Vec<Option<LocalCommunicator>>,
    left: usize,
}

/// One rank of a local cluster (or of a group split from one).
pub struct LocalCommunicator {
    rank: usize,
    size: usize,
    group_id: u64,
    /// World (cluster) rank of each member.
    members: Arc<Vec<usize>>,
    shared: Arc<Shared>,
    pending_splits: Arc<PendingSplits>,
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
                "panicked while holding its communicator".to_owned(),
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

/// The communicators of a new cluster of `n` ranks, in rank order.
pub(super) fn world(config: LocalConfig, n: usize) -> Vec<LocalCommunicator> {
    build_group(
        &Shared::new(config),
        &Arc::new(PendingSplits::default()),
        (0..n).collect(),
    )
}

fn build_group(
    shared: &Arc<Shared>,
    pending_splits: &Arc<PendingSplits>,
    members: Vec<usize>,
) -> Vec<LocalCommunicator> {
    let m = members.len();
    let group_id = shared.next_group.fetch_add(1, Ordering::Relaxed);
    let members = Arc::new(members);
    let Matrix { tx: btx, rx: brx } = matrix::<Msg>(m);
    let Matrix { tx: wtx, rx: wrx } = matrix::<Msg>(m);
    let Matrix { tx: ptx, rx: prx } = matrix::<P2pMsg>(m);
    let stats: Vec<StatsRecorder> = (0..m).map(|_| StatsRecorder::new(false)).collect();
    let lanes = |tx: Vec<Vec<Sender<Msg>>>, rx: Vec<Vec<Receiver<Msg>>>| {
        // One board per lane: the blocking and the progress-thread collectives of a group
        // run concurrently and must not share slots.
        let board = Board::new(m);
        tx.into_iter()
            .zip(rx)
            .enumerate()
            .map(|(rank, (tx, rx))| {
                Lane::new(
                    rank,
                    tx,
                    rx,
                    Arc::clone(shared),
                    stats[rank].clone(),
                    Arc::clone(&board),
                )
            })
            .collect::<Vec<_>>()
    };
    let blocking = lanes(btx, brx);
    let workers = lanes(wtx, wrx);
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
            pending_splits: Arc::clone(pending_splits),
            lane: RefCell::new(lane),
            worker: RefCell::new(Worker::new(wlane)),
            p2p: Arc::new(P2p::new(rank, ptx, prx, Arc::clone(shared))),
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

    /// The cluster-wide state, for `LocalCluster::run` to poison when a rank panics.
    pub(super) fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// A handle that aborts the whole cluster (every group split from it) on some rank's
    /// account: every waiting call wakes with `CommError::Poisoned` naming that rank. What an
    /// elastic run uses to stop a membership that lost a rank.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(self.shared())
    }

    /// `split` returning the concrete type.
    pub fn split_local(&self, color: u32, key: u32) -> Result<LocalCommunicator> {
        let seq = self.splits.get();
        self.splits.set(seq + 1);
        let all = self.lane.borrow_mut().run(OpKind::Split, |l| {
            gather::gather_words(l, vec![u64::from(color), u64::from(key)])
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
        let mut pending = lock(&self.pending_splits);
        let entry = pending.entry(key).or_insert_with(|| {
            let comms = build_group(&self.shared, &self.pending_splits, world.clone());
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
            .run(OpKind::AllReduce, |l| reduction::all_reduce(l, buf, op))
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        self.lane.borrow_mut().run(OpKind::ReduceScatter, |l| {
            reduction::reduce_scatter(l, input, output, op)
        })
    }

    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.lane.borrow_mut().run(OpKind::AllReduce, |l| {
            reduction::all_reduce_bytes(l, buf, dtype, op)
        })
    }

    fn reduce_scatter_bytes(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.lane.borrow_mut().run(OpKind::ReduceScatter, |l| {
            reduction::reduce_scatter_bytes(l, input, output, dtype, op)
        })
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        self.lane
            .borrow_mut()
            .run(OpKind::AllGather, |l| gather::all_gather(l, input, output))
    }

    fn all_gatherv_bytes(&self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.lane
            .borrow_mut()
            .run(OpKind::AllGatherV, |l| gather::all_gatherv_bytes(l, input))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.lane.borrow_mut().run(OpKind::Broadcast, |l| {
            check_rank("root", root, l.size)?;
            broadcast::broadcast(l, buf, root)
        })
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.lane.borrow_mut().run(OpKind::Broadcast, |l| {
            check_rank("root", root, l.size)?;
            broadcast::broadcast_bytes(l, buf, root)
        })
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
        self.lane
            .borrow_mut()
            .run(OpKind::Barrier, barrier::barrier)
    }

    fn iall_reduce(&self, buf: Vec<f32>, op: ReduceOp) -> Result<Request<Vec<f32>>> {
        if let Some(e) = self.shared.poisoned() {
            return Err(e);
        }
        if self.size == 1 {
            self.stats.record(OpKind::AllReduce, 0, 0, Duration::ZERO);
            return Ok(Request::ready(Ok(buf)));
        }
        let name = || format!("meshrec-comm-g{}-r{}", self.group_id, self.rank);
        self.worker.borrow_mut().submit(name, buf, op)
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
        Ok(p2p::irecv(&self.p2p, src, tag, len, self.stats.clone()))
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
