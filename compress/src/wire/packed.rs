//! The bit-packed bodies of QSGD, TernGrad and sign: fixed-width code packing (least
//! significant bit first) and the validating decoders. The encoders live with the
//! quantizer in `methods/quant.rs` and write through `BitWriter`, so both directions of
//! the packing sit in this one file.

use super::apply::Op;
use super::header::{check_scale, f32_at, qsgd_bits, MethodId};
use crate::error::CompressError;

/// Packs codes of a fixed width, least-significant bit first, into an exactly sized,
/// zeroed byte slice.
pub(crate) struct BitWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
    acc: u64,
    n: u32,
}

impl<'a> BitWriter<'a> {
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        Self {
            out,
            pos: 0,
            acc: 0,
            n: 0,
        }
    }
    #[inline(always)]
    pub(crate) fn put(&mut self, code: u32, bits: u32) {
        self.acc |= (code as u64) << self.n;
        self.n += bits;
        if self.n >= 32 {
            self.out[self.pos..self.pos + 4].copy_from_slice(&(self.acc as u32).to_le_bytes());
            self.pos += 4;
            self.acc >>= 32;
            self.n -= 32;
        }
    }
    pub(crate) fn finish(self) {
        let bytes = self.n.div_ceil(8) as usize;
        let le = self.acc.to_le_bytes();
        self.out[self.pos..self.pos + bytes].copy_from_slice(&le[..bytes]);
    }
}

/// Reads fixed-width codes written by `BitWriter`. Past the end it yields zero bits
/// (the body length is validated beforehand, so this never happens on a valid payload).
struct BitReader<'a> {
    src: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
}

impl<'a> BitReader<'a> {
    fn new(src: &'a [u8]) -> Self {
        Self {
            src,
            pos: 0,
            acc: 0,
            n: 0,
        }
    }
    #[inline(always)]
    fn get(&mut self, bits: u32) -> u32 {
        if self.n < bits {
            let take = (self.src.len() - self.pos).min(4);
            for (i, &b) in self.src[self.pos..self.pos + take].iter().enumerate() {
                self.acc |= (b as u64) << (self.n + 8 * i as u32);
            }
            self.pos += take;
            self.n += 8 * take as u32;
        }
        let v = (self.acc & ((1u64 << bits) - 1)) as u32;
        self.acc >>= bits;
        self.n = self.n.saturating_sub(bits);
        v
    }
}

pub(crate) fn decode_qsgd<O: Op>(
    levels: u32,
    bucket: usize,
    body: &[u8],
    out: &mut [f32],
) -> Result<(), CompressError> {
    let m = MethodId::Qsgd;
    let nb = out.len().div_ceil(bucket);
    let (scales, codes) = body.split_at(4 * nb);
    let bits = qsgd_bits(levels);
    let mut r = BitReader::new(codes);
    let inv_s = 1.0 / levels as f32;
    for (b, chunk) in out.chunks_mut(bucket).enumerate() {
        let norm = f32_at(scales, b);
        check_scale(m, b, norm)?;
        let unit = norm * inv_s;
        // Track the largest level instead of branching per element, and report after
        // the bucket (on error the output is unspecified, but stays in bounds).
        let mut top = 0u32;
        for d in chunk.iter_mut() {
            let code = r.get(bits);
            let l = code >> 1;
            top = top.max(l);
            let v = unit * l as f32;
            O::apply(d, f32::from_bits(v.to_bits() | (code << 31)));
        }
        if top > levels {
            return Err(CompressError::Inconsistent {
                method: m.name(),
                what: format!("level {top} > {levels} in bucket {b}"),
            });
        }
    }
    Ok(())
}

pub(crate) fn decode_terngrad<O: Op>(
    chunk: usize,
    body: &[u8],
    out: &mut [f32],
) -> Result<(), CompressError> {
    let m = MethodId::TernGrad;
    let nc = out.len().div_ceil(chunk);
    let (scales, codes) = body.split_at(4 * nc);
    let mut bad = false;
    for (c, part) in out.chunks_mut(chunk).enumerate() {
        let s = f32_at(scales, c);
        check_scale(m, c, s)?;
        // Code 3 is invalid; it maps to 0 here and is reported after the chunk, so
        // the loop has no data-dependent branch.
        let table = [0.0, s, -s, 0.0];
        let base = c * chunk;
        if base.is_multiple_of(4) {
            // Byte-aligned chunk start: four codes per byte, no per-element index math.
            let bytes = &codes[base / 4..];
            for (quad, &byte) in part.chunks_mut(4).zip(bytes) {
                bad |= (byte & (byte >> 1) & 0x55) != 0;
                for (j, d) in quad.iter_mut().enumerate() {
                    let code = ((byte >> (2 * j)) & 3) as i32;
                    // 0 -> 0, 1 -> +s, 2 -> -s (3 is flagged above).
                    O::apply(d, s * ((code & 1) - (code >> 1)) as f32);
                }
            }
        } else {
            for (j, d) in part.iter_mut().enumerate() {
                let i = base + j;
                let code = (codes[i >> 2] >> (2 * (i & 3))) & 3;
                bad |= code == 3;
                O::apply(d, table[code as usize]);
            }
        }
        if bad {
            return Err(CompressError::Inconsistent {
                method: m.name(),
                what: format!("invalid ternary code 3 in chunk {c}"),
            });
        }
    }
    Ok(())
}

pub(crate) fn decode_sign<O: Op>(
    chunk: usize,
    body: &[u8],
    out: &mut [f32],
) -> Result<(), CompressError> {
    let m = MethodId::Sign;
    let nc = out.len().div_ceil(chunk);
    let (scales, codes) = body.split_at(4 * nc);
    for (c, part) in out.chunks_mut(chunk).enumerate() {
        let s = f32_at(scales, c);
        check_scale(m, c, s)?;
        let base = c * chunk;
        let sb = s.to_bits();
        if base.is_multiple_of(8) {
            // Byte-aligned chunk start: eight signs per byte, no per-element index math.
            let bytes = &codes[base / 8..];
            for (oct, &byte) in part.chunks_mut(8).zip(bytes) {
                for (j, d) in oct.iter_mut().enumerate() {
                    let neg = ((byte >> j) & 1) as u32;
                    O::apply(d, f32::from_bits(sb | (neg << 31)));
                }
            }
        } else {
            for (j, d) in part.iter_mut().enumerate() {
                let i = base + j;
                let neg = ((codes[i >> 3] >> (i & 7)) & 1) as u32;
                O::apply(d, f32::from_bits(sb | (neg << 31)));
            }
        }
    }
    Ok(())
}
