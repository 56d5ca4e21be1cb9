//! The matrix algebra of PowerSGD, shared by the compressor and the payload decoder:
//! the matrix view of a flat tensor, the three products and Gram-Schmidt.
//!
//! Layouts: the view M is `rows x cols` row-major over the flat tensor; when the
//! length is not a multiple of `cols` the last row is partial and the missing cells
//! count as zero. P is `rows x rank`, Q is `cols x rank`, both row-major.

use crate::error::CompressError;
use crate::wire::Op;

/// The matrix view of a flat tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub rows: usize,
    pub cols: usize,
    /// Elements of the tensor (`<= rows * cols`, short by less than one row).
    pub len: usize,
}

impl View {
    /// `shape` if given (must cover `len` exactly), else a near-square view with a
    /// partial last row.
    pub fn new(len: usize, shape: Option<(usize, usize)>) -> Result<Self, CompressError> {
        match shape {
            Some((rows, cols)) => {
                if rows.checked_mul(cols) != Some(len) {
                    return Err(CompressError::LengthMismatch {
                        what: "PowerSGD matrix view rows * cols",
                        expected: len,
                        actual: rows.saturating_mul(cols),
                    });
                }
                Ok(Self { rows, cols, len })
            }
            None => {
                let cols = (len as f64).sqrt().ceil() as usize;
                // Float sqrt can be one off for huge lengths; fix up so cols^2 >= len.
                let cols = (cols.saturating_sub(1)..=cols + 1)
                    .find(|c| c.saturating_mul(*c) >= len)
                    .unwrap_or(cols);
                let rows = len.checked_div(cols).map_or(0, |_| len.div_ceil(cols));
                Ok(Self { rows, cols, len })
            }
        }
    }
    /// Complete rows.
    fn full(&self) -> usize {
        self.len.checked_div(self.cols).unwrap_or(0)
    }
    /// Cells in the partial last row.
    fn tail(&self) -> usize {
        self.len.checked_rem(self.cols).unwrap_or(0)
    }
    /// Rank actually used: at most min(rows, cols).
    pub fn rank(&self, r: usize) -> usize {
        r.min(self.rows).min(self.cols)
    }
    /// PyTorch's rule: compress only if the factors are `min_rate` times smaller than
    /// the matrix (and the matrix is a matrix, not a vector).
    pub fn worth_compressing(&self, r: usize, min_rate: f64) -> bool {
        if self.rows < 2 || self.cols < 2 {
            return false;
        }
        let r = self.rank(r);
        let dense = (self.rows * self.cols) as f64;
        let factors = ((self.rows + self.cols) * r) as f64;
        if min_rate == 0.0 {
            return true;
        }
        dense > min_rate * factors
    }
}

/// `dst = lhs * rhs` (or `dst += sign * lhs * rhs` when `accumulate`), all given by
/// row/column strides. Bounds are checked here so the raw-pointer GEMM below never
/// reads or writes outside the slices.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
    sign: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = 0.0;
                }
            }
        }
        return;
    }
    let last = |r: usize, c: usize, rs: usize, cs: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(
        last(m, n, dst_rs, dst_cs) < dst.len(),
        "gemm: dst too short"
    );
    assert!(
        last(m, k, lhs_rs, lhs_cs) < lhs.len(),
        "gemm: lhs too short"
    );
    assert!(
        last(k, n, rhs_rs, rhs_cs) < rhs.len(),
        "gemm: rhs too short"
    );
    // SAFETY: the asserts above bound every index (i * rs + j * cs) the product touches
    // inside the three slices; `dst` is a unique borrow that aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            sign,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// P = M Q.
pub(crate) fn m_times_q(x: &[f32], v: View, r: usize, q: &[f32], p: &mut [f32]) {
    let full = v.full();
    gemm(
        full,
        r,
        v.cols,
        p,
        (r, 1),
        x,
        (v.cols, 1),
        q,
        (r, 1),
        false,
        1.0,
    );
    let tail = v.tail();
    if tail > 0 {
        let row = &x[full * v.cols..];
        for c in 0..r {
            p[full * r + c] = row.iter().enumerate().map(|(j, &a)| a * q[j * r + c]).sum();
        }
    }
}

/// Q = M^T P.
pub(crate) fn mt_times_p(x: &[f32], v: View, r: usize, p: &[f32], q: &mut [f32]) {
    let full = v.full();
    gemm(
        v.cols,
        r,
        full,
        q,
        (r, 1),
        x,
        (1, v.cols),
        p,
        (r, 1),
        false,
        1.0,
    );
    let tail = v.tail();
    if tail > 0 {
        let row = &x[full * v.cols..];
        let pl = &p[full * r..full * r + r];
        for (j, &a) in row.iter().enumerate() {
            for c in 0..r {
                q[j * r + c] += a * pl[c];
            }
        }
    }
}

/// out (op)= P Q^T over the view.
pub(crate) fn p_times_qt<O: Op>(p: &[f32], q: &[f32], v: View, r: usize, out: &mut [f32]) {
    let full = v.full();
    gemm(
        full,
        v.cols,
        r,
        out,
        (v.cols, 1),
        p,
        (r, 1),
        q,
        (1, r),
        !O::SET,
        O::SIGN,
    );
    let tail = v.tail();
    if tail > 0 {
        let pl = &p[full * r..full * r + r];
        for (j, d) in out[full * v.cols..].iter_mut().enumerate() {
            let val: f32 = (0..r).map(|c| pl[c] * q[j * r + c]).sum();
            O::apply(d, val);
        }
    }
}

/// Modified Gram-Schmidt on the columns of a row-major `rows x r` matrix, f64
/// accumulation. A column that vanishes (rank-deficient input) becomes zero rather
/// than NaN; it then contributes nothing to P Q^T.
pub(crate) fn orthogonalize(a: &mut [f32], rows: usize, r: usize) {
    for c in 0..r {
        for prev in 0..c {
            let d: f64 = (0..rows)
                .map(|i| a[i * r + c] as f64 * a[i * r + prev] as f64)
                .sum();
            let d = d as f32;
            for i in 0..rows {
                a[i * r + c] -= d * a[i * r + prev];
            }
        }
        let norm = (0..rows)
            .map(|i| (a[i * r + c] as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let inv = if norm > 0.0 && norm.is_finite() {
            (1.0 / norm) as f32
        } else {
            0.0
        };
        for i in 0..rows {
            a[i * r + c] *= inv;
        }
    }
}
