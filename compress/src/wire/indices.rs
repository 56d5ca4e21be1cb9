//! The index section of sparse payloads (top-k, DGC, threshold): sorted indices sent as
//! gaps in LEB128 varints, both directions and the validation of hostile input.
//!
//! Sorted indices at density 1% are on average 100 apart, so most gaps fit one byte:
//! about 5 bytes per kept element with its f32 value instead of 8 with u32 indices,
//! which is what lets top-k 1% stay under 2% of the dense bytes with room for DGC's
//! sparsity warm-up. The gap is `index - previous - 1` (the first: the index itself),
//! so a run of neighbours costs one zero byte each.

use super::header::{inconsistent, MethodId, MAX_VARINT};
use crate::error::CompressError;

/// Bytes of the varint of `v`.
#[inline]
pub fn varint_len(v: u32) -> usize {
    // 1 + one more byte per further 7 bits (v | 1 keeps leading_zeros below 32).
    (32 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends the gap coding of `idx` (strictly increasing) to `out`.
pub(crate) fn write_gaps(idx: &[u32], out: &mut Vec<u8>) {
    let mut next = 0u32;
    for &i in idx {
        debug_assert!(i >= next, "indices must be strictly increasing");
        let mut gap = i - next;
        while gap >= 0x80 {
            out.push((gap as u8) | 0x80);
            gap >>= 7;
        }
        out.push(gap as u8);
        next = i.wrapping_add(1);
    }
}

/// Bytes `write_gaps` writes for `idx`.
pub(crate) fn gaps_len(idx: &[u32]) -> usize {
    let mut next = 0u32;
    idx.iter()
        .map(|&i| {
            let len = varint_len(i - next);
            next = i.wrapping_add(1);
            len
        })
        .sum()
}

/// Reads exactly `k` indices from `bytes` (which must be used up exactly) into `out`,
/// checking each varint's length and that every index is below `n`: a payload that
/// fails leaves only `out` changed.
pub(crate) fn read_indices(
    method: MethodId,
    bytes: &[u8],
    k: usize,
    n: usize,
    out: &mut Vec<u32>,
) -> Result<(), CompressError> {
    out.clear();
    out.reserve(k);
    let (mut at, mut next) = (0usize, 0u64);
    for j in 0..k {
        let mut gap = 0u64;
        let mut shift = 0;
        loop {
            let Some(&b) = bytes.get(at) else {
                return Err(inconsistent(
                    method,
                    format!("index section ends inside index {j} of {k}"),
                ));
            };
            at += 1;
            gap |= u64::from(b & 0x7F) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
            if shift >= 7 * MAX_VARINT as u32 {
                return Err(inconsistent(
                    method,
                    format!("index {j}: varint longer than {MAX_VARINT} bytes"),
                ));
            }
        }
        let i = next + gap;
        if i >= n as u64 {
            return Err(inconsistent(
                method,
                format!("index {i} at position {j} is out of range for length {n}"),
            ));
        }
        out.push(i as u32);
        next = i + 1;
    }
    if at != bytes.len() {
        return Err(inconsistent(
            method,
            format!(
                "index section holds {} bytes, its {k} indices use {at}",
                bytes.len()
            ),
        ));
    }
    Ok(())
}
