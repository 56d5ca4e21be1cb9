//! The autoscaler's rule: how many workers should take batches, from the queue depth per
//! active worker and the recent p95 latency against a target. It grows when either is over
//! its upper mark for `up_after` consecutive ticks and shrinks when both are under their
//! lower marks for `down_after` ticks, one worker per change, never two changes within
//! `cooldown_ms`: the gap between the marks, the tick counts and the cooldown are the
//! hysteresis that keeps it from oscillating. Time is passed in, so tests run it on a
//! simulated clock.

use crate::config::AutoscaleSection;

/// What the autoscaler reads each tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    /// Requests waiting for or inside a batch not yet started.
    pub queue_depth: f64,
    /// p95 latency of the requests finished since the last tick (`None`: none finished).
    pub p95_ms: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Autoscaler {
    config: AutoscaleSection,
    min: usize,
    max: usize,
    active: usize,
    over: u32,
    under: u32,
    last_change_ms: Option<u64>,
}

impl Autoscaler {
    pub fn new(config: &AutoscaleSection, min: usize, max: usize) -> Self {
        Self {
            config: config.clone(),
            min,
            max,
            active: min,
            over: 0,
            under: 0,
            last_change_ms: None,
        }
    }

    pub fn active(&self) -> usize {
        self.active
    }

    /// One tick at `now_ms`: returns the number of workers that should be active.
    pub fn observe(&mut self, now_ms: u64, signals: Signals) -> usize {
        let c = &self.config;
        let per_worker = signals.queue_depth / self.active.max(1) as f64;
        let slow = signals.p95_ms.is_some_and(|p| p > c.target_p95_ms);
        let fast = signals
            .p95_ms
            .is_none_or(|p| p < c.target_p95_ms * c.down_latency_ratio);
        if per_worker > c.up_queue_per_worker || slow {
            self.over += 1;
            self.under = 0;
        } else if per_worker < c.down_queue_per_worker && fast {
            self.under += 1;
            self.over = 0;
        } else {
            self.over = 0;
            self.under = 0;
        }
        let cooled = self
            .last_change_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= c.cooldown_ms);
        if cooled && self.over >= c.up_after && self.active < self.max {
            self.active += 1;
            self.changed(now_ms);
        } else if cooled && self.under >= c.down_after && self.active > self.min {
            self.active -= 1;
            self.changed(now_ms);
        }
        self.active
    }

    fn changed(&mut self, now_ms: u64) {
        self.over = 0;
        self.under = 0;
        self.last_change_ms = Some(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AutoscaleSection {
        AutoscaleSection {
            enabled: true,
            tick_ms: 100,
            target_p95_ms: 20.0,
            up_queue_per_worker: 4.0,
            down_queue_per_worker: 0.5,
            down_latency_ratio: 0.5,
            up_after: 2,
            down_after: 10,
            cooldown_ms: 500,
        }
    }

    /// A simulated service: each active worker drains `rate` requests per tick; a load
    /// step 1 -> 64 -> 1 concurrent clients. The autoscaler reaches the maximum within
    /// seconds of the step, returns to the minimum after it, and never reverses direction
    /// inside either phase (no oscillation).
    #[test]
    fn load_step_scales_up_then_down_without_oscillating() {
        let mut scaler = Autoscaler::new(&config(), 1, 4);
        let mut history = Vec::new();
        for tick in 0..400u64 {
            let now = tick * 100;
            let clients = if (50..200).contains(&tick) { 64.0 } else { 1.0 };
            let active = scaler.active() as f64;
            // Closed loop: clients beyond what the workers serve at once wait in the queue;
            // latency grows with the wait.
            let serving = (active * 8.0).min(clients);
            let queue = clients - serving;
            let p95 = 5.0 + 20.0 * queue / (active * 8.0);
            history.push(scaler.observe(
                now,
                Signals {
                    queue_depth: queue,
                    p95_ms: Some(p95),
                },
            ));
        }
        let at = |tick: usize| history[tick];
        assert_eq!(at(49), 1);
        let reached = (50..200)
            .find(|&t| history[t] == 4)
            .expect("reaches 4 workers");
        assert!(reached - 50 <= 30, "took {} ticks", reached - 50);
        assert_eq!(at(199), 4);
        let back = (200..400).find(|&t| history[t] == 1).expect("returns to 1");
        assert!(back - 200 <= 60, "took {} ticks to shrink", back - 200);
        // Monotone within each phase: up during the step, down after it.
        assert!(history[50..200].windows(2).all(|w| w[1] >= w[0]));
        assert!(history[200..].windows(2).all(|w| w[1] <= w[0]));
    }

    /// A load between the marks changes nothing, and a single noisy tick does not either.
    #[test]
    fn the_band_and_the_counts_hold_steady() {
        let mut scaler = Autoscaler::new(&config(), 1, 4);
        for tick in 0..100u64 {
            let spike = tick % 7 == 0;
            let active = scaler.observe(
                tick * 100,
                Signals {
                    queue_depth: if spike { 50.0 } else { 2.0 },
                    p95_ms: Some(12.0),
                },
            );
            assert_eq!(active, 1, "tick {tick}");
        }
    }
}
