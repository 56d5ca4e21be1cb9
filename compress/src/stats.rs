//! Compression statistics: bytes before and after, ratio, time per method.

use crate::methods::Aggregation;
use crate::wire::MethodId;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// What one `sync` call did on this rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncReport {
    pub method: MethodId,
    pub aggregation: Aggregation,
    /// Elements of the tensor.
    pub elements: usize,
    /// Bytes of the uncompressed f32 tensor.
    pub dense_bytes: usize,
    /// Bytes of this rank's compressed representation (the whole payload, header
    /// included, for gather-then-sum; the reduced vectors for all-reduce methods).
    pub payload_bytes: usize,
    /// Bytes this rank handed to the collective (fp16/bf16 reduce in their own 16-bit
    /// type, so this equals `payload_bytes` for every all-reduce method).
    pub collective_bytes: usize,
    /// Bytes received from the other ranks (gather-then-sum only).
    pub received_bytes: usize,
    /// PowerSGD sent this tensor dense.
    pub skipped: bool,
    /// Error feedback, compression and (for all-reduce methods, where the two are
    /// interleaved with the collective) decompression.
    pub compress_time: Duration,
    /// Decoding and summing the received payloads (gather-then-sum).
    pub decompress_time: Duration,
    /// Time inside collectives (includes waiting for slower ranks).
    pub comm_time: Duration,
}

impl SyncReport {
    /// Dense bytes over payload bytes (> 1 means smaller on the wire).
    pub fn ratio(&self) -> f64 {
        self.dense_bytes as f64 / self.payload_bytes.max(1) as f64
    }
}

/// Running totals for one method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MethodStats {
    pub calls: u64,
    pub dense_bytes: u64,
    pub payload_bytes: u64,
    pub collective_bytes: u64,
    pub received_bytes: u64,
    pub skipped: u64,
    pub compress_ns: u64,
    pub decompress_ns: u64,
    pub comm_ns: u64,
}

impl MethodStats {
    /// Dense bytes over payload bytes.
    pub fn ratio(&self) -> f64 {
        self.dense_bytes as f64 / self.payload_bytes.max(1) as f64
    }
    /// Input throughput of compression in GB/s (1e9 bytes).
    pub fn compress_gbps(&self) -> f64 {
        self.dense_bytes as f64 / (self.compress_ns.max(1) as f64)
    }
    /// Input throughput of decompression in GB/s.
    pub fn decompress_gbps(&self) -> f64 {
        self.dense_bytes as f64 / (self.decompress_ns.max(1) as f64)
    }
}

/// Statistics per method name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub by_method: BTreeMap<&'static str, MethodStats>,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds one `sync` report.
    pub fn record(&mut self, r: &SyncReport) {
        let s = self.by_method.entry(r.method.name()).or_default();
        s.calls += 1;
        s.dense_bytes += r.dense_bytes as u64;
        s.payload_bytes += r.payload_bytes as u64;
        s.collective_bytes += r.collective_bytes as u64;
        s.received_bytes += r.received_bytes as u64;
        s.skipped += r.skipped as u64;
        s.compress_ns += r.compress_time.as_nanos() as u64;
        s.decompress_ns += r.decompress_time.as_nanos() as u64;
        s.comm_ns += r.comm_time.as_nanos() as u64;
    }
    /// Totals over all methods.
    pub fn total(&self) -> MethodStats {
        let mut t = MethodStats::default();
        for s in self.by_method.values() {
            t.calls += s.calls;
            t.dense_bytes += s.dense_bytes;
            t.payload_bytes += s.payload_bytes;
            t.collective_bytes += s.collective_bytes;
            t.received_bytes += s.received_bytes;
            t.skipped += s.skipped;
            t.compress_ns += s.compress_ns;
            t.decompress_ns += s.decompress_ns;
            t.comm_ns += s.comm_ns;
        }
        t
    }
}
