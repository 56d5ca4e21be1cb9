//! Element-wise reduction kernels shared by the engines (written so the compiler vectorises
//! them: plain zips over equal-length slices, one pass each).

use crate::ReduceOp;

#[inline]
fn apply(op: ReduceOp, a: f32, b: f32) -> f32 {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => a + b,
        ReduceOp::Max => a.max(b),
        ReduceOp::Min => a.min(b),
    }
}

/// `dst[i] = dst[i] (op) src[i]`. The slices must have equal length (callers check).
pub(crate) fn combine_into(dst: &mut [f32], src: &[f32], op: ReduceOp) {
    debug_assert_eq!(dst.len(), src.len());
    match op {
        ReduceOp::Sum | ReduceOp::Avg => dst.iter_mut().zip(src).for_each(|(d, s)| *d += *s),
        ReduceOp::Max => dst.iter_mut().zip(src).for_each(|(d, s)| *d = d.max(*s)),
        ReduceOp::Min => dst.iter_mut().zip(src).for_each(|(d, s)| *d = d.min(*s)),
    }
}

/// Final step of a reduction over `n` ranks, fused into one pass: `t = a (op) b`, divided by
/// `n` for `Avg`, then stored to both `a` and `b` (so `a` can travel on as the all-gather
/// message while `b` keeps the result).
pub(crate) fn combine_final_both(a: &mut [f32], b: &mut [f32], op: ReduceOp, n: usize) {
    debug_assert_eq!(a.len(), b.len());
    if op == ReduceOp::Avg {
        let d = n as f32;
        a.iter_mut().zip(b.iter_mut()).for_each(|(x, y)| {
            let t = (*x + *y) / d;
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
pub(crate) fn combine_final_into(out: &mut [f32], a: &[f32], b: &[f32], op: ReduceOp, n: usize) {
    debug_assert!(out.len() == a.len() && a.len() == b.len());
    if op == ReduceOp::Avg {
        let d = n as f32;
        out.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(o, (x, y))| *o = (*x + *y) / d);
    } else {
        out.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(o, (x, y))| *o = apply(op, *x, *y));
    }
}

/// Divides by `n` in place when `op` is `Avg` (the one division of an average).
pub(crate) fn finish_avg(buf: &mut [f32], op: ReduceOp, n: usize) {
    if op == ReduceOp::Avg {
        let d = n as f32;
        buf.iter_mut().for_each(|x| *x /= d);
    }
}
