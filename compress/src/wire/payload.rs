//! The compressed tensor as it travels: an owned byte buffer that compressors refill
//! in place and receivers peek at or decode.

use super::apply::{Apply, DecodeScratch};
use super::decode::decode_into;
use super::header::{peek, too_big, Header};
use crate::error::CompressError;

/// A compressed tensor: header + body, exactly as it travels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    bytes: Vec<u8>,
}

impl Payload {
    /// An empty payload whose buffer is reused by `compress_into`.
    pub fn new() -> Self {
        Self::default()
    }
    /// Wraps received bytes (validated when decoded or peeked).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self { bytes }
    }
    /// The exact bytes on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Consumes the payload, returning its bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
    /// Exact wire size in bytes, header included.
    pub fn wire_len(&self) -> usize {
        self.bytes.len()
    }
    /// Parses the header.
    pub fn header(&self) -> Result<Header, CompressError> {
        peek(&self.bytes)
    }
    /// Decodes into a fresh vector. A small hostile payload can claim a huge length
    /// (a sparse payload with k = 0 carries no body), so the caller bounds the
    /// allocation with `max_len`; received payloads are better decoded with
    /// `decode_into` into the caller's own tensor.
    pub fn decode(&self, max_len: usize) -> Result<Vec<f32>, CompressError> {
        let h = self.header()?;
        let n = usize::try_from(h.len).map_err(|_| too_big(h.method))?;
        if n > max_len {
            return Err(CompressError::TooLarge {
                method: h.method.name(),
                what: format!("payload claims {n} elements, caller allows {max_len}"),
            });
        }
        let mut out = vec![0f32; n];
        decode_into(
            &self.bytes,
            &mut out,
            Apply::Set,
            &mut DecodeScratch::default(),
        )?;
        Ok(out)
    }
    pub(crate) fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }
}
