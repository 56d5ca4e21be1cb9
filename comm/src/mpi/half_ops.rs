//! The MPI user operations for `f16` and `bf16` (MPI has no half-precision reduction): sum,
//! max and min by the local engine's kernels, rounded once.

use std::ffi::c_void;
use std::os::raw::c_int;

use mpi::ffi;

use super::call::check;
use crate::error::Result;
use crate::op::ReduceOp;
use crate::reduce::Kernel;

/// Indices of the user operations: sum (also for `Avg`), max, min.
pub(super) const OP_SUM: u8 = 0;
pub(super) const OP_MAX: u8 = 1;
pub(super) const OP_MIN: u8 = 2;

pub(super) fn op_index(op: ReduceOp) -> usize {
    usize::from(match op {
        ReduceOp::Sum | ReduceOp::Avg => OP_SUM,
        ReduceOp::Max => OP_MAX,
        ReduceOp::Min => OP_MIN,
    })
}

pub(super) type UserFunction =
    unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_int, *mut ffi::MPI_Datatype);

/// `MPI_Op`s for `f16` and `bf16`, indexed by [`op_index`].
pub(super) struct HalfOps {
    pub(super) f16: [ffi::MPI_Op; 3],
    pub(super) bf16: [ffi::MPI_Op; 3],
}

impl HalfOps {
    pub(super) fn create() -> Result<Self> {
        fn make(f: UserFunction) -> Result<ffi::MPI_Op> {
            let mut op = std::mem::MaybeUninit::<ffi::MPI_Op>::uninit();
            // SAFETY: MPI is initialised; `f` has MPI_User_function's signature and is
            // commutative (an f32 sum, max or min, rounded once).
            check(
                unsafe { ffi::MPI_Op_create(Some(f), 1, op.as_mut_ptr()) },
                "MPI_Op_create",
            )?;
            // SAFETY: written by the successful call.
            Ok(unsafe { op.assume_init() })
        }
        Ok(Self {
            f16: [
                make(half_op::<half::f16, OP_SUM>)?,
                make(half_op::<half::f16, OP_MAX>)?,
                make(half_op::<half::f16, OP_MIN>)?,
            ],
            bf16: [
                make(half_op::<half::bf16, OP_SUM>)?,
                make(half_op::<half::bf16, OP_MAX>)?,
                make(half_op::<half::bf16, OP_MIN>)?,
            ],
        })
    }

    pub(super) fn free(&mut self) {
        for op in self.f16.iter_mut().chain(self.bf16.iter_mut()) {
            // SAFETY: made by MPI_Op_create, freed once (the runtime drops once) and before
            // MPI_Finalize. An error here has nowhere to go during teardown.
            unsafe {
                ffi::MPI_Op_free(op);
            }
        }
    }
}

/// The MPI user function of half type `T` and operation `OP`: `inout[i] = in[i] (op)
/// inout[i]`, by the same kernels as the local engine. Buffers are read byte-wise because
/// MPI does not promise them aligned for `T`.
pub(super) unsafe extern "C" fn half_op<T: Kernel, const OP: u8>(
    invec: *mut c_void,
    inoutvec: *mut c_void,
    len: *mut c_int,
    _datatype: *mut ffi::MPI_Datatype,
) {
    // SAFETY: MPI passes a valid count.
    let n = usize::try_from(unsafe { *len }).unwrap_or(0);
    if n == 0 || invec.is_null() || inoutvec.is_null() {
        return;
    }
    let size = std::mem::size_of::<T>();
    // SAFETY: MPI passes two distinct buffers of `n` elements of the datatype the operation
    // is used with, which is always `T`'s 2-byte carrier (MPI_UINT16_T).
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(invec as *const u8, n * size),
            std::slice::from_raw_parts_mut(inoutvec as *mut u8, n * size),
        )
    };
    for (x, y) in a.chunks_exact(size).zip(b.chunks_exact_mut(size)) {
        let (x, yv) = (
            bytemuck::pod_read_unaligned::<T>(x),
            bytemuck::pod_read_unaligned::<T>(y),
        );
        let r = match OP {
            OP_SUM => T::add(x, yv),
            OP_MAX => T::max(x, yv),
            _ => T::min(x, yv),
        };
        y.copy_from_slice(bytemuck::bytes_of(&r));
    }
}
