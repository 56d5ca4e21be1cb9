//! Settings of a local cluster: timeouts, the all-reduce algorithm choice and the buffer
//! sizes of the ring and the message pool.

use std::time::Duration;

/// Which all-reduce algorithm the local engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllReduceChoice {
    /// Ring at or above `ring_threshold_bytes`, recursive doubling below.
    Auto,
    /// Always the ring.
    Ring,
    /// Always recursive doubling.
    RecursiveDoubling,
}

/// Settings of a local cluster (shared by every group split from it).
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// How long any single wait for a peer may last before `CommError::Timeout`.
    pub timeout: Duration,
    /// All-reduce algorithm selection.
    pub all_reduce: AllReduceChoice,
    /// Buffers of at least this many bytes use the ring under `Auto`. The default is the
    /// crossover the `comm` benchmark measured on the development machine (2 cores): ring
    /// first faster at 256 KiB for 2 and 3 ranks (64 KiB for 4 oversubscribed ranks).
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
