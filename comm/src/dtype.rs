//! Element types of the typed reductions: [`DType`] names one, [`Element`] maps a Rust type
//! to it, and the argument checks every engine runs first, so that all engines refuse the
//! same calls with the same errors.

use std::borrow::Cow;
use std::fmt;

use crate::error::{CommError, Result};
use crate::op::ReduceOp;
use crate::stats::OpKind;

/// The element type of a typed reduction buffer (packed, native byte order).
///
/// Non-exhaustive: more types (`F64`, `I32`, ...) may be added; every engine must then
/// implement them, which the crate-internal dispatch enforces at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 binary32 (`f32`).
    F32,
    /// Two's-complement 64-bit integer (`i64`). Sums wrap on overflow; `Avg` is refused.
    I64,
    /// IEEE 754 binary16 (`half::f16`), reduced in `f32` and rounded back at every step.
    F16,
    /// bfloat16 (`half::bf16`), reduced in `f32` and rounded back at every step.
    Bf16,
}

impl DType {
    /// Every type, in declaration order.
    pub const ALL: [DType; 4] = [DType::F32, DType::I64, DType::F16, DType::Bf16];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::I64 => 8,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// The Rust name of the type (`"f32"`, `"i64"`, `"f16"`, `"bf16"`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// Whether `op` is defined on this type: everything but `Avg` on integers, whose
    /// truncating division would silently differ from the mean a caller expects.
    pub const fn supports(self, op: ReduceOp) -> bool {
        !matches!((self, op), (DType::I64, ReduceOp::Avg))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    /// Only the types the engines have kernels for may be elements.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for i64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A Rust type that typed reductions carry: `f32`, `i64`, `half::f16`, `half::bf16`.
/// Sealed, because every engine needs a kernel for each [`DType`].
pub trait Element: sealed::Sealed + bytemuck::Pod + Send + Sync + 'static {
    /// The wire type of `Self`.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for i64 {
    const DTYPE: DType = DType::I64;
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
}

/// Validates a typed reduction's arguments and returns the element count of a buffer of
/// `bytes` bytes. `what` names the buffer in the error.
pub(crate) fn check_reduction(
    kind: OpKind,
    what: &str,
    dtype: DType,
    op: ReduceOp,
    bytes: usize,
) -> Result<usize> {
    if !dtype.supports(op) {
        return Err(CommError::InvalidArgument(format!(
            "{kind}: ReduceOp::{op:?} is not defined for {dtype} (an integer mean would be \
             truncated); reduce with Sum and divide instead"
        )));
    }
    elems_of(kind, what, dtype, bytes)
}

/// Element count of a buffer of `bytes` bytes of `dtype`, or an error naming both sizes.
pub(crate) fn elems_of(kind: OpKind, what: &str, dtype: DType, bytes: usize) -> Result<usize> {
    let size = dtype.size();
    if !bytes.is_multiple_of(size) {
        return Err(CommError::InvalidArgument(format!(
            "{kind}: {what} of {bytes} bytes is not a whole number of {dtype} elements \
             ({size} bytes each)"
        )));
    }
    Ok(bytes / size)
}

fn unaligned_to_vec<T: bytemuck::Pod>(buf: &[u8]) -> Vec<T> {
    buf.chunks_exact(std::mem::size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

/// Runs `f` on `buf` viewed as `T`s. A byte buffer need not be aligned for `T`; only then is
/// it copied (in and back out). The length must be a multiple of `T`'s size (checked first).
pub(crate) fn with_elems_mut<T: bytemuck::Pod, R>(
    buf: &mut [u8],
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    match bytemuck::try_cast_slice_mut::<u8, T>(buf) {
        Ok(s) => f(s),
        Err(_) => {
            let mut v: Vec<T> = unaligned_to_vec(buf);
            let r = f(&mut v);
            buf.copy_from_slice(bytemuck::cast_slice(&v));
            r
        }
    }
}

/// `buf` viewed as `T`s, copied only when it is not aligned for `T` (see [`with_elems_mut`]).
pub(crate) fn elems<T: bytemuck::Pod>(buf: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice::<u8, T>(buf) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(unaligned_to_vec(buf)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_rust_types() {
        fn size_of<T: Element>() -> usize {
            std::mem::size_of::<T>()
        }
        assert_eq!(DType::F32.size(), size_of::<f32>());
        assert_eq!(DType::I64.size(), size_of::<i64>());
        assert_eq!(DType::F16.size(), size_of::<half::f16>());
        assert_eq!(DType::Bf16.size(), size_of::<half::bf16>());
    }

    #[test]
    fn unaligned_views_round_trip() {
        // One byte into 8-aligned storage: certainly not aligned for i64.
        let mut words = [0u64; 3];
        let buf = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[1..17];
        with_elems_mut::<i64, _>(buf, |s| {
            s[0] = -2;
            s[1] = 1 << 40;
        });
        assert_eq!(&elems::<i64>(buf)[..], &[-2, 1 << 40]);
    }

    #[test]
    fn ragged_lengths_and_integer_means_are_refused() {
        let e = check_reduction(OpKind::AllReduce, "buffer", DType::I64, ReduceOp::Sum, 12);
        assert!(
            matches!(e, Err(CommError::InvalidArgument(m)) if m.contains("12 bytes") && m.contains("8 bytes each"))
        );
        let e = check_reduction(OpKind::AllReduce, "buffer", DType::I64, ReduceOp::Avg, 8);
        assert!(matches!(e, Err(CommError::InvalidArgument(m)) if m.contains("Avg")));
        assert_eq!(
            check_reduction(OpKind::AllReduce, "buffer", DType::F16, ReduceOp::Avg, 6),
            Ok(3)
        );
    }
}
