//! The service's counters and their Prometheus text exposition (format 0.0.4), written by
//! hand: requests by status, a request latency histogram, a batch-size histogram, the queue
//! depth, active workers, and per-worker batches and measured speed.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096,
];
/// Upper bounds of the batch-size histogram's buckets.
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum in millionths, so it can be an atomic integer.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Per-worker figures.
#[derive(Debug)]
pub struct WorkerMetrics {
    pub device: String,
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    /// Measured rows per second, as f64 bits.
    pub speed_bits: AtomicU64,
}

/// Everything `/metrics` shows.
#[derive(Debug)]
pub struct Metrics {
    statuses: Mutex<BTreeMap<u16, u64>>,
    pub latency: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: AtomicUsize,
    pub active_workers: AtomicUsize,
    /// Requests that reached the recommend handler (each gets exactly one answer).
    pub accepted: AtomicU64,
    pub workers: Vec<WorkerMetrics>,
    /// Recent request latencies (seconds) for the autoscaler, drained every tick.
    recent: Mutex<Vec<f64>>,
}

impl Metrics {
    pub fn new(devices: &[String]) -> Self {
        Self {
            statuses: Mutex::new(BTreeMap::new()),
            latency: Histogram::new(&LATENCY_BUCKETS),
            batch_size: Histogram::new(&BATCH_BUCKETS),
            queue_depth: AtomicUsize::new(0),
            active_workers: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            workers: devices
                .iter()
                .map(|d| WorkerMetrics {
                    device: d.clone(),
                    batches: AtomicU64::new(0),
                    rows: AtomicU64::new(0),
                    speed_bits: AtomicU64::new(0),
                })
                .collect(),
            recent: Mutex::new(Vec::new()),
        }
    }

    /// Counts a finished request by status; `seconds` from its arrival to its answer.
    pub fn request(&self, status: u16, seconds: f64) {
        if let Ok(mut s) = self.statuses.lock() {
            *s.entry(status).or_default() += 1;
        }
        self.latency.observe(seconds);
        if status == 200 {
            if let Ok(mut r) = self.recent.lock() {
                // Bounded: the autoscaler drains it every tick.
                if r.len() < 100_000 {
                    r.push(seconds);
                }
            }
        }
    }

    /// The p95 (milliseconds) of the requests answered since the last call.
    pub fn drain_recent_p95_ms(&self) -> Option<f64> {
        let mut recent = self.recent.lock().ok()?;
        if recent.is_empty() {
            return None;
        }
        let mut v = std::mem::take(&mut *recent);
        drop(recent);
        let i = ((v.len() as f64 * 0.95).ceil() as usize).clamp(1, v.len()) - 1;
        let (_, p, _) = v.select_nth_unstable_by(i, f64::total_cmp);
        Some(*p * 1e3)
    }

    /// Requests answered, all statuses.
    pub fn answered(&self) -> u64 {
        self.statuses.lock().map(|s| s.values().sum()).unwrap_or(0)
    }

    pub fn status_count(&self, status: u16) -> u64 {
        self.statuses
            .lock()
            .map(|s| s.get(&status).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP meshrec_requests_total Requests answered, by HTTP status."
        );
        let _ = writeln!(out, "# TYPE meshrec_requests_total counter");
        if let Ok(s) = self.statuses.lock() {
            for (status, n) in s.iter() {
                let _ = writeln!(out, "meshrec_requests_total{{status=\"{status}\"}} {n}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP meshrec_requests_accepted_total Requests that reached the handler."
        );
        let _ = writeln!(out, "# TYPE meshrec_requests_accepted_total counter");
        let _ = writeln!(
            out,
            "meshrec_requests_accepted_total {}",
            self.accepted.load(Ordering::Relaxed)
        );
        self.latency.render(
            &mut out,
            "meshrec_request_duration_seconds",
            "Time from a request's arrival to its answer.",
        );
        self.batch_size.render(
            &mut out,
            "meshrec_batch_size",
            "Requests per batch the model ran.",
        );
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {v}");
        };
        gauge(
            &mut out,
            "meshrec_queue_depth",
            "Requests accepted and not yet in a running batch.",
            self.queue_depth.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "meshrec_active_workers",
            "Workers the dispatcher sends batches to.",
            self.active_workers.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP meshrec_worker_batches_total Batches run, by worker."
        );
        let _ = writeln!(out, "# TYPE meshrec_worker_batches_total counter");
        for (i, w) in self.workers.iter().enumerate() {
            let _ = writeln!(
                out,
                "meshrec_worker_batches_total{{worker=\"{i}\",device=\"{}\"}} {}",
                w.device,
                w.batches.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshrec_worker_rows_per_second Measured speed, by worker (moving average)."
        );
        let _ = writeln!(out, "# TYPE meshrec_worker_rows_per_second gauge");
        for (i, w) in self.workers.iter().enumerate() {
            let _ = writeln!(
                out,
                "meshrec_worker_rows_per_second{{worker=\"{i}\",device=\"{}\"}} {:.1}",
                w.device,
                f64::from_bits(w.speed_bits.load(Ordering::Relaxed))
            );
        }
        out
    }
}

/// The value of an unlabelled sample in a Prometheus text exposition (for clients and
/// tests that read `/metrics`).
pub fn scrape_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counters_histograms_and_gauges() {
        let m = Metrics::new(&["cpu".into()]);
        m.request(200, 0.003);
        m.request(200, 0.003);
        m.request(400, 0.0001);
        m.batch_size.observe(2.0);
        m.active_workers.store(1, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains("meshrec_requests_total{status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("meshrec_requests_total{status=\"400\"} 1"));
        assert!(text.contains("meshrec_request_duration_seconds_bucket{le=\"0.004\"} 3"));
        assert!(text.contains("meshrec_request_duration_seconds_count 3"));
        assert!(text.contains("meshrec_batch_size_bucket{le=\"2\"} 1"));
        assert_eq!(scrape_value(&text, "meshrec_active_workers"), Some(1.0));
        assert!(m
            .drain_recent_p95_ms()
            .is_some_and(|p| (p - 3.0).abs() < 1e-9));
        assert_eq!(m.drain_recent_p95_ms(), None);
    }
}
