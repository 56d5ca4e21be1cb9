//! The dispatcher's rule: each batch goes to the active worker that would finish it first,
//! judged from the rows it already holds and its measured speed (rows per second, a moving
//! average of its own batches), so a faster device — or a replica on a less busy one — takes
//! proportionally more. A worker holding `max_inflight` batches is passed over.

/// What the dispatcher knows of one worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerLoad {
    pub active: bool,
    pub inflight_batches: usize,
    pub inflight_rows: usize,
    /// Measured rows per second (> 0).
    pub rows_per_s: f64,
}

/// The worker for a batch of `rows`, or `None` when every active worker is full.
pub fn pick(workers: &[WorkerLoad], rows: usize, max_inflight: usize) -> Option<usize> {
    workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.active && w.inflight_batches < max_inflight)
        .map(|(i, w)| {
            let finish = (w.inflight_rows + rows) as f64 / w.rows_per_s.max(1e-9);
            (i, finish)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|(i, _)| i)
}

/// The moving average of a worker's speed after a batch of `rows` took `seconds`.
pub fn update_speed(previous: f64, rows: usize, seconds: f64) -> f64 {
    let measured = rows as f64 / seconds.max(1e-6);
    if previous <= 0.0 {
        measured
    } else {
        0.8 * previous + 0.2 * measured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated clock: batches of 8 rows arrive every 0.75 ms (more than both workers
    /// together serve); worker 0 does 8000 rows/s, worker 1 does 2000. The dispatcher keeps
    /// both busy and sends the fast one about four times as many.
    #[test]
    fn least_loaded_by_measured_speed_on_a_simulated_clock() {
        let speeds = [8000.0, 2000.0];
        let mut busy_until = [0.0f64; 2];
        let mut queued: [Vec<(f64, usize)>; 2] = [Vec::new(), Vec::new()];
        let mut counts = [0usize; 2];
        for step in 0..4000 {
            let now = step as f64 * 0.75e-3;
            // Retire the batches finished by now.
            for w in 0..2 {
                queued[w].retain(|&(done, _)| done > now);
            }
            let loads: Vec<WorkerLoad> = (0..2)
                .map(|w| WorkerLoad {
                    active: true,
                    inflight_batches: queued[w].len(),
                    inflight_rows: queued[w].iter().map(|q| q.1).sum(),
                    rows_per_s: speeds[w],
                })
                .collect();
            let Some(w) = pick(&loads, 8, 64) else {
                continue;
            };
            let start = busy_until[w].max(now);
            busy_until[w] = start + 8.0 / speeds[w];
            queued[w].push((busy_until[w], 8));
            counts[w] += 1;
        }
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!(
            (3.0..5.5).contains(&ratio),
            "fast/slow = {ratio} ({counts:?})"
        );
    }

    #[test]
    fn inactive_and_full_workers_are_passed_over() {
        let w = |active, batches, rows, speed| WorkerLoad {
            active,
            inflight_batches: batches,
            inflight_rows: rows,
            rows_per_s: speed,
        };
        let workers = [
            w(false, 0, 0, 1e9),
            w(true, 2, 16, 1e9),
            w(true, 1, 100, 10.0),
        ];
        assert_eq!(pick(&workers, 8, 2), Some(2));
        assert_eq!(pick(&workers, 8, 1), None);
        assert_eq!(pick(&workers, 8, 3), Some(1));
        let speed = update_speed(0.0, 10, 0.01);
        assert!((speed - 1000.0).abs() < 1e-6);
        assert!((update_speed(speed, 10, 0.005) - 1200.0).abs() < 1e-6);
    }
}
