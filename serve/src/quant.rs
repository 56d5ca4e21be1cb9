//! int8 weights and the host kernels that use them.
//!
//! * The item table: per-row symmetric int8 (TorchRec's row-wise quantized embeddings): row
//!   `r` is `scale[r] * q[r, ..]` with `scale[r] = max |row| / 127`. Scoring keeps the query
//!   in f32 and widens each row once per batch.
//! * The blocks' projections: per-output-channel symmetric int8 weights, activations
//!   quantized per row on the fly (dynamic quantization, as PyTorch's `quantize_dynamic`
//!   does for `Linear`), products summed in i32.
//!
//! burn's Flex backend can quantize tensors but has no int8 matmul (its quantized ops
//! dequantize first), so these are meshrec's own kernels. The loops are written for the
//! compiler to vectorise and run under `pulp`'s runtime dispatch, so they use AVX2/AVX-512
//! where the CPU has them although the crate is built for baseline x86-64.

/// Rows quantized symmetrically to int8, one scale per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
}

/// `round(x / scale)` clamped to the symmetric int8 range.
#[inline(always)]
fn quantize_one(x: f32, inv_scale: f32) -> i8 {
    (x * inv_scale).round().clamp(-127.0, 127.0) as i8
}

impl Int8Rows {
    /// Quantizes a row-major `rows x cols` matrix row by row.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "int8 rows: wrong slice length");
        let mut values = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        for r in 0..rows {
            let row = &data[r * cols..(r + 1) * cols];
            let scale = row.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
            scales[r] = scale;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (q, &x) in values[r * cols..(r + 1) * cols].iter_mut().zip(row) {
                *q = quantize_one(x, inv);
            }
        }
        Self {
            rows,
            cols,
            values,
            scales,
        }
    }

    /// Row `r` back in f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let s = self.scales[r];
        for (o, &q) in out
            .iter_mut()
            .zip(&self.values[r * self.cols..(r + 1) * self.cols])
        {
            *o = f32::from(q) * s;
        }
    }

    /// The largest error of any element: half a step of its row's scale.
    pub fn max_abs_error(&self) -> f32 {
        self.scales.iter().fold(0.0f32, |m, s| m.max(s * 0.5))
    }

    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }

    /// `out[i, r] = scale[r] * <queries[i], q[r]>` for `n` f32 queries of width `cols`:
    /// scores against every row (`out` is `[n, rows]`).
    pub fn score(&self, queries: &[f32], out: &mut [f32]) {
        let d = self.cols;
        let n = queries.len() / d.max(1);
        assert_eq!(out.len(), n * self.rows, "int8 score: wrong output length");
        pulp::Arch::new().dispatch(|| {
            let mut row = vec![0f32; d];
            for r in 0..self.rows {
                let s = self.scales[r];
                for (o, &q) in row.iter_mut().zip(&self.values[r * d..(r + 1) * d]) {
                    *o = f32::from(q);
                }
                for i in 0..n {
                    let query = &queries[i * d..(i + 1) * d];
                    out[i * self.rows + r] = s * dot_f32(query, &row);
                }
            }
        });
    }
}

/// A vectorisable f32 dot product (eight independent lanes).
#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// A vectorisable i8 dot product summed in i32 (no overflow below 2^17 terms).
#[inline(always)]
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// A linear projection `y = x W` with int8 weights per output channel: `w` holds the
/// transposed weight (`[d_out, d_in]`, one row per output channel) quantized by rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Linear {
    pub w: Int8Rows,
}

impl Int8Linear {
    /// From burn's layout, `[d_in, d_out]` row-major.
    pub fn from_weight(weight: &[f32], d_in: usize, d_out: usize) -> Self {
        let mut transposed = vec![0f32; weight.len()];
        for i in 0..d_in {
            for o in 0..d_out {
                transposed[o * d_in + i] = weight[i * d_out + o];
            }
        }
        Self {
            w: Int8Rows::quantize(&transposed, d_out, d_in),
        }
    }

    pub fn d_in(&self) -> usize {
        self.w.cols
    }

    pub fn d_out(&self) -> usize {
        self.w.rows
    }

    /// `x` is `[n, d_in]`; returns `[n, d_out]`. Each row of `x` is quantized to int8 with
    /// its own scale, the products are summed in i32, then both scales applied.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let (d_in, d_out) = (self.d_in(), self.d_out());
        let n = x.len() / d_in.max(1);
        let mut out = vec![0f32; n * d_out];
        pulp::Arch::new().dispatch(|| {
            let mut xq = vec![0i8; d_in];
            for i in 0..n {
                let row = &x[i * d_in..(i + 1) * d_in];
                let scale = row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (q, &v) in xq.iter_mut().zip(row) {
                    *q = quantize_one(v, inv);
                }
                let y = &mut out[i * d_out..(i + 1) * d_out];
                for (o, y) in y.iter_mut().enumerate() {
                    let w = &self.w.values[o * d_in..(o + 1) * d_in];
                    *y = dot_i8(&xq, w) as f32 * scale * self.w.scales[o];
                }
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 2001) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// Every dequantized element is within half a step of its row's scale, and so every
    /// int8 score is within `sum |q_k| * scale / 2` of the f32 score.
    #[test]
    fn row_quantization_and_score_error_are_bounded() {
        let (rows, cols, n) = (37, 24, 5);
        let table = matrix(rows, cols, 1);
        let q = Int8Rows::quantize(&table, rows, cols);
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            q.dequantize_row(r, &mut row);
            for (a, b) in row.iter().zip(&table[r * cols..(r + 1) * cols]) {
                assert!((a - b).abs() <= q.scales[r] * 0.5 + 1e-7);
            }
        }
        let queries = matrix(n, cols, 7);
        let mut scores = vec![0f32; n * rows];
        q.score(&queries, &mut scores);
        for i in 0..n {
            let query = &queries[i * cols..(i + 1) * cols];
            let l1: f32 = query.iter().map(|x| x.abs()).sum();
            for r in 0..rows {
                let exact: f32 = query
                    .iter()
                    .zip(&table[r * cols..(r + 1) * cols])
                    .map(|(a, b)| a * b)
                    .sum();
                let bound = l1 * q.scales[r] * 0.5 + 1e-5;
                assert!(
                    (scores[i * rows + r] - exact).abs() <= bound,
                    "row {r}: {} vs {exact} (bound {bound})",
                    scores[i * rows + r]
                );
            }
        }
    }

    #[test]
    fn int8_linear_is_close_to_f32() {
        let (d_in, d_out, n) = (32, 20, 6);
        let w = matrix(d_in, d_out, 3);
        let x = matrix(n, d_in, 9);
        let lin = Int8Linear::from_weight(&w, d_in, d_out);
        let y = lin.forward(&x);
        for i in 0..n {
            let xr = &x[i * d_in..(i + 1) * d_in];
            let x_scale = xr.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for o in 0..d_out {
                let exact: f32 = (0..d_in).map(|k| xr[k] * w[k * d_out + o]).sum();
                // Each product errs by at most |x| dw + |w| dx + dx dw.
                let w_scale = lin.w.scales[o];
                let bound: f32 = (0..d_in)
                    .map(|k| {
                        xr[k].abs() * w_scale * 0.5
                            + w[k * d_out + o].abs() * x_scale * 0.5
                            + x_scale * w_scale * 0.25
                    })
                    .sum::<f32>()
                    + 1e-5;
                assert!((y[i * d_out + o] - exact).abs() <= bound, "{i},{o}");
            }
        }
    }
}
