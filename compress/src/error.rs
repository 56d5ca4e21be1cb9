//! Error types: everything a bad configuration, a bad input or a bad payload can cause.

use thiserror::Error;

/// An error from configuring a compressor, compressing, or decoding a payload.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CompressError {
    /// A method parameter is out of its valid range.
    #[error("invalid parameter for {method}: {what}")]
    InvalidParam { method: &'static str, what: String },

    /// The payload is shorter than its header says (or than a header).
    #[error("payload truncated: {what} needs {needed} bytes, {available} available")]
    Truncated {
        what: &'static str,
        needed: usize,
        available: usize,
    },

    /// The payload carries more bytes than its header accounts for.
    #[error("payload oversized: header accounts for {expected} bytes, payload has {actual}")]
    Oversized { expected: usize, actual: usize },

    /// The first bytes are not the meshrec compression magic.
    #[error("bad magic {found:02x?}: not a meshrec compressed payload")]
    BadMagic { found: [u8; 4] },

    /// The wire-format version is not one this build reads.
    #[error("unsupported wire version {found} (this build reads version {supported})")]
    BadVersion { found: u16, supported: u16 },

    /// The method byte names no known method.
    #[error("unknown method id {0}")]
    UnknownMethod(u8),

    /// Reserved header bits are set.
    #[error("reserved header flags {0:#04x} are set")]
    BadFlags(u8),

    /// The header's fields contradict each other or the body.
    #[error("inconsistent payload ({method}): {what}")]
    Inconsistent { method: &'static str, what: String },

    /// A scale or norm in the payload is NaN, infinite or negative.
    #[error("bad scale in {method} payload at chunk {index}: {value}")]
    BadScale {
        method: &'static str,
        index: usize,
        value: f32,
    },

    /// The caller's buffer length differs from the tensor length.
    #[error("length mismatch: {what} has {actual} elements, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },

    /// The input cannot be represented by the wire format (e.g. over 2^32 elements).
    #[error("input too large for {method}: {what}")]
    TooLarge { method: &'static str, what: String },

    /// The payload was made by a different method than the one asked to decode it.
    #[error("method mismatch: payload is {found}, decoder is {expected}")]
    MethodMismatch {
        expected: &'static str,
        found: &'static str,
    },

    /// A compressor produced a non-finite scale (its input holds NaN or infinity).
    #[error("{method}: input is not finite (chunk {index} has scale {value})")]
    NonFiniteInput {
        method: &'static str,
        index: usize,
        value: f32,
    },

    /// Error-feedback memory does not fit the tensor or the method.
    #[error("memory: {0}")]
    Memory(String),

    /// Checkpoint state could not be (de)serialised.
    #[error("state serialisation: {0}")]
    Serde(String),
}

/// An error from the compressed all-reduce (`sync`).
#[derive(Debug, Error)]
pub enum SyncError {
    /// Compressing or decoding failed.
    #[error(transparent)]
    Compress(#[from] CompressError),

    /// A payload received from another rank did not decode.
    #[error("payload from rank {from}: {source}")]
    Peer {
        from: usize,
        #[source]
        source: CompressError,
    },

    /// `reduce` was called on a gather-then-sum method.
    #[error("{0} is not all-reduce compatible")]
    NotAllReduce(&'static str),

    /// The collective failed.
    #[error("{op} failed on rank {rank}: {source}")]
    Comm {
        op: &'static str,
        rank: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// Ranks disagree about what they are synchronising.
    #[error("rank {rank}: {what}")]
    Mismatch { rank: usize, what: String },
}
