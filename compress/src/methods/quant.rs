//! Quantizers: QSGD (s levels, stochastic rounding), TernGrad, 1-bit sign with scale.

use super::{Compressor, Ctx, MethodConfig};
use crate::error::CompressError;
use crate::rng;
use crate::wire::{
    check_scale, f32_at, qsgd_bits, DecodeScratch, Header, MethodId, Op, Params, Payload,
};

/// Sum with eight independent accumulators, so the loop vectorises (a single
/// accumulator forces strict left-to-right float addition).
#[inline]
fn sum_lanes(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    let tail: f32 = it.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f32>() + tail
}

/// Packs codes of a fixed width, least-significant bit first, into an exactly sized,
/// zeroed byte slice.
struct BitWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
    acc: u64,
    n: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut [u8]) -> Self {
        Self {
            out,
            pos: 0,
            acc: 0,
            n: 0,
        }
    }
    #[inline(always)]
    fn put(&mut self, code: u32, bits: u32) {
        self.acc |= (code as u64) << self.n;
        self.n += bits;
        if self.n >= 32 {
            self.out[self.pos..self.pos + 4].copy_from_slice(&(self.acc as u32).to_le_bytes());
            self.pos += 4;
            self.acc >>= 32;
            self.n -= 32;
        }
    }
    fn finish(self) {
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

/// QSGD, TernGrad and sign: per-chunk scale plus fixed-width codes.
#[derive(Debug)]
pub struct Quantizer {
    config: MethodConfig,
    scratch: DecodeScratch,
}

impl Quantizer {
    pub(crate) fn new(config: MethodConfig) -> Self {
        Self {
            config,
            scratch: DecodeScratch::default(),
        }
    }
}

fn non_finite(method: MethodId, index: usize, value: f32) -> CompressError {
    CompressError::NonFiniteInput {
        method: method.name(),
        index,
        value,
    }
}

/// Writes header, sizes the body, and returns (scale area, code area).
fn layout(buf: &mut Vec<u8>, header: Header) -> Result<(&mut [u8], &mut [u8]), CompressError> {
    buf.clear();
    header.write(buf);
    let at = buf.len();
    let body = header.body_len()?;
    buf.resize(at + body, 0);
    let chunk = match header.params {
        Params::Qsgd { bucket, .. } => bucket,
        Params::TernGrad { chunk } | Params::Sign { chunk } => chunk,
        _ => unreachable!("layout is only called for chunked quantizers"),
    } as usize;
    let scales = 4 * (header.len as usize).div_ceil(chunk);
    Ok(buf[at..].split_at_mut(scales))
}

fn compress_qsgd(
    x: &[f32],
    levels: u32,
    bucket: usize,
    seed: u64,
    buf: &mut Vec<u8>,
) -> Result<(), CompressError> {
    let m = MethodId::Qsgd;
    let header = Header {
        method: m,
        len: x.len() as u64,
        params: Params::Qsgd {
            levels,
            bucket: bucket as u32,
        },
    };
    let bits = qsgd_bits(levels);
    let (scales, codes) = layout(buf, header)?;
    let mut w = BitWriter::new(codes);
    let mut g = rng::stream(seed);
    let s = levels as f32;
    for (b, chunk) in x.chunks(bucket).enumerate() {
        let norm = sum_lanes(chunk, |v| v * v).sqrt();
        if !norm.is_finite() {
            return Err(non_finite(m, b, norm));
        }
        scales[4 * b..4 * b + 4].copy_from_slice(&norm.to_le_bytes());
        let inv = if norm > 0.0 { s / norm } else { 0.0 };
        // floor(a + u) with u ~ U[0,1) rounds a up with probability frac(a): unbiased.
        // The clamp guards |v| / norm rounding above 1. Signs are taken branch-free
        // (random signs would mispredict half the time).
        let code = |v: f32, u: f32| -> u32 {
            let l = ((v.abs() * inv + u) as u32).min(levels);
            (l << 1) | ((l != 0) as u32 & (v.to_bits() >> 31))
        };
        let mut pairs = chunk.chunks_exact(2);
        for pair in &mut pairs {
            let (u0, u1) = rng::uniform_pair(&mut g);
            w.put(code(pair[0], u0), bits);
            w.put(code(pair[1], u1), bits);
        }
        if let [v] = pairs.remainder() {
            w.put(code(*v, rng::uniform_pair(&mut g).0), bits);
        }
    }
    w.finish();
    Ok(())
}

fn compress_terngrad(
    x: &[f32],
    chunk: usize,
    seed: u64,
    buf: &mut Vec<u8>,
) -> Result<(), CompressError> {
    let m = MethodId::TernGrad;
    let header = Header {
        method: m,
        len: x.len() as u64,
        params: Params::TernGrad {
            chunk: chunk as u32,
        },
    };
    let (scales, codes) = layout(buf, header)?;
    let mut w = BitWriter::new(codes);
    let mut g = rng::stream(seed);
    for (c, part) in x.chunks(chunk).enumerate() {
        // Max over magnitude bits: NaN's bits exceed infinity's, so it is caught below.
        let smax = f32::from_bits(
            part.iter()
                .map(|v| v.to_bits() & 0x7FFF_FFFF)
                .max()
                .unwrap_or(0),
        );
        if !smax.is_finite() {
            return Err(non_finite(m, c, smax));
        }
        scales[4 * c..4 * c + 4].copy_from_slice(&smax.to_le_bytes());
        let inv = if smax > 0.0 { 1.0 / smax } else { 0.0 };
        // Keep with probability |v| / s: E[s * sign * keep] = v. Branch-free.
        let code =
            |v: f32, u: f32| -> u32 { (u < v.abs() * inv) as u32 * (1 + (v.to_bits() >> 31)) };
        let mut pairs = part.chunks_exact(2);
        for pair in &mut pairs {
            let (u0, u1) = rng::uniform_pair(&mut g);
            w.put(code(pair[0], u0), 2);
            w.put(code(pair[1], u1), 2);
        }
        if let [v] = pairs.remainder() {
            w.put(code(*v, rng::uniform_pair(&mut g).0), 2);
        }
    }
    w.finish();
    Ok(())
}

fn compress_sign(x: &[f32], chunk: usize, buf: &mut Vec<u8>) -> Result<(), CompressError> {
    let m = MethodId::Sign;
    let header = Header {
        method: m,
        len: x.len() as u64,
        params: Params::Sign {
            chunk: chunk as u32,
        },
    };
    let (scales, codes) = layout(buf, header)?;
    for (c, part) in x.chunks(chunk).enumerate() {
        let scale = sum_lanes(part, f32::abs) / part.len() as f32;
        if !scale.is_finite() {
            return Err(non_finite(m, c, scale));
        }
        scales[4 * c..4 * c + 4].copy_from_slice(&scale.to_le_bytes());
    }
    for (byte, group) in codes.iter_mut().zip(x.chunks(8)) {
        let mut b = 0u8;
        for (j, &v) in group.iter().enumerate() {
            b |= ((v.to_bits() >> 31) as u8) << j;
        }
        *byte = b;
    }
    Ok(())
}

impl Compressor for Quantizer {
    fn method(&self) -> MethodId {
        self.config.method()
    }
    fn config(&self) -> &MethodConfig {
        &self.config
    }
    fn aggregation(&self) -> super::Aggregation {
        super::Aggregation::GatherThenSum
    }
    fn compress_into(
        &mut self,
        x: &[f32],
        ctx: &mut Ctx<'_>,
        out: &mut Payload,
    ) -> Result<(), CompressError> {
        let buf = out.buf_mut();
        match self.config {
            MethodConfig::Qsgd { levels, bucket } => {
                compress_qsgd(x, levels, bucket, ctx.local_seed, buf)
            }
            MethodConfig::TernGrad { chunk } => compress_terngrad(x, chunk, ctx.local_seed, buf),
            MethodConfig::Sign { chunk } => compress_sign(x, chunk, buf),
            _ => unreachable!("Quantizer is built only for QSGD, TernGrad and sign"),
        }
    }
    fn scratch(&mut self) -> &mut DecodeScratch {
        &mut self.scratch
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
