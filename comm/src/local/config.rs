//! Settings of a local cluster: timeouts, the reduction algorithm choice and the buffer
//! sizes of the ring and the message pool.

use std::time::Duration;

/// Which all-reduce algorithm the local engine runs (reduce-scatter runs the in-place
/// algorithm where this would, the ring otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllReduceChoice {
    /// In place at or above `in_place_threshold_bytes`; below it the ring at or above
    /// `ring_threshold_bytes`, recursive doubling below that.
    Auto,
    /// Always the ring.
    Ring,
    /// Always recursive doubling.
    RecursiveDoubling,
    /// Always the in-place algorithm: every rank reduces its chunk directly from the peers'
    /// buffers in shared memory and writes the result into all of them (one read of each
    /// input, one write of each output; no message carries data).
    InPlace,
}

/// Settings of a local cluster (shared by every group split from it).
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// How long any single wait for a peer may last before `CommError::Timeout`.
    pub timeout: Duration,
    /// All-reduce algorithm selection.
    pub all_reduce: AllReduceChoice,
    /// Buffers of at least this many bytes use the in-place algorithm under `Auto` (for
    /// all-reduce and reduce-scatter). Its two handshakes cost more latency than recursive
    /// doubling's one exchange on small buffers; the `comm` benchmark's crossover table
    /// put the break-even between 64 and 256 KiB for 2 and 4 ranks on the development
    /// machine (2 cores, busy), hence 128 KiB.
    pub in_place_threshold_bytes: usize,
    /// Buffers below `in_place_threshold_bytes` and of at least this many bytes use the ring
    /// under `Auto` (with the defaults, none: the in-place algorithm takes over first). Ring
    /// first faster than recursive doubling at 256 KiB for 2 and 3 ranks (64 KiB for 4
    /// oversubscribed ranks) on the development machine.
    pub ring_threshold_bytes: usize,
    /// Pipelining granularity of the ring, in bytes per message.
    pub segment_bytes: usize,
    /// Most bytes of message buffers a lane keeps for reuse between calls.
    pub pool_bytes: usize,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            all_reduce: AllReduceChoice::Auto,
            in_place_threshold_bytes: 128 * 1024,
            ring_threshold_bytes: 256 * 1024,
            segment_bytes: 256 * 1024,
            pool_bytes: 512 * 1024 * 1024,
        }
    }
}

impl LocalConfig {
    /// The default configuration with another timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            ..Self::default()
        }
    }
}
