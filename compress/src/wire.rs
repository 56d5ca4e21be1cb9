//! The versioned wire format of compressed payloads and its validating decoder.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! offset 0   magic  b"MRCZ"
//!        4   version u16 (= 1)
//!        6   method  u8  (MethodId)
//!        7   flags   u8  (reserved, must be 0)
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

use crate::error::CompressError;
use crate::rng;
use half::prelude::*;

/// First four bytes of every payload.
pub const MAGIC: [u8; 4] = *b"MRCZ";
/// Wire-format version written and read by this build.
pub const VERSION: u16 = 1;
/// Bytes before the method parameters.
pub const HEADER_LEN: usize = 16;

/// Largest QSGD level count: codes are at most 16 bits (sign + 15-bit level).
pub const QSGD_MAX_LEVELS: u32 = (1 << 15) - 1;

/// Method identifier stored in byte 6 of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MethodId {
    Identity = 1,
    Fp16 = 2,
    Bf16 = 3,
    TopK = 4,
    DgcTopK = 5,
    Threshold = 6,
    RandK = 7,
    Qsgd = 8,
    TernGrad = 9,
    Sign = 10,
    PowerSgd = 11,
}

impl MethodId {
    /// Parses the method byte.
    pub fn from_u8(b: u8) -> Result<Self, CompressError> {
        Ok(match b {
            1 => Self::Identity,
            2 => Self::Fp16,
            3 => Self::Bf16,
            4 => Self::TopK,
            5 => Self::DgcTopK,
            6 => Self::Threshold,
            7 => Self::RandK,
            8 => Self::Qsgd,
            9 => Self::TernGrad,
            10 => Self::Sign,
            11 => Self::PowerSgd,
            other => return Err(CompressError::UnknownMethod(other)),
        })
    }

    /// Stable lower-case name used in statistics, configs and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
            Self::TopK => "topk",
            Self::DgcTopK => "dgc_topk",
            Self::Threshold => "threshold",
            Self::RandK => "randk",
            Self::Qsgd => "qsgd",
            Self::TernGrad => "terngrad",
            Self::Sign => "sign",
            Self::PowerSgd => "powersgd",
        }
    }
}

/// Method parameters carried in the header: exactly what decoding needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Params {
    /// Identity, fp16, bf16: nothing beyond the length.
    None,
    /// Top-k, DGC, threshold: `k` (index u32, value f32) pairs.
    Sparse { k: u64 },
    /// Random-k: `k` f32 values at indices regenerated from `seed`.
    RandK { k: u64, seed: u64 },
    /// QSGD: one f32 norm per bucket, then `1 + bits(levels)`-bit codes.
    Qsgd { levels: u32, bucket: u32 },
    /// TernGrad: one f32 scale per chunk, then 2-bit codes.
    TernGrad { chunk: u32 },
    /// Sign: one f32 scale per chunk, then 1-bit signs.
    Sign { chunk: u32 },
    /// PowerSGD: P (rows x rank) then Q (cols x rank), row-major f32.
    PowerSgd { rows: u32, cols: u32, rank: u32 },
}

/// A parsed and validated header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Header {
    pub method: MethodId,
    /// Elements of the decoded tensor.
    pub len: u64,
    pub params: Params,
}

/// Bits per QSGD code (sign + level in `0..=levels`).
pub fn qsgd_bits(levels: u32) -> u32 {
    1 + (32 - levels.leading_zeros())
}

fn params_len(method: MethodId) -> usize {
    match method {
        MethodId::Identity | MethodId::Fp16 | MethodId::Bf16 => 0,
        MethodId::TopK | MethodId::DgcTopK | MethodId::Threshold => 8,
        MethodId::RandK => 16,
        MethodId::Qsgd => 8,
        MethodId::TernGrad | MethodId::Sign => 4,
        MethodId::PowerSgd => 12,
    }
}

fn inconsistent(method: MethodId, what: impl Into<String>) -> CompressError {
    CompressError::Inconsistent {
        method: method.name(),
        what: what.into(),
    }
}

fn too_big(method: MethodId) -> CompressError {
    inconsistent(method, "body size overflows usize")
}

impl Header {
    /// Size of header plus parameters.
    pub fn prefix_len(&self) -> usize {
        HEADER_LEN + params_len(self.method)
    }

