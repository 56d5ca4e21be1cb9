//! Recursive-doubling all-reduce, for small buffers (fewer, larger steps than the ring:
//! `log2 n` exchanges of the whole buffer instead of `2 (n - 1)` of a chunk).

use super::lane::{Lane, Wire};
use crate::error::Result;
use crate::op::ReduceOp;
use crate::reduce::{combine_into, finish_avg};
use crate::stats::OpKind;

/// All-reduce by recursive doubling; ranks beyond the largest power of two fold into a
/// partner first and get the result back at the end. Both partners compute
/// `mine (op) theirs` from the same two operands, so all ranks end bit-identical.
pub(super) fn all_reduce<T: Wire>(l: &mut Lane, buf: &mut [T], op: ReduceOp) -> Result<()> {
    let kind = OpKind::AllReduce;
    let n = l.size;
    let r = l.rank;
    let len = buf.len();
    let pof2 = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let extra = n - pof2;
    if r >= pof2 {
        let m = l.copy_msg(buf);
        l.send_elems(r - pof2, kind, len, m)?;
        let m = l.recv_elems::<T>(r - pof2, kind, len, len)?;
        buf.copy_from_slice(&m);
        l.recycle(m);
        return Ok(());
    }
    if r < extra {
        let m = l.recv_elems::<T>(r + pof2, kind, len, len)?;
        combine_into(buf, &m, op);
        l.recycle(m);
    }
    let mut mask = 1;
    while mask < pof2 {
        let partner = r ^ mask;
        let m = l.copy_msg(buf);
        l.send_elems(partner, kind, len, m)?;
        let m = l.recv_elems::<T>(partner, kind, len, len)?;
        combine_into(buf, &m, op);
        l.recycle(m);
        mask <<= 1;
    }
    finish_avg(buf, op, n);
    if r < extra {
        let m = l.copy_msg(buf);
        l.send_elems(r + pof2, kind, len, m)?;
    }
    Ok(())
}
