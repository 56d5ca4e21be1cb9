//! State shared by every communicator of one cluster (and every group split from it): the
//! configuration, group numbering, and poisoning, the cluster-wide alarm a panicking rank
//! raises so that no other rank waits for it.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crossbeam_channel::{unbounded, Receiver, Sender, TryRecvError};

use super::config::LocalConfig;
use crate::error::CommError;

pub(super) struct Shared {
    pub(super) config: LocalConfig,
    /// Dropped (set to `None`) to poison: every `poison_rx` then reports disconnection,
    /// which wakes every rank blocked in a `select!`.
    poison_tx: Mutex<Option<Sender<()>>>,
    pub(super) poison_rx: Receiver<()>,
    /// (world rank, message, message is a placeholder from `Drop`).
    poison_info: Mutex<Option<(usize, String, bool)>>,
    pub(super) next_group: AtomicU64,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent across a panic (whole-value updates).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(super) fn new(config: LocalConfig) -> Arc<Self> {
        let (tx, rx) = unbounded();
        Arc::new(Self {
            config,
            poison_tx: Mutex::new(Some(tx)),
            poison_rx: rx,
            poison_info: Mutex::new(None),
            next_group: AtomicU64::new(0),
        })
    }

    /// Poisons the cluster. A `placeholder` message (from `Drop`, which cannot see the
    /// panic payload) is replaced by the real one when `LocalCluster::run` catches the panic.
    pub(super) fn poison(&self, world_rank: usize, message: String, placeholder: bool) {
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

    pub(super) fn poisoned(&self) -> Option<CommError> {
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

/// Aborts a cluster on a rank's account (see `LocalCommunicator::abort_handle`).
#[derive(Clone)]
pub struct AbortHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortHandle")
            .field("aborted", &self.aborted())
            .finish()
    }
}

impl AbortHandle {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Poisons the cluster naming `world_rank` and `message`; the first abort or panic
    /// wins the name, later ones only keep it poisoned.
    pub fn abort(&self, world_rank: usize, message: impl Into<String>) {
        self.shared.poison(world_rank, message.into(), false);
    }

    /// The error every call of the cluster now fails with, if it was aborted or a rank
    /// panicked.
    pub fn aborted(&self) -> Option<CommError> {
        self.shared.poisoned()
    }
}