    /// Checks the parameters against each other and returns the body size in bytes.
    pub fn body_len(&self) -> Result<usize, CompressError> {
        let m = self.method;
        let n = usize::try_from(self.len).map_err(|_| too_big(m))?;
        let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| too_big(m));
        let chunks = |c: u32| -> Result<usize, CompressError> {
            if c == 0 {
                return Err(inconsistent(m, "chunk size is 0"));
            }
            Ok(n.div_ceil(c as usize))
        };
        match (m, self.params) {
            (MethodId::Identity, Params::None) => mul(n, 4),
            (MethodId::Fp16 | MethodId::Bf16, Params::None) => mul(n, 2),
            (MethodId::TopK | MethodId::DgcTopK | MethodId::Threshold, Params::Sparse { k }) => {
                if k > self.len {
                    return Err(inconsistent(m, format!("k = {k} exceeds length {n}")));
                }
                if n > u32::MAX as usize + 1 {
                    return Err(inconsistent(m, "length exceeds u32 index range"));
                }
                mul(k as usize, 8)
            }
            (MethodId::RandK, Params::RandK { k, .. }) => {
                if k > self.len {
                    return Err(inconsistent(m, format!("k = {k} exceeds length {n}")));
                }
                if n > u32::MAX as usize + 1 {
                    return Err(inconsistent(m, "length exceeds u32 index range"));
                }
                mul(k as usize, 4)
            }
            (MethodId::Qsgd, Params::Qsgd { levels, bucket }) => {
                if levels == 0 || levels > QSGD_MAX_LEVELS {
                    return Err(inconsistent(
                        m,
                        format!("levels = {levels} outside 1..={QSGD_MAX_LEVELS}"),
                    ));
                }
                let norms = mul(chunks(bucket)?, 4)?;
                let bits = mul(n, qsgd_bits(levels) as usize)?;
                norms
                    .checked_add(bits.div_ceil(8))
                    .ok_or_else(|| too_big(m))
            }
            (MethodId::TernGrad, Params::TernGrad { chunk }) => {
                let scales = mul(chunks(chunk)?, 4)?;
                scales.checked_add(n.div_ceil(4)).ok_or_else(|| too_big(m))
            }
            (MethodId::Sign, Params::Sign { chunk }) => {
                let scales = mul(chunks(chunk)?, 4)?;
                scales.checked_add(n.div_ceil(8)).ok_or_else(|| too_big(m))
            }
            (MethodId::PowerSgd, Params::PowerSgd { rows, cols, rank }) => {
                let (r, c, k) = (rows as usize, cols as usize, rank as usize);
                if r == 0 || c == 0 || k == 0 || k > r.min(c) {
                    return Err(inconsistent(
                        m,
                        format!("rank {k} invalid for a {r} x {c} view"),
                    ));
                }
                let cells = mul(r, c)?;
                // The view must cover the tensor with a partial last row at most.
                if cells < n || cells - n >= c {
                    return Err(inconsistent(
                        m,
                        format!("a {r} x {c} view does not fit length {n}"),
                    ));
                }
                mul(mul(r.checked_add(c).ok_or_else(|| too_big(m))?, k)?, 4)
            }
            _ => Err(inconsistent(m, "parameters belong to another method")),
        }
    }

    /// Total payload size in bytes.
    pub fn total_len(&self) -> Result<usize, CompressError> {
        self.body_len()?
            .checked_add(self.prefix_len())
            .ok_or_else(|| too_big(self.method))
    }

    /// Appends the header and parameters to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.method as u8);
        out.push(0);
        out.extend_from_slice(&self.len.to_le_bytes());
        match self.params {
            Params::None => {}
            Params::Sparse { k } => out.extend_from_slice(&k.to_le_bytes()),
            Params::RandK { k, seed } => {
                out.extend_from_slice(&k.to_le_bytes());
                out.extend_from_slice(&seed.to_le_bytes());
            }
            Params::Qsgd { levels, bucket } => {
                out.extend_from_slice(&levels.to_le_bytes());
                out.extend_from_slice(&bucket.to_le_bytes());
            }
            Params::TernGrad { chunk } | Params::Sign { chunk } => {
                out.extend_from_slice(&chunk.to_le_bytes())
            }
            Params::PowerSgd { rows, cols, rank } => {
                out.extend_from_slice(&rows.to_le_bytes());
                out.extend_from_slice(&cols.to_le_bytes());
                out.extend_from_slice(&rank.to_le_bytes());
            }
        }
    }

    /// Parses and validates a payload; returns the header and its body, whose length
    /// is exactly `body_len()`.
    pub fn parse(bytes: &[u8]) -> Result<(Header, &[u8]), CompressError> {
        if bytes.len() < HEADER_LEN {
            return Err(CompressError::Truncated {
                what: "header",
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        }
        let magic: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(CompressError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(CompressError::BadVersion {
                found: version,
                supported: VERSION,
            });
        }
        let method = MethodId::from_u8(bytes[6])?;
        if bytes[7] != 0 {
            return Err(CompressError::BadFlags(bytes[7]));
        }
        let len = u64_at(bytes, 8);
        let plen = params_len(method);
        if bytes.len() < HEADER_LEN + plen {
            return Err(CompressError::Truncated {
                what: "parameters",
                needed: HEADER_LEN + plen,
                available: bytes.len(),
            });
        }
        let p = &bytes[HEADER_LEN..HEADER_LEN + plen];
        let params = match method {
            MethodId::Identity | MethodId::Fp16 | MethodId::Bf16 => Params::None,
            MethodId::TopK | MethodId::DgcTopK | MethodId::Threshold => {
                Params::Sparse { k: u64_at(p, 0) }
            }
            MethodId::RandK => Params::RandK {
                k: u64_at(p, 0),
                seed: u64_at(p, 8),
            },
            MethodId::Qsgd => Params::Qsgd {
                levels: u32_at(p, 0),
                bucket: u32_at(p, 4),
            },
            MethodId::TernGrad => Params::TernGrad {
                chunk: u32_at(p, 0),
            },
            MethodId::Sign => Params::Sign {
                chunk: u32_at(p, 0),
            },
            MethodId::PowerSgd => Params::PowerSgd {
                rows: u32_at(p, 0),
                cols: u32_at(p, 4),
                rank: u32_at(p, 8),
            },
        };
        let header = Header {
            method,
            len,
            params,
        };
        let total = header.total_len()?;
        match bytes.len().cmp(&total) {
            std::cmp::Ordering::Less => Err(CompressError::Truncated {
                what: "body",
                needed: total,
                available: bytes.len(),
            }),
            std::cmp::Ordering::Greater => Err(CompressError::Oversized {
                expected: total,
                actual: bytes.len(),
            }),
            std::cmp::Ordering::Equal => Ok((header, &bytes[HEADER_LEN + plen..])),
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

#[inline]
pub(crate) fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// How decoded values are combined with the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// `out = decoded` (positions a sparse payload does not name become 0).
    Set,
    /// `out += decoded`.
    Add,
    /// `out -= decoded` (used to turn the compensated gradient into the residual).
    Sub,
}

/// The element-wise combination, monomorphised so the inner loops stay branch-free.
pub(crate) trait Op {
    const SET: bool;
    /// Factor on the decoded value when folded into a product (PowerSGD's GEMM).
    const SIGN: f32;
    fn apply(dst: &mut f32, v: f32);
}
pub(crate) struct OpSet;
pub(crate) struct OpAdd;
pub(crate) struct OpSub;
impl Op for OpSet {
    const SET: bool = true;
    const SIGN: f32 = 1.0;
    #[inline(always)]
    fn apply(dst: &mut f32, v: f32) {
        *dst = v;
    }
}
impl Op for OpAdd {
    const SET: bool = false;
    const SIGN: f32 = 1.0;
    #[inline(always)]
    fn apply(dst: &mut f32, v: f32) {
        *dst += v;
    }
}
impl Op for OpSub {
    const SET: bool = false;
    const SIGN: f32 = -1.0;
    #[inline(always)]
    fn apply(dst: &mut f32, v: f32) {
        *dst -= v;
    }
}

/// Reusable buffers for decoding (random-k index regeneration, PowerSGD factors).
#[derive(Debug, Default, Clone)]
pub struct DecodeScratch {
    pub(crate) bits: Vec<u64>,
    pub(crate) idx: Vec<u32>,
    pub(crate) p: Vec<f32>,
    pub(crate) q: Vec<f32>,
}

/// Reads the header of a payload without decoding the body (validates everything
/// `decode_into` validates except the body contents).
pub fn peek(payload: &[u8]) -> Result<Header, CompressError> {
    Header::parse(payload).map(|(h, _)| h)
}

/// Decodes `payload` into `out` (whose length must equal the header's `len`),
/// combining as `apply` says. On error nothing is guaranteed about `out`'s contents,
/// but no write falls outside it.
pub fn decode_into(
    payload: &[u8],
    out: &mut [f32],
    apply: Apply,
    scratch: &mut DecodeScratch,
) -> Result<Header, CompressError> {
    match apply {
        Apply::Set => decode_op::<OpSet>(payload, out, scratch),
        Apply::Add => decode_op::<OpAdd>(payload, out, scratch),
        Apply::Sub => decode_op::<OpSub>(payload, out, scratch),
    }
}

fn decode_op<O: Op>(
    payload: &[u8],
    out: &mut [f32],
    scratch: &mut DecodeScratch,
) -> Result<Header, CompressError> {
    let (h, body) = Header::parse(payload)?;
    if h.len != out.len() as u64 {
        return Err(CompressError::LengthMismatch {
            what: "output buffer",
            expected: usize::try_from(h.len).unwrap_or(usize::MAX),
            actual: out.len(),
        });
    }
    match h.params {
        Params::None => match h.method {
            MethodId::Identity => decode_f32::<O>(body, out),
            MethodId::Fp16 => decode_half::<O, f16>(body, out),
            _ => decode_half::<O, bf16>(body, out),
        },
        Params::Sparse { k } => decode_sparse::<O>(h.method, k as usize, body, out)?,
        Params::RandK { k, seed } => {
            rng::randk_indices(
                out.len(),
                k as usize,
                seed,
                &mut scratch.bits,
                &mut scratch.idx,
            );
            if O::SET {
                out.fill(0.0);
            }
            for (j, &i) in scratch.idx.iter().enumerate() {
                O::apply(&mut out[i as usize], f32_at(body, j));
            }
        }
        Params::Qsgd { levels, bucket } => {
            crate::methods::quant::decode_qsgd::<O>(levels, bucket as usize, body, out)?
        }
        Params::TernGrad { chunk } => {
            crate::methods::quant::decode_terngrad::<O>(chunk as usize, body, out)?
        }
        Params::Sign { chunk } => {
            crate::methods::quant::decode_sign::<O>(chunk as usize, body, out)?
        }
        Params::PowerSgd { rows, cols, rank } => crate::methods::powersgd::decode::<O>(
            rows as usize,
            cols as usize,
            rank as usize,
            body,
            out,
            scratch,
        ),
    }
    Ok(h)
}

fn decode_f32<O: Op>(body: &[u8], out: &mut [f32]) {
    if O::SET {
        bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(body);
        return;
    }
    for (d, b) in out.iter_mut().zip(body.chunks_exact(4)) {
        O::apply(d, f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    }
}

/// 16-bit float types (`half::f16`, `half::bf16`) the cast compressors and decoder share.
pub trait Half: Copy + Default + bytemuck::Pod {
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
    fn from_f32_slice(src: &[f32], dst: &mut [Self]);
}
impl Half for f16 {
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src)
    }
}
impl Half for bf16 {
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src)
    }
}

