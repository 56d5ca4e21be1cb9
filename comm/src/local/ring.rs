//! The segmented ring: reduce-scatter, and all-reduce as reduce-scatter then all-gather,
//! for large buffers. Segments pipeline around the ring; a segment's message buffer is
//! reduced into in place and forwarded, never copied per hop.

use std::ops::Range;

use super::lane::{Lane, Wire};
use crate::communicator::{chunk_len, chunk_range};
use crate::error::Result;
use crate::op::ReduceOp;
use crate::reduce::{combine_final_both, combine_final_into, combine_into};
use crate::stats::OpKind;

enum RingBuf<'a, T> {
    InPlace(&'a mut [T]),
    Scatter { input: &'a [T], output: &'a mut [T] },
}

impl<T> RingBuf<'_, T> {
    fn len(&self) -> usize {
        self.input().len()
    }

    fn input(&self) -> &[T] {
        match self {
            RingBuf::InPlace(b) => b,
            RingBuf::Scatter { input, .. } => input,
        }
    }
}

/// Ring all-reduce of `buf` (the group has at least two ranks).
pub(super) fn all_reduce<T: Wire>(l: &mut Lane, buf: &mut [T], op: ReduceOp) -> Result<()> {
    ring(l, RingBuf::InPlace(buf), op, OpKind::AllReduce)
}

/// Ring reduce-scatter: chunk `rank` of the reduced `input` into `output` (already checked
/// to be that chunk's length by `reduction::reduce_scatter`).
pub(super) fn reduce_scatter<T: Wire>(
    l: &mut Lane,
    input: &[T],
    output: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    debug_assert_eq!(output.len(), chunk_len(input.len(), l.size, l.rank));
    if l.size == 1 {
        output.copy_from_slice(input);
        return Ok(());
    }
    ring(
        l,
        RingBuf::Scatter { input, output },
        op,
        OpKind::ReduceScatter,
    )
}

/// Ring reduce-scatter (and, for `InPlace`, all-gather). At reduce-scatter step `k` rank
/// `r` receives chunk `(r - k - 2) mod n`, so it ends with chunk `r` fully reduced. The
/// last reduction writes the result to both the rank's buffer and the message, which then
/// travels on as the all-gather message; the rank that retires it pools it.
fn ring<T: Wire>(l: &mut Lane, mut b: RingBuf<'_, T>, op: ReduceOp, kind: OpKind) -> Result<()> {
    let n = l.size;
    let r = l.rank;
    let len = b.len();
    let left = (r + n - 1) % n;
    let right = (r + 1) % n;
    let seg = (l.shared.config.segment_bytes / std::mem::size_of::<T>()).max(1);
    let nseg = chunk_len(len, n, 0).div_ceil(seg).max(1);
    let segr = |c: usize, j: usize| -> Range<usize> {
        let cr = chunk_range(len, n, c);
        let s = (cr.start + j * seg).min(cr.end);
        s..(s + seg).min(cr.end)
    };
    let all_gather = matches!(b, RingBuf::InPlace(_));
    // Step 0 sends its own chunk with at most `WINDOW` segments ahead of what this rank
    // has consumed, so segments are read back while still in cache rather than the
    // whole chunk being staged through memory first. The receiver reads step-major, so
    // messages this rank forwards during step 0 wait until its step-0 sends are done.
    const WINDOW: usize = 4;
    let c0 = (r + n - 1) % n;
    let mut next0 = 0;
    while next0 < nseg.min(WINDOW) {
        let m = l.copy_msg(&b.input()[segr(c0, next0)]);
        l.send_elems(right, kind, len, m)?;
        next0 += 1;
    }
    let mut held: Vec<Vec<T>> = Vec::new();
    for k in 0..n - 1 {
        let c = (r + 2 * n - k - 2) % n;
        let last = k == n - 2;
        for j in 0..nseg {
            if next0 < nseg {
                let m = l.copy_msg(&b.input()[segr(c0, next0)]);
                l.send_elems(right, kind, len, m)?;
                next0 += 1;
            }
            let rg = segr(c, j);
            let mut m = l.recv_elems::<T>(left, kind, len, rg.len())?;
            let forward = if !last {
                combine_into(&mut m, &b.input()[rg], op);
                Some(m)
            } else {
                match &mut b {
                    RingBuf::InPlace(buf) => {
                        combine_final_both(&mut m, &mut buf[rg], op, n);
                        Some(m)
                    }
                    RingBuf::Scatter { input, output } => {
                        let off = chunk_range(len, n, r).start;
                        let out = &mut output[rg.start - off..rg.end - off];
                        combine_final_into(out, &m, &input[rg], op, n);
                        l.recycle(m);
                        None
                    }
                }
            };
            if let Some(m) = forward {
                if next0 < nseg {
                    held.push(m);
                } else {
                    for h in held.drain(..) {
                        l.send_elems(right, kind, len, h)?;
                    }
                    l.send_elems(right, kind, len, m)?;
                }
            }
        }
    }
    if let (true, RingBuf::InPlace(buf)) = (all_gather, b) {
        for k in 0..n - 1 {
            let c = (r + n - k - 1) % n;
            for j in 0..nseg {
                let rg = segr(c, j);
                let m = l.recv_elems::<T>(left, kind, len, rg.len())?;
                buf[rg].copy_from_slice(&m);
                if k < n - 2 {
                    l.send_elems(right, kind, len, m)?;
                } else {
                    l.recycle(m);
                }
            }
        }
    }
    Ok(())
}
