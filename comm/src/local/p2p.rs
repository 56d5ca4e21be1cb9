//! Tagged point-to-point messages: one channel per pair of ranks, a mailbox per source that
//! matches receives to messages by `(tag, posting order)`, and the completion of `irecv`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{select, Receiver, Sender, TryRecvError};

use super::shared::{lock, Shared};
use crate::error::{CommError, Result};
use crate::request::{Completion, Request};
use crate::stats::{OpKind, StatsRecorder};

pub(super) enum P2pBody {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

pub(super) struct P2pMsg {
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

/// One rank's end of a group's point-to-point lane.
pub(super) struct P2p {
    rank: usize,
    tx: Vec<Sender<P2pMsg>>,
    inbox: Vec<Mutex<Mailbox>>,
    shared: Arc<Shared>,
}

impl P2p {
    pub(super) fn new(
        rank: usize,
        tx: Vec<Sender<P2pMsg>>,
        rx: Vec<Receiver<P2pMsg>>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            rank,
            tx,
            inbox: rx
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
            shared,
        }
    }

    /// Posts a receive for `(src, tag)`; the ticket is its place in the posting order.
    pub(super) fn post(&self, src: usize, tag: u32) -> u64 {
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
    pub(super) fn wait(&self, src: usize, tag: u32, ticket: u64) -> Result<P2pBody> {
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

    pub(super) fn send(&self, dst: usize, tag: u32, body: P2pBody) -> Result<()> {
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

/// Posts a receive of `len` `f32`s from `src` with `tag`, completed by its request.
pub(super) fn irecv(
    p2p: &Arc<P2p>,
    src: usize,
    tag: u32,
    len: usize,
    stats: StatsRecorder,
) -> Request<Vec<f32>> {
    let ticket = p2p.post(src, tag);
    Request::pending(Box::new(IrecvCompletion {
        p2p: Arc::clone(p2p),
        src,
        tag,
        ticket,
        len,
        stats,
        start: Instant::now(),
    }))
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
