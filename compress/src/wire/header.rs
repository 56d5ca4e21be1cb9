//! The payload prefix: magic, version, method, length and per-method parameters, with
//! the validation that fixes the body size before any body byte is read.

use crate::error::CompressError;

/// First four bytes of every payload.
pub const MAGIC: [u8; 4] = *b"MRCZ";
/// Wire-format version written and read by this build.
/// Version 2: sparse payloads send their indices as varint gaps (version 1: u32 each).
pub const VERSION: u16 = 2;
/// Bytes before the method parameters.
pub const HEADER_LEN: usize = 16;

/// Longest varint of a sparse payload's index gap (a u32: 5 groups of 7 bits).
pub(crate) const MAX_VARINT: usize = 5;

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

    /// Top-k, DGC top-k and threshold: the methods whose payloads carry their own indices
    /// (and that error feedback's DGC corrections and selection options apply to).
    pub fn is_sparse(self) -> bool {
        matches!(self, Self::TopK | Self::DgcTopK | Self::Threshold)
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
    /// Top-k, DGC, threshold: `k` indices as varint gaps in `index_bytes` bytes (see
    /// `wire::indices`), then their `k` values, f32 or (flag bit 0) bf16.
    Sparse {
        k: u64,
        index_bytes: u64,
        values: SparseValues,
    },
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

/// How a sparse payload's values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SparseValues {
    #[default]
    F32,
    /// Rounded to bf16 (to nearest, ties to even): half the value bytes. Under error
    /// feedback the rounding error stays in the residual and is sent later.
    Bf16,
}

impl SparseValues {
    /// Bytes per value on the wire.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }
    /// The header's flags byte (bit 0: bf16 values).
    fn flags(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::Bf16 => 1,
        }
    }
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
        MethodId::TopK | MethodId::DgcTopK | MethodId::Threshold => 16,
        MethodId::RandK => 16,
        MethodId::Qsgd => 8,
        MethodId::TernGrad | MethodId::Sign => 4,
        MethodId::PowerSgd => 12,
    }
}

pub(crate) fn inconsistent(method: MethodId, what: impl Into<String>) -> CompressError {
    CompressError::Inconsistent {
        method: method.name(),
        what: what.into(),
    }
}

pub(crate) fn too_big(method: MethodId) -> CompressError {
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
            (
                MethodId::TopK | MethodId::DgcTopK | MethodId::Threshold,
                Params::Sparse {
                    k,
                    index_bytes,
                    values,
                },
            ) => {
                if k > self.len {
                    return Err(inconsistent(m, format!("k = {k} exceeds length {n}")));
                }
                if n > u32::MAX as usize + 1 {
                    return Err(inconsistent(m, "length exceeds u32 index range"));
                }
                // Every varint takes 1 to MAX_VARINT bytes.
                if index_bytes < k || index_bytes > k * MAX_VARINT as u64 {
                    return Err(inconsistent(
                        m,
                        format!("{index_bytes} index bytes cannot hold {k} indices"),
                    ));
                }
                mul(k as usize, values.bytes())?
                    .checked_add(index_bytes as usize)
                    .ok_or_else(|| too_big(m))
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
        out.push(match self.params {
            Params::Sparse { values, .. } => values.flags(),
            _ => 0,
        });
        out.extend_from_slice(&self.len.to_le_bytes());
        match self.params {
            Params::None => {}
            Params::Sparse { k, index_bytes, .. } => {
                out.extend_from_slice(&k.to_le_bytes());
                out.extend_from_slice(&index_bytes.to_le_bytes());
            }
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
        let values = match bytes[7] {
            0 => SparseValues::F32,
            1 if method.is_sparse() => SparseValues::Bf16,
            other => return Err(CompressError::BadFlags(other)),
        };
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
            MethodId::TopK | MethodId::DgcTopK | MethodId::Threshold => Params::Sparse {
                k: u64_at(p, 0),
                index_bytes: u64_at(p, 8),
                values,
            },
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

/// Reads the header of a payload without decoding the body (validates everything
/// `decode_into` validates except the body contents).
pub fn peek(payload: &[u8]) -> Result<Header, CompressError> {
    Header::parse(payload).map(|(h, _)| h)
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
