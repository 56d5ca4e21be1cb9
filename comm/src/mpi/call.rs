//! Checked MPI calls: return codes, counts and tags in MPI's `int`, datatypes, operations
//! and buffer pointers that are never dangling.

use std::ffi::c_void;
use std::os::raw::c_int;

use mpi::datatype::Equivalence;
use mpi::ffi;
use mpi::raw::AsRaw;

use crate::dtype::DType;
use crate::error::{CommError, Result};
use crate::op::ReduceOp;

pub(super) fn mpi_op(op: ReduceOp) -> ffi::MPI_Op {
    // SAFETY: reading constants exported by mpi-sys after MPI_Init.
    unsafe {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => ffi::RSMPI_SUM,
            ReduceOp::Max => ffi::RSMPI_MAX,
            ReduceOp::Min => ffi::RSMPI_MIN,
        }
    }
}

/// The MPI datatype a typed reduction of `dtype` travels as (halves: their 2-byte carrier,
/// reduced only by the user operations).
pub(super) fn datatype(dtype: DType) -> ffi::MPI_Datatype {
    match dtype {
        DType::F32 => f32::equivalent_datatype().as_raw(),
        DType::I64 => i64::equivalent_datatype().as_raw(),
        DType::F16 | DType::Bf16 => u16::equivalent_datatype().as_raw(),
    }
}

pub(super) fn float() -> ffi::MPI_Datatype {
    // SAFETY: constant exported by mpi-sys.
    unsafe { ffi::RSMPI_FLOAT }
}

pub(super) fn byte() -> ffi::MPI_Datatype {
    // SAFETY: constant exported by mpi-sys.
    unsafe { ffi::RSMPI_UINT8_T }
}

pub(super) static EMPTY: u64 = 0;

/// Pointer for a send buffer. An empty slice's dangling pointer can equal `MPI_IN_PLACE`
/// (`(void*)1` in Open MPI for `u8`), so empty buffers point at a real dummy instead.
pub(super) fn send_ptr<T>(s: &[T]) -> *const c_void {
    if s.is_empty() {
        &EMPTY as *const u64 as *const c_void
    } else {
        s.as_ptr() as *const c_void
    }
}

/// Pointer for a receive buffer, never a dangling one (see [`send_ptr`]); MPI writes
/// nothing through it when the buffer is empty.
pub(super) fn recv_ptr<T>(s: &mut [T]) -> *mut c_void {
    if s.is_empty() {
        &EMPTY as *const u64 as *mut c_void
    } else {
        s.as_mut_ptr() as *mut c_void
    }
}

pub(super) fn check(code: c_int, what: &str) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(CommError::Mpi(format!("{what} returned error code {code}")))
    }
}

pub(super) fn count(n: usize, what: &str) -> Result<c_int> {
    c_int::try_from(n).map_err(|_| {
        CommError::InvalidArgument(format!("{what}: {n} elements exceed MPI's int count"))
    })
}

pub(super) fn tag_of(tag: u32) -> Result<c_int> {
    c_int::try_from(tag)
        .map_err(|_| CommError::InvalidArgument(format!("tag {tag} is above MPI's int range")))
}
