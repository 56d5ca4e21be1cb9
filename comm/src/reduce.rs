//! Element-wise reduction kernels shared by the engines, generic over the element type
//! ([`Kernel`]) and written so the compiler vectorises them: plain zips over equal-length
//! slices, one pass each, the operation chosen once per slice rather than per element.

use half::{bf16, f16};

use crate::dtype::Element;
use crate::op::ReduceOp;

/// Arithmetic of one element type. Half-precision types compute in `f32` and round back
/// once per call, so each hop of an algorithm rounds once (as NCCL reduces halves).
pub(crate) trait Kernel: Element {
    fn add(a: Self, b: Self) -> Self;
    fn max(a: Self, b: Self) -> Self;
    fn min(a: Self, b: Self) -> Self;
    /// `a / n`: the one division of an average.
    fn div(a: Self, n: usize) -> Self;
    /// `(a + b) / n` with as few roundings as the type allows (an average's last hop).
    fn add_div(a: Self, b: Self, n: usize) -> Self {
        Self::div(Self::add(a, b), n)
    }
}

impl Kernel for f32 {
    #[inline]
    fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline]
    fn max(a: f32, b: f32) -> f32 {
        a.max(b)
    }
    #[inline]
    fn min(a: f32, b: f32) -> f32 {
        a.min(b)
    }
    #[inline]
    fn div(a: f32, n: usize) -> f32 {
        a / n as f32
    }
}

impl Kernel for i64 {
    /// Wraps on overflow, as `MPI_SUM` on `MPI_INT64_T` does on every common platform, so
    /// the engines agree (and a debug build does not panic mid-collective).
    #[inline]
    fn add(a: i64, b: i64) -> i64 {
        a.wrapping_add(b)
    }
    #[inline]
    fn max(a: i64, b: i64) -> i64 {
        a.max(b)
    }
    #[inline]
    fn min(a: i64, b: i64) -> i64 {
        a.min(b)
    }
    /// Never reached through the engines, which refuse `Avg` on integers before reducing.
    #[inline]
    fn div(a: i64, n: usize) -> i64 {
        a / n as i64
    }
}

macro_rules! half_kernel {
    ($t:ty) => {
        impl Kernel for $t {
            #[inline]
            fn add(a: $t, b: $t) -> $t {
                <$t>::from_f32(a.to_f32() + b.to_f32())
            }
            #[inline]
            fn max(a: $t, b: $t) -> $t {
                <$t>::from_f32(a.to_f32().max(b.to_f32()))
            }
            #[inline]
            fn min(a: $t, b: $t) -> $t {
                <$t>::from_f32(a.to_f32().min(b.to_f32()))
            }
            #[inline]
            fn div(a: $t, n: usize) -> $t {
                <$t>::from_f32(a.to_f32() / n as f32)
            }
            #[inline]
            fn add_div(a: $t, b: $t, n: usize) -> $t {
                <$t>::from_f32((a.to_f32() + b.to_f32()) / n as f32)
            }
        }
    };
}

half_kernel!(f16);
half_kernel!(bf16);

/// Runs `$body` with the type alias `$t` naming the Rust type of the `DType` `$dtype`: the
/// one place a run-time dtype becomes a compile-time kernel.
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::dtype::DType::I64 => {
                type $t = i64;
                $body
            }
            $crate::dtype::DType::F16 => {
                type $t = half::f16;
                $body
            }
            $crate::dtype::DType::Bf16 => {
                type $t = half::bf16;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

#[inline]
fn apply<T: Kernel>(op: ReduceOp, a: T, b: T) -> T {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => T::add(a, b),
        ReduceOp::Max => T::max(a, b),
        ReduceOp::Min => T::min(a, b),
    }
}

/// `dst[i] = dst[i] (op) src[i]`. The slices must have equal length (callers check).
pub(crate) fn combine_into<T: Kernel>(dst: &mut [T], src: &[T], op: ReduceOp) {
    debug_assert_eq!(dst.len(), src.len());
    match op {
        ReduceOp::Sum | ReduceOp::Avg => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = T::add(*d, *s)),
        ReduceOp::Max => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = T::max(*d, *s)),
        ReduceOp::Min => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = T::min(*d, *s)),
    }
}

/// Final step of a reduction over `n` ranks, fused into one pass: `t = a (op) b`, divided by
/// `n` for `Avg`, then stored to both `a` and `b` (so `a` can travel on as the all-gather
/// message while `b` keeps the result).
pub(crate) fn combine_final_both<T: Kernel>(a: &mut [T], b: &mut [T], op: ReduceOp, n: usize) {
    debug_assert_eq!(a.len(), b.len());
    if op == ReduceOp::Avg {
        a.iter_mut().zip(b.iter_mut()).for_each(|(x, y)| {
            let t = T::add_div(*x, *y, n);
            *x = t;
            *y = t;
        });
    } else {
        a.iter_mut().zip(b.iter_mut()).for_each(|(x, y)| {
            let t = apply(op, *x, *y);
            *x = t;
            *y = t;
        });
    }
}

/// Final step without forwarding: `out[i] = (a[i] (op) b[i])`, divided by `n` for `Avg`.
pub(crate) fn combine_final_into<T: Kernel>(
    out: &mut [T],
    a: &[T],
    b: &[T],
    op: ReduceOp,
    n: usize,
) {
    debug_assert!(out.len() == a.len() && a.len() == b.len());
    if op == ReduceOp::Avg {
        out.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(o, (x, y))| *o = T::add_div(*x, *y, n));
    } else {
        out.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(o, (x, y))| *o = apply(op, *x, *y));
    }
}

/// Final step in place: `dst[i] = dst[i] (op) src[i]`, divided by `n` for `Avg` with the
/// rounding of [`Kernel::add_div`] (as [`combine_final_both`] computes it).
pub(crate) fn fold_final<T: Kernel>(dst: &mut [T], src: &[T], op: ReduceOp, n: usize) {
    debug_assert_eq!(dst.len(), src.len());
    if op == ReduceOp::Avg {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, s)| *d = T::add_div(*d, *s, n));
    } else {
        combine_into(dst, src, op);
    }
}

/// Divides by `n` in place when `op` is `Avg` (the one division of an average).
pub(crate) fn finish_avg<T: Kernel>(buf: &mut [T], op: ReduceOp, n: usize) {
    if op == ReduceOp::Avg {
        buf.iter_mut().for_each(|x| *x = T::div(*x, n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_round_once_per_hop() {
        // 2048 + 1 is not representable in f16 (spacing 2 there): one hop rounds it away.
        let mut a = [f16::from_f32(2048.0)];
        combine_into(&mut a, &[f16::from_f32(1.0)], ReduceOp::Sum);
        assert_eq!(a[0].to_f32(), 2048.0);
        let mut m = [bf16::from_f32(-3.0)];
        combine_into(&mut m, &[bf16::from_f32(2.0)], ReduceOp::Max);
        assert_eq!(m[0].to_f32(), 2.0);
    }

    #[test]
    fn integer_sums_are_exact_and_wrap() {
        let mut a = [(1i64 << 53) + 1, i64::MAX];
        combine_into(&mut a, &[1, 1], ReduceOp::Sum);
        assert_eq!(a, [(1i64 << 53) + 2, i64::MIN]);
    }
}
