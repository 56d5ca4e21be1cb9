//! Entry points of the reductions: the choice between the in-place algorithm, the ring and
//! recursive doubling, and the byte interface (`all_reduce_bytes`, `reduce_scatter_bytes`)
//! turned into the typed algorithms, which the `f32` methods call directly.

use super::config::AllReduceChoice;
use super::lane::{Lane, Wire};
use super::{in_place, recursive_doubling, ring};
use crate::communicator::chunk_len;
use crate::dtype::{check_reduction, elems, elems_of, with_elems_mut, DType};
use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::reduce::with_dtype;
use crate::stats::OpKind;

/// Whether a reduction of `bytes` runs in place under the configured choice.
fn in_place_for(l: &Lane, bytes: usize) -> bool {
    let config = &l.shared.config;
    match config.all_reduce {
        AllReduceChoice::InPlace => true,
        AllReduceChoice::Auto => bytes >= config.in_place_threshold_bytes,
        AllReduceChoice::Ring | AllReduceChoice::RecursiveDoubling => false,
    }
}

/// All-reduce with the configured algorithm (`Auto`: in place from
/// `in_place_threshold_bytes` up, else ring from `ring_threshold_bytes` up).
pub(super) fn all_reduce<T: Wire>(l: &mut Lane, buf: &mut [T], op: ReduceOp) -> Result<()> {
    if l.size == 1 {
        return Ok(());
    }
    let bytes = std::mem::size_of_val(buf);
    if in_place_for(l, bytes) {
        return in_place::all_reduce(l, buf, op);
    }
    let config = &l.shared.config;
    let use_ring = match config.all_reduce {
        AllReduceChoice::Ring => true,
        AllReduceChoice::RecursiveDoubling | AllReduceChoice::InPlace => false,
        AllReduceChoice::Auto => bytes >= config.ring_threshold_bytes,
    };
    if use_ring {
        ring::all_reduce(l, buf, op)
    } else {
        recursive_doubling::all_reduce(l, buf, op)
    }
}

/// Reduce-scatter: in place where an all-reduce of `input` would be, else the ring.
pub(super) fn reduce_scatter<T: Wire>(
    l: &mut Lane,
    input: &[T],
    output: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    let want = chunk_len(input.len(), l.size, l.rank);
    if output.len() != want {
        return Err(CommError::BadLength {
            op: OpKind::ReduceScatter,
            what: "output",
            expected: want,
            got: output.len(),
        });
    }
    if l.size > 1 && in_place_for(l, std::mem::size_of_val(input)) {
        in_place::reduce_scatter(l, input, output, op)
    } else {
        ring::reduce_scatter(l, input, output, op)
    }
}

/// [`all_reduce`] of packed `dtype` elements, after the checks every engine shares.
pub(super) fn all_reduce_bytes(
    l: &mut Lane,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    check_reduction(OpKind::AllReduce, "buffer", dtype, op, buf.len())?;
    with_dtype!(dtype, T => with_elems_mut::<T, _>(buf, |s| all_reduce(l, s, op)))
}

/// Ring reduce-scatter of packed `dtype` elements, after the checks every engine shares.
pub(super) fn reduce_scatter_bytes(
    l: &mut Lane,
    input: &[u8],
    output: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    check_reduction(OpKind::ReduceScatter, "input", dtype, op, input.len())?;
    elems_of(OpKind::ReduceScatter, "output", dtype, output.len())?;
    with_dtype!(dtype, T => {
        let input = elems::<T>(input);
        with_elems_mut::<T, _>(output, |o| reduce_scatter(l, &input, o, op))
    })
}