/// Elements per staging block: payload bytes are unaligned, so half values are
/// staged through small aligned stack buffers that stay in L1.
pub(crate) const STAGE: usize = 1024;

fn decode_half<O: Op, H: Half>(body: &[u8], out: &mut [f32]) {
    let mut h = [H::default(); STAGE];
    let mut f = [0f32; STAGE];
    for (dst, src) in out.chunks_mut(STAGE).zip(body.chunks(2 * STAGE)) {
        let n = dst.len();
        bytemuck::cast_slice_mut::<H, u8>(&mut h[..n]).copy_from_slice(src);
        if O::SET {
            H::to_f32_slice(&h[..n], dst);
        } else {
            H::to_f32_slice(&h[..n], &mut f[..n]);
            for (d, &v) in dst.iter_mut().zip(&f[..n]) {
                O::apply(d, v);
            }
        }
    }
}

fn decode_sparse<O: Op>(
    method: MethodId,
    k: usize,
    body: &[u8],
    out: &mut [f32],
) -> Result<(), CompressError> {
    let (idx, vals) = body.split_at(4 * k);
    let n = out.len();
    // Validate every index before touching `out`, so a bad payload leaves it intact.
    for (j, b) in idx.chunks_exact(4).enumerate() {
        let i = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if i >= n {
            return Err(inconsistent(
                method,
                format!("index {i} at position {j} is out of range for length {n}"),
            ));
        }
    }
    if O::SET {
        out.fill(0.0);
    }
    for (b, v) in idx.chunks_exact(4).zip(vals.chunks_exact(4)) {
        let i = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        O::apply(&mut out[i], f32::from_le_bytes([v[0], v[1], v[2], v[3]]));
    }
    Ok(())
}

/// Checks that a decoded scale is usable: finite and non-negative.
#[inline]
pub(crate) fn check_scale(method: MethodId, index: usize, value: f32) -> Result<(), CompressError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(CompressError::BadScale {
            method: method.name(),
            index,
            value,
        })
    }
}

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
