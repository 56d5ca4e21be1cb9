//! The versioned wire format of compressed payloads and its validating decoder.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! offset 0   magic  b"MRCZ"
//!        4   version u16 (= 2)
//!        6   method  u8  (MethodId)
//!        7   flags   u8  (0; sparse methods: bit 0 = bf16 values)
//!        8   len     u64 (elements of the decoded tensor)
//!       16   params  (fixed size per method, see `Params`)
//!            body    (size fully determined by len and params)
//! ```
//!
//! The body size is a function of the header, so a payload is accepted only if its
//! length equals header + params + body exactly: truncation and trailing bytes are both
//! errors. Every index, level and scale is checked before it is used, and the caller
//! supplies the output buffer (its length must equal `len`), so a hostile header can
//! neither write out of bounds nor make the decoder allocate more than the caller's
//! tensor.
//!
//! Files, each depending only on those before it: `header` (the prefix and its
//! validation), `indices` (the varint gaps of sparse payloads), `apply` (how decoded
//! values combine with the output), `packed` (the bit-packed quantizer bodies), `decode`
//! (the body decoders of every method), `payload` (the owned buffer that travels). Compressors build on this module; it never reaches
//! back into them, so any payload decodes without a compressor.

mod apply;
mod decode;
mod header;
mod indices;
pub(crate) mod packed;
mod payload;

pub use apply::{Apply, DecodeScratch};
pub(crate) use apply::{Op, OpSet};
pub(crate) use decode::STAGE;
pub use decode::{decode_into, sparse_indices, Half};
pub use header::{
    peek, qsgd_bits, Header, MethodId, Params, SparseValues, HEADER_LEN, MAGIC, QSGD_MAX_LEVELS,
    VERSION,
};
pub use indices::varint_len;
pub(crate) use indices::{gaps_len, write_gaps};
pub use payload::Payload;
