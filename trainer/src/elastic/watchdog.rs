//! The watchdog of a local elastic run: a thread that reads every rank's health a tenth of
//! `timeout_s` apart and has the membership evict a rank that is silent or hung.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::elastic::health::{judge, now_ms, Verdict};
use crate::elastic::membership::Membership;

/// Watches `membership`'s ranks until `stop` is set.
pub fn watch(membership: &Membership, timeout: Duration, stop: &AtomicBool) {
    let poll = timeout / 10;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(poll);
        let Some((generation, ranks)) = membership.watched() else {
            continue;
        };
        let now = now_ms();
        for health in ranks {
            let s = health.snapshot();
            if s.exited {
                continue;
            }
            let verdict = judge(&s, now, timeout / 2);
            if verdict != Verdict::Healthy {
                membership.evict(generation, s.world_rank, &verdict.reason());
            }
        }
    }
}

/// Stops the watchdog when dropped (the run is over, however it ended).
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}
