//! Typed entry points over the byte reductions of [`Communicator`]: generic over
//! [`Element`] on the caller's side, one object-safe byte method on the engines' side.

use crate::communicator::Communicator;
use crate::dtype::Element;
use crate::error::Result;
use crate::op::ReduceOp;

/// All-reduces `buf` of any [`Element`] type in place (see
/// [`Communicator::all_reduce_bytes`] for the semantics and errors), e.g.
/// `all_reduce_as::<i64>(comm, &mut counts, ReduceOp::Sum)` for exact integer counts.
pub fn all_reduce_as<T: Element>(
    comm: &(impl Communicator + ?Sized),
    buf: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    comm.all_reduce_bytes(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
}

/// Reduce-scatters `input` of any [`Element`] type into `output` (see
/// [`Communicator::reduce_scatter_bytes`]).
pub fn reduce_scatter_as<T: Element>(
    comm: &(impl Communicator + ?Sized),
    input: &[T],
    output: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    comm.reduce_scatter_bytes(
        bytemuck::cast_slice(input),
        bytemuck::cast_slice_mut(output),
        T::DTYPE,
        op,
    )
}
