//! Per-communicator statistics: count, bytes sent and received, and time per operation kind.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The kinds of operation a communicator counts separately. Non-blocking variants count
/// under the kind of their blocking twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OpKind {
    /// `all_reduce`, `iall_reduce`.
    AllReduce,
    /// `reduce_scatter`.
    ReduceScatter,
    /// `all_gather`.
    AllGather,
    /// `all_gatherv`, `all_gatherv_bytes`.
    AllGatherV,
    /// `broadcast`, `broadcast_bytes`.
    Broadcast,
    /// `send`, `send_bytes`, `isend`.
    Send,
    /// `recv`, `recv_bytes`, `irecv`.
    Recv,
    /// `barrier`.
    Barrier,
    /// `split`.
    Split,
}

impl OpKind {
    /// Every kind, in display order.
    pub const ALL: [OpKind; 9] = [
        OpKind::AllReduce,
        OpKind::ReduceScatter,
        OpKind::AllGather,
        OpKind::AllGatherV,
        OpKind::Broadcast,
        OpKind::Send,
        OpKind::Recv,
        OpKind::Barrier,
        OpKind::Split,
    ];

    /// The snake-case name used in metrics.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::AllGather => "all_gather",
            OpKind::AllGatherV => "all_gatherv",
            OpKind::Broadcast => "broadcast",
            OpKind::Send => "send",
            OpKind::Recv => "recv",
            OpKind::Barrier => "barrier",
            OpKind::Split => "split",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Totals for one kind of operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OpStats {
    /// Completed calls (failed calls are not counted).
    pub count: u64,
    /// Bytes this rank put on its links.
    pub bytes_sent: u64,
    /// Bytes this rank took off its links.
    pub bytes_received: u64,
    /// Wall time from the call (or, for non-blocking calls, from its start) to completion.
    pub time_s: f64,
}

impl OpStats {
    fn add(&mut self, other: &OpStats) {
        self.count += other.count;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.time_s += other.time_s;
    }
}

/// A snapshot of one communicator's statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommStats {
    /// Totals per operation kind (kinds never used are absent).
    pub ops: BTreeMap<OpKind, OpStats>,
    /// `true` when byte counts are *modelled* (from the algorithm the engine is assumed to
    /// use, e.g. MPI, whose wire traffic the engine cannot see) rather than counted.
    pub bytes_modelled: bool,
}

impl CommStats {
    /// Totals of one kind (zeros when unused).
    pub fn get(&self, kind: OpKind) -> OpStats {
        self.ops.get(&kind).copied().unwrap_or_default()
    }

    /// Totals over all kinds.
    pub fn total(&self) -> OpStats {
        let mut t = OpStats::default();
        for s in self.ops.values() {
            t.add(s);
        }
        t
    }
}

/// Shared, thread-safe recorder behind a communicator's `stats()` (cloned into the
/// communicator's progress thread). Lock-free: a record is four relaxed atomic adds on its
/// kind's slot, so that a 1 KB collective (half a microsecond) does not pay a lock for its
/// bookkeeping. A snapshot taken while a record is under way may see that record in part.
#[derive(Debug, Clone, Default)]
pub struct StatsRecorder {
    inner: Arc<Totals>,
}

#[derive(Debug, Default)]
struct Totals {
    /// Indexed by `OpKind as usize` (the order of `OpKind::ALL`).
    ops: [Slot; OpKind::ALL.len()],
    bytes_modelled: AtomicBool,
}

#[derive(Debug, Default)]
struct Slot {
    count: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    nanos: AtomicU64,
}

impl StatsRecorder {
    /// A recorder whose byte counts are modelled (`true`) or counted (`false`).
    pub fn new(bytes_modelled: bool) -> Self {
        let s = Self::default();
        s.inner
            .bytes_modelled
            .store(bytes_modelled, Ordering::Relaxed);
        s
    }

    /// Adds one completed operation.
    pub fn record(&self, kind: OpKind, bytes_sent: u64, bytes_received: u64, time: Duration) {
        let e = &self.inner.ops[kind as usize];
        e.count.fetch_add(1, Ordering::Relaxed);
        e.bytes_sent.fetch_add(bytes_sent, Ordering::Relaxed);
        e.bytes_received
            .fetch_add(bytes_received, Ordering::Relaxed);
        let nanos = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
        e.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// A copy of the current totals.
    pub fn snapshot(&self) -> CommStats {
        CommStats {
            ops: OpKind::ALL
                .iter()
                .zip(&self.inner.ops)
                .map(|(&k, e)| {
                    let stats = OpStats {
                        count: e.count.load(Ordering::Relaxed),
                        bytes_sent: e.bytes_sent.load(Ordering::Relaxed),
                        bytes_received: e.bytes_received.load(Ordering::Relaxed),
                        time_s: e.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
                    };
                    (k, stats)
                })
                .filter(|(_, o)| o.count > 0)
                .collect(),
            bytes_modelled: self.inner.bytes_modelled.load(Ordering::Relaxed),
        }
    }

    /// Zeroes every total.
    pub fn reset(&self) {
        for e in &self.inner.ops {
            for counter in [&e.count, &e.bytes_sent, &e.bytes_received, &e.nanos] {
                counter.store(0, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_index_their_own_slot() {
        for (i, &k) in OpKind::ALL.iter().enumerate() {
            assert_eq!(k as usize, i, "{k}");
        }
    }

    #[test]
    fn records_show_up_by_kind_and_reset_clears_them() {
        let s = StatsRecorder::new(true);
        s.record(OpKind::Barrier, 0, 0, Duration::from_millis(2));
        s.record(OpKind::Send, 8, 0, Duration::ZERO);
        s.record(OpKind::Send, 4, 0, Duration::ZERO);
        let snap = s.snapshot();
        assert!(snap.bytes_modelled);
        assert_eq!(snap.ops.len(), 2);
        assert_eq!(snap.get(OpKind::Send).count, 2);
        assert_eq!(snap.get(OpKind::Send).bytes_sent, 12);
        assert!((snap.get(OpKind::Barrier).time_s - 0.002).abs() < 1e-12);
        s.reset();
        assert!(s.snapshot().ops.is_empty());
    }
}
