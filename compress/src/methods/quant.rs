//! Quantizers: QSGD (s levels, stochastic rounding), TernGrad, 1-bit sign with scale.

use super::api::{Aggregation, Compressor, Ctx};
use super::config::MethodConfig;
use crate::error::CompressError;
use crate::rng;
use crate::wire::packed::BitWriter;
use crate::wire::{qsgd_bits, DecodeScratch, Header, MethodId, Params, Payload};

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
    fn aggregation(&self) -> Aggregation {
        Aggregation::GatherThenSum
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
