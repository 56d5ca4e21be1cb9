//! When a dynamic batch closes: at `max_batch` requests, once its first request has waited
//! `max_delay_us` (Triton's dynamic batcher's two knobs), or at once while a worker sits
//! idle (work-conserving, as Clipper's adaptive batching: waiting for company only pays while
//! every worker is busy; otherwise it adds the delay to an unloaded server's latency and
//! leaves a worker idle). The decision is a pure
//! function of times in microseconds, so tests drive it with a simulated clock; the pool's
//! batching thread applies it to its queue.

/// What to do with the batch being formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it to a worker now.
    Close,
    /// Wait for more requests until this time (microseconds on the caller's clock).
    WaitUntil(u64),
}

/// The closing rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_batch: usize,
    pub max_delay_us: u64,
}

impl BatchPolicy {
    /// The decision for a batch of `len` requests whose first arrived at `first_us`, at
    /// `now_us`, with `worker_idle` telling whether some worker has nothing in flight.
    pub fn decide(&self, len: usize, first_us: u64, now_us: u64, worker_idle: bool) -> Decision {
        let deadline = first_us.saturating_add(self.max_delay_us);
        if worker_idle || len >= self.max_batch || now_us >= deadline {
            Decision::Close
        } else {
            Decision::WaitUntil(deadline)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests arriving at simulated times: the batches close by size or by delay exactly
    /// where the rule says.
    #[test]
    fn batches_close_at_max_batch_or_max_delay() {
        let policy = BatchPolicy {
            max_batch: 3,
            max_delay_us: 1000,
        };
        let arrivals = [0u64, 100, 200, 300, 2000, 5000, 5500];
        let mut batches: Vec<Vec<u64>> = Vec::new();
        let mut current: Vec<u64> = Vec::new();
        let mut i = 0;
        let mut now = 0u64;
        while i < arrivals.len() || !current.is_empty() {
            if current.is_empty() {
                now = now.max(arrivals[i]);
                current.push(arrivals[i]);
                i += 1;
            }
            match policy.decide(current.len(), current[0], now, false) {
                Decision::Close => batches.push(std::mem::take(&mut current)),
                Decision::WaitUntil(t) => match arrivals.get(i) {
                    Some(&a) if a <= t => {
                        now = a;
                        current.push(a);
                        i += 1;
                    }
                    _ => now = t,
                },
            }
        }
        assert_eq!(
            batches,
            vec![vec![0, 100, 200], vec![300], vec![2000], vec![5000, 5500]]
        );
        let off = BatchPolicy {
            max_batch: 1,
            max_delay_us: 1000,
        };
        assert_eq!(off.decide(1, 0, 0, false), Decision::Close);
    }

    /// An idle worker takes the batch as it is; busy workers let it wait for the deadline.
    #[test]
    fn an_idle_worker_closes_the_batch_at_once() {
        let policy = BatchPolicy {
            max_batch: 32,
            max_delay_us: 2000,
        };
        assert_eq!(policy.decide(1, 0, 10, true), Decision::Close);
        assert_eq!(policy.decide(1, 0, 10, false), Decision::WaitUntil(2000));
        assert_eq!(policy.decide(5, 0, 2000, false), Decision::Close);
    }
}
