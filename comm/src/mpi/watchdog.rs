//! The watchdog that aborts a job whose blocking collective outlives its timeout.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::stats::OpKind;

/// Aborts the process when a blocking collective outlives its communicator's timeout.
///
/// Every communicator registers a [`Watch`] (communicators are `Send` but not `Sync`, so one
/// thread at a time runs a communicator's calls; the trainer's data-parallel thread runs
/// collectives on its own communicator while the main thread runs others). Arming and
/// disarming are plain atomic stores on the caller's side, no lock and no clock: the
/// watchdog thread samples every watch each tick and measures how long one call (the same
/// call count) has stayed armed.
#[derive(Default)]
pub(super) struct Watchdog {
    started: OnceLock<()>,
    watches: Arc<Mutex<Vec<Weak<Watch>>>>,
}

/// How often the watchdog samples the watches.
pub(super) const WATCHDOG_TICK: Duration = Duration::from_millis(100);

/// One communicator's blocking call in progress, as the watchdog sees it.
pub(super) struct Watch {
    /// 0 when idle, else 1 + the index in `OpKind::ALL` of the call in progress.
    op: AtomicU8,
    /// Calls armed so far (written by the communicator's thread only).
    calls: AtomicU64,
    timeout: Duration,
    world_rank: i32,
    /// The watchdog thread's own notes: the call count last seen armed, and since when.
    seen_calls: AtomicU64,
    seen_since_ms: AtomicU64,
}

impl Watch {
    pub(super) fn arm(&self, op: OpKind) {
        // Only this communicator's thread writes `calls`: no read-modify-write needed.
        self.calls
            .store(self.calls.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        self.op.store(op as u8 + 1, Ordering::Release);
    }

    pub(super) fn disarm(&self) {
        self.op.store(0, Ordering::Release);
    }
}

impl Watchdog {
    /// A watch for a communicator whose collectives may each last `timeout`.
    pub(super) fn register(&self, timeout: Duration, world_rank: i32) -> Arc<Watch> {
        self.started.get_or_init(|| {
            let watches = Arc::clone(&self.watches);
            let spawned = std::thread::Builder::new()
                .name("meshrec-mpi-watchdog".into())
                .spawn(move || watchdog_loop(&watches));
            if let Err(e) = spawned {
                eprintln!("meshrec-comm: no MPI watchdog thread ({e}); collectives may hang");
            }
        });
        let w = Arc::new(Watch {
            op: AtomicU8::new(0),
            calls: AtomicU64::new(0),
            timeout,
            world_rank,
            seen_calls: AtomicU64::new(u64::MAX),
            seen_since_ms: AtomicU64::new(0),
        });
        if let Ok(mut ws) = self.watches.lock() {
            ws.retain(|x| x.strong_count() > 0);
            ws.push(Arc::downgrade(&w));
        }
        w
    }
}

pub(super) fn watchdog_loop(watches: &Mutex<Vec<Weak<Watch>>>) {
    let base = Instant::now();
    loop {
        std::thread::sleep(WATCHDOG_TICK);
        let now = base.elapsed().as_millis() as u64;
        let live: Vec<Arc<Watch>> = match watches.lock() {
            Ok(ws) => ws.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => continue,
        };
        for w in live {
            let op = w.op.load(Ordering::Acquire);
            if op == 0 {
                continue;
            }
            let calls = w.calls.load(Ordering::Relaxed);
            if w.seen_calls.swap(calls, Ordering::Relaxed) != calls {
                w.seen_since_ms.store(now, Ordering::Relaxed);
                continue;
            }
            let since = w.seen_since_ms.load(Ordering::Relaxed);
            if now.saturating_sub(since) > w.timeout.as_millis() as u64 {
                let op = OpKind::ALL.get(usize::from(op - 1));
                eprintln!(
                    "meshrec-comm: MPI {} on world rank {} exceeded its timeout (a peer died, \
                     stopped answering, or called another collective or the same one with a \
                     different buffer); aborting the job",
                    op.map_or("collective", |o| o.name()),
                    w.world_rank
                );
                std::process::abort();
            }
        }
    }
}
