//! When a dynamic batch closes: at `max_batch` requests, or once its first request has
//! waited `max_delay_us` (Triton's dynamic batcher's two knobs). The decision is a pure
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
    /// `now_us`.
    pub fn decide(&self, len: usize, first_us: u64, now_us: u64) -> Decision {
        let deadline = first_us.saturating_add(self.max_delay_us);
        if len >= self.max_batch || now_us >= deadline {
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
            match policy.decide(current.len(), current[0], now) {
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
        assert_eq!(off.decide(1, 0, 0), Decision::Close);
    }
}
