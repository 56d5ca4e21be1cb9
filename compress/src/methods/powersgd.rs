//! PowerSGD (Vogels et al. 2019): rank-r power iteration on the matrix view of a
//! tensor, warm-started, with Gram-Schmidt orthogonalisation; all-reduce compatible.
//!
//! Layouts: the view M is `rows x cols` row-major over the flat tensor; when the
//! length is not a multiple of `cols` the last row is partial and the missing cells
//! count as zero. P is `rows x rank`, Q is `cols x rank`, both row-major.

use super::{AvgReduce, Compressor, Ctx, MethodConfig, ReduceInfo};
use crate::error::{CompressError, SyncError};
use crate::rng;
use crate::wire::{f32_at, DecodeScratch, Header, MethodId, Op, OpSet, Params, Payload};
use rand_distr::{Distribution, StandardNormal};

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
fn m_times_q(x: &[f32], v: View, r: usize, q: &[f32], p: &mut [f32]) {
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
fn mt_times_p(x: &[f32], v: View, r: usize, p: &[f32], q: &mut [f32]) {
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
fn p_times_qt<O: Op>(p: &[f32], q: &[f32], v: View, r: usize, out: &mut [f32]) {
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

/// Fills Q with standard normals from the seed shared by all ranks, orthogonalised.
fn init_q(q: &mut Vec<f32>, cols: usize, r: usize, seed: u64) {
    let mut g = rng::stream(seed);
    q.clear();
    q.extend((0..cols * r).map(|_| -> f32 { StandardNormal.sample(&mut g) }));
    orthogonalize(q, cols, r);
}

/// PowerSGD compressor; P/Q buffers are reused between calls.
#[derive(Debug)]
pub struct PowerSgd {
    config: MethodConfig,
    rank: usize,
    min_rate: f64,
    p: Vec<f32>,
    q: Vec<f32>,
    scratch: DecodeScratch,
}

impl PowerSgd {
    pub(crate) fn new(rank: usize, min_compression_rate: f64) -> Self {
        Self {
            config: MethodConfig::PowerSgd {
                rank,
                min_compression_rate,
            },
            rank,
            min_rate: min_compression_rate,
            p: Vec::new(),
            q: Vec::new(),
            scratch: DecodeScratch::default(),
        }
    }

    /// Loads Q from the warm start if it fits, else initialises it.
    fn load_q(&mut self, ctx: &mut Ctx<'_>, cols: usize, r: usize) {
        match ctx.warm.as_deref() {
            Some(w) if w.len() == cols * r => {
                self.q.clear();
                self.q.extend_from_slice(w);
            }
            _ => init_q(&mut self.q, cols, r, ctx.shared_seed),
        }
    }

    fn store_q(&self, ctx: &mut Ctx<'_>) {
        if let Some(w) = ctx.warm.as_deref_mut() {
            w.clear();
            w.extend_from_slice(&self.q);
        }
    }

    fn check_dims(&self, v: View) -> Result<(), CompressError> {
        if v.rows > u32::MAX as usize || v.cols > u32::MAX as usize {
            return Err(CompressError::TooLarge {
                method: "powersgd",
                what: format!("a {} x {} view exceeds u32 dimensions", v.rows, v.cols),
            });
        }
        Ok(())
    }
}

impl Compressor for PowerSgd {
    fn method(&self) -> MethodId {
        MethodId::PowerSgd
    }
    fn config(&self) -> &MethodConfig {
        &self.config
    }
    fn aggregation(&self) -> super::Aggregation {
        super::Aggregation::AllReduce
    }
    fn compress_into(
        &mut self,
        x: &[f32],
        ctx: &mut Ctx<'_>,
        out: &mut Payload,
    ) -> Result<(), CompressError> {
        let v = View::new(x.len(), ctx.shape)?;
        if !v.worth_compressing(self.rank, self.min_rate) {
            super::dense::write_identity(x, out);
            return Ok(());
        }
        self.check_dims(v)?;
        let r = v.rank(self.rank);
        self.load_q(ctx, v.cols, r);
        self.p.resize(v.rows * r, 0.0);
        m_times_q(x, v, r, &self.q, &mut self.p);
        orthogonalize(&mut self.p, v.rows, r);
        mt_times_p(x, v, r, &self.p, &mut self.q);
        self.store_q(ctx);
        let buf = out.buf_mut();
        buf.clear();
        let header = Header {
            method: MethodId::PowerSgd,
            len: x.len() as u64,
            params: Params::PowerSgd {
                rows: v.rows as u32,
                cols: v.cols as u32,
                rank: r as u32,
            },
        };
        buf.reserve(header.prefix_len() + 4 * (self.p.len() + self.q.len()));
        header.write(buf);
        buf.extend_from_slice(bytemuck::cast_slice(&self.p));
        buf.extend_from_slice(bytemuck::cast_slice(&self.q));
        Ok(())
    }
    fn scratch(&mut self) -> &mut DecodeScratch {
        &mut self.scratch
    }
    fn reduce(
        &mut self,
        x: &mut [f32],
        residual: Option<&mut [f32]>,
        ctx: &mut Ctx<'_>,
        avg: &mut AvgReduce<'_>,
    ) -> Result<ReduceInfo, SyncError> {
        let n = x.len();
        let v = View::new(n, ctx.shape)?;
        if !v.worth_compressing(self.rank, self.min_rate) {
            if let Some(r) = residual {
                r.fill(0.0);
            }
            avg(x)?;
            return Ok(ReduceInfo {
                payload_bytes: 4 * n,
                reduced_bytes: 4 * n,
                skipped: true,
            });
        }
        self.check_dims(v)?;
        let r = v.rank(self.rank);
        self.load_q(ctx, v.cols, r);
        self.p.resize(v.rows * r, 0.0);
        m_times_q(x, v, r, &self.q, &mut self.p);
        avg(&mut self.p)?;
        orthogonalize(&mut self.p, v.rows, r);
        mt_times_p(x, v, r, &self.p, &mut self.q);
        avg(&mut self.q)?;
        self.store_q(ctx);
        match residual {
            Some(res) => {
                // residual (= x on entry, see the trait) minus the decompressed average.
                p_times_qt::<OpSet>(&self.p, &self.q, v, r, x);
                for (e, &s) in res.iter_mut().zip(x.iter()) {
                    *e -= s;
                }
            }
            None => p_times_qt::<OpSet>(&self.p, &self.q, v, r, x),
        }
        let bytes = 4 * (self.p.len() + self.q.len());
        Ok(ReduceInfo {
            payload_bytes: bytes,
            reduced_bytes: bytes,
            skipped: false,
        })
    }
}

/// Decodes a PowerSGD body (validated by the header) into `out`.
pub(crate) fn decode<O: Op>(
    rows: usize,
    cols: usize,
    r: usize,
    body: &[u8],
    out: &mut [f32],
    scratch: &mut DecodeScratch,
) {
    let v = View {
        rows,
        cols,
        len: out.len(),
    };
    // Payload bytes are unaligned: copy the (small) factors into aligned scratch.
    scratch.p.clear();
    scratch.p.extend((0..rows * r).map(|i| f32_at(body, i)));
    scratch.q.clear();
    scratch
        .q
        .extend((0..cols * r).map(|i| f32_at(body, rows * r + i)));
    p_times_qt::<O>(&scratch.p, &scratch.q, v, r, out);
}
