//! The body decoders of every method and `decode_into`, which validates a payload and
//! dispatches to them.

use super::apply::{Apply, DecodeScratch, Op, OpAdd, OpSet, OpSub};
use super::header::{f32_at, inconsistent, Header, MethodId, Params, SparseValues};
use super::indices::read_indices;
use super::packed;
use crate::error::CompressError;
use crate::lowrank::{p_times_qt, View};
use crate::rng;
use half::prelude::*;

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
        Params::Sparse { k, values, .. } => {
            decode_sparse::<O>(h.method, k as usize, values, body, out, &mut scratch.idx)?
        }
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
            packed::decode_qsgd::<O>(levels, bucket as usize, body, out)?
        }
        Params::TernGrad { chunk } => packed::decode_terngrad::<O>(chunk as usize, body, out)?,
        Params::Sign { chunk } => packed::decode_sign::<O>(chunk as usize, body, out)?,
        Params::PowerSgd { rows, cols, rank } => decode_powersgd::<O>(
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
    values: SparseValues,
    body: &[u8],
    out: &mut [f32],
    idx: &mut Vec<u32>,
) -> Result<(), CompressError> {
    // The header fixed the body at index section + k values.
    let (gaps, vals) = body.split_at(body.len() - values.bytes() * k);
    // Read (and check) every index before touching `out`, so a bad payload leaves it
    // intact.
    read_indices(method, gaps, k, out.len(), idx)?;
    if O::SET {
        out.fill(0.0);
    }
    match values {
        SparseValues::F32 => {
            for (&i, v) in idx.iter().zip(vals.chunks_exact(4)) {
                O::apply(
                    &mut out[i as usize],
                    f32::from_le_bytes([v[0], v[1], v[2], v[3]]),
                );
            }
        }
        SparseValues::Bf16 => {
            for (&i, v) in idx.iter().zip(vals.chunks_exact(2)) {
                O::apply(
                    &mut out[i as usize],
                    bf16::from_le_bytes([v[0], v[1]]).to_f32(),
                );
            }
        }
    }
    Ok(())
}

/// The indices a sparse payload (top-k, DGC, threshold) carries, in increasing order,
/// into `out`; an error for a payload of another method or a malformed one.
pub fn sparse_indices(payload: &[u8], out: &mut Vec<u32>) -> Result<(), CompressError> {
    let (h, body) = Header::parse(payload)?;
    let Params::Sparse { k, index_bytes, .. } = h.params else {
        return Err(inconsistent(h.method, "not a sparse payload"));
    };
    let n = usize::try_from(h.len).unwrap_or(usize::MAX);
    read_indices(h.method, &body[..index_bytes as usize], k as usize, n, out)
}

/// Decodes a PowerSGD body (validated by the header) into `out`.
fn decode_powersgd<O: Op>(
    rows: usize,
    cols: usize,
    r: usize,
    body: &[u8],
    out: &mut [f32],
    scratch: &mut DecodeScratch,
) {
    let v = View {
        rows,
        cols,
        len: out.len(),
    };
    // Payload bytes are unaligned: copy the (small) factors into aligned scratch.
    scratch.p.clear();
    scratch.p.extend((0..rows * r).map(|i| f32_at(body, i)));
    scratch.q.clear();
    scratch
        .q
        .extend((0..cols * r).map(|i| f32_at(body, rows * r + i)));
    p_times_qt::<O>(&scratch.p, &scratch.q, v, r, out);
}
