//! Entry points of the reductions: the choice between ring and recursive doubling, and the
//! byte interface (`all_reduce_bytes`, `reduce_scatter_bytes`) turned into the typed
//! algorithms, which the `f32` methods call directly.

use super::config::AllReduceChoice;
use super::lane::{Lane, Wire};
use super::{recursive_doubling, ring};
use crate::dtype::{check_reduction, elems, elems_of, with_elems_mut, DType};
use crate::error::Result;
use crate::op::ReduceOp;
use crate::reduce::with_dtype;
use crate::stats::OpKind;

/// All-reduce with the configured algorithm (`Auto`: ring from `ring_threshold_bytes` up).
pub(super) fn all_reduce<T: Wire>(l: &mut Lane, buf: &mut [T], op: ReduceOp) -> Result<()> {
    if l.size == 1 {
        return Ok(());
    }
    let config = &l.shared.config;
    let use_ring = match config.all_reduce {
        AllReduceChoice::Ring => true,
        AllReduceChoice::RecursiveDoubling => false,
        AllReduceChoice::Auto => std::mem::size_of_val(buf) >= config.ring_threshold_bytes,
    };
    if use_ring {
        ring::all_reduce(l, buf, op)
    } else {
        recursive_doubling::all_reduce(l, buf, op)
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
        with_elems_mut::<T, _>(output, |o| ring::reduce_scatter(l, &input, o, op))
    })
}
