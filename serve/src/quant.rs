//! int8 weights and the host kernels that use them.
//!
//! * The item table: per-row symmetric int8 (TorchRec's row-wise quantized embeddings): row
//!   `r` is `scale[r] * q[r, ..]` with `scale[r] = max |row| / 127`.
//! * The blocks' projections: per-output-channel symmetric int8 weights.
//! * Activations (the blocks' inputs and the scoring queries) are quantized per row on the
//!   fly (dynamic quantization, as PyTorch's `quantize_dynamic` does for `Linear`), and
//!   products are summed exactly in i32.
//!
//! burn's Flex backend can quantize tensors but has no int8 matmul (its quantized ops
//! dequantize first), so these are meshrec's own kernels. The weights are packed as oneDNN
//! and fbgemm pack them for VNNI's `vpdpbusd` (u8 x i8 -> i32, four products per lane):
//! rows in panels of 16, the reduction dimension in groups of 4, so that one 512-bit
//! accumulator holds 16 rows' dot products and no horizontal sum is needed. Activations are
//! offset by 128 into u8 and each row's weight sum corrects for it. Where the CPU has
//! AVX-512 VNNI (detected at run time) the panel loop uses it; elsewhere a portable loop
//! computes the same integers, so both paths give bit-identical results.

/// Rows one panel holds: the i32 lanes of a 512-bit accumulator.
const LANES: usize = 16;
/// Reduction elements one lane of `vpdpbusd` takes per instruction.
const GROUP: usize = 4;
/// The offset that turns an int8 activation into the u8 `vpdpbusd` wants.
const OFFSET: i32 = 128;

/// `round(x / scale)` clamped to the symmetric int8 range.
#[inline(always)]
fn quantize_one(x: f32, inv_scale: f32) -> i8 {
    (x * inv_scale).round().clamp(-127.0, 127.0) as i8
}

/// The symmetric per-row scale of `row` (`max |x| / 127`; 0 for an all-zero row).
fn row_scale(row: &[f32]) -> f32 {
    row.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0
}

/// An int8 matrix `[rows, cols]` in the VNNI panel layout: panel `p`, group `g` is 64 bytes,
/// lane `j`'s four values of row `16p + j`, columns `4g..4g + 4`; zero-padded to whole
/// panels and groups.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedI8 {
    rows: usize,
    cols: usize,
    groups: usize,
    data: Vec<i8>,
    /// Each row's sum: `<x + 128, w> - 128 * sum(w) = <x, w>`.
    row_sums: Vec<i32>,
}

impl PackedI8 {
    fn pack(rows: usize, cols: usize, value: impl Fn(usize, usize) -> i8) -> Self {
        let groups = cols.div_ceil(GROUP);
        let mut packed = Self {
            rows,
            cols,
            groups,
            data: vec![0; rows.div_ceil(LANES) * groups * LANES * GROUP],
            row_sums: vec![0; rows],
        };
        for r in 0..rows {
            for k in 0..cols {
                let v = value(r, k);
                let at = packed.index(r, k);
                packed.data[at] = v;
                packed.row_sums[r] += i32::from(v);
            }
        }
        packed
    }

    #[inline]
    fn index(&self, r: usize, k: usize) -> usize {
        let (p, j) = (r / LANES, r % LANES);
        let (g, t) = (k / GROUP, k % GROUP);
        ((p * self.groups + g) * LANES + j) * GROUP + t
    }

    /// Element `(r, k)`.
    pub fn get(&self, r: usize, k: usize) -> i8 {
        self.data[self.index(r, k)]
    }

    /// The bytes of an activation row as the kernels read it.
    fn stride(&self) -> usize {
        self.groups * GROUP
    }

    fn bytes(&self) -> usize {
        self.data.len() + 4 * self.row_sums.len()
    }

    /// `out[i * rows + r] = <x_i, w_r>` exactly, for `n` activation rows given offset into
    /// u8 (`x + 128`), each `stride()` bytes (padding may hold anything: the weights there
    /// are zero).
    fn dots(&self, x: &[u8], n: usize, out: &mut [i32]) {
        debug_assert_eq!(x.len(), n * self.stride());
        debug_assert_eq!(out.len(), n * self.rows);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { self.dots_vnni(x, n, out) };
            return;
        }
        self.dots_portable(x, n, out);
    }

    /// The lanes of one panel, corrected for the offset, into row `i` of `out`.
    #[inline(always)]
    fn store_panel(&self, p: usize, i: usize, lanes: &[i32; LANES], out: &mut [i32]) {
        let first = p * LANES;
        let valid = LANES.min(self.rows - first);
        let row = &mut out[i * self.rows + first..i * self.rows + first + valid];
        for ((o, &acc), &sum) in row.iter_mut().zip(lanes).zip(&self.row_sums[first..]) {
            *o = acc - OFFSET * sum;
        }
    }

    fn dots_portable(&self, x: &[u8], n: usize, out: &mut [i32]) {
        let (stride, panel_len) = (self.stride(), self.groups * LANES * GROUP);
        for (p, panel) in self.data.chunks_exact(panel_len).enumerate() {
            for i in 0..n {
                let xi = &x[i * stride..(i + 1) * stride];
                let mut lanes = [0i32; LANES];
                for (xg, wg) in xi
                    .chunks_exact(GROUP)
                    .zip(panel.chunks_exact(LANES * GROUP))
                {
                    for (lane, w) in lanes.iter_mut().zip(wg.chunks_exact(GROUP)) {
                        for t in 0..GROUP {
                            *lane += i32::from(xg[t]) * i32::from(w[t]);
                        }
                    }
                }
                self.store_panel(p, i, &lanes, out);
            }
        }
    }

    /// [`Self::dots_portable`] with one `vpdpbusd` per group of a panel.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dots_vnni(&self, x: &[u8], n: usize, out: &mut [i32]) {
        use std::arch::x86_64::{
            _mm512_dpbusd_epi32, _mm512_loadu_si512, _mm512_set1_epi32, _mm512_setzero_si512,
            _mm512_storeu_si512,
        };
        let (stride, panel_len) = (self.stride(), self.groups * LANES * GROUP);
        for (p, panel) in self.data.chunks_exact(panel_len).enumerate() {
            for i in 0..n {
                let xi = &x[i * stride..(i + 1) * stride];
                let mut acc = _mm512_setzero_si512();
                for (xg, wg) in xi
                    .chunks_exact(GROUP)
                    .zip(panel.chunks_exact(LANES * GROUP))
                {
                    let a = _mm512_set1_epi32(i32::from_le_bytes([xg[0], xg[1], xg[2], xg[3]]));
                    // SAFETY: `wg` is a 64-byte slice; the load is unaligned.
                    let w = unsafe { _mm512_loadu_si512(wg.as_ptr().cast()) };
                    acc = _mm512_dpbusd_epi32(acc, a, w);
                }
                let mut lanes = [0i32; LANES];
                // SAFETY: `lanes` is 64 bytes; the store is unaligned.
                unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), acc) };
                self.store_panel(p, i, &lanes, out);
            }
        }
    }
}

/// Rows quantized symmetrically to int8, one scale per row, packed for the kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    pub rows: usize,
    pub cols: usize,
    packed: PackedI8,
    pub scales: Vec<f32>,
}

impl Int8Rows {
    /// Quantizes a row-major `rows x cols` matrix row by row.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "int8 rows: wrong slice length");
        let scales: Vec<f32> = data.chunks_exact(cols.max(1)).map(row_scale).collect();
        let packed = PackedI8::pack(rows, cols, |r, k| {
            let s = scales[r];
            quantize_one(data[r * cols + k], if s > 0.0 { 1.0 / s } else { 0.0 })
        });
        Self {
            rows,
            cols,
            packed,
            scales,
        }
    }

    /// Row `r` back in f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let s = self.scales[r];
        for (k, o) in out.iter_mut().enumerate().take(self.cols) {
            *o = f32::from(self.packed.get(r, k)) * s;
        }
    }

    /// The largest error of any element: half a step of its row's scale.
    pub fn max_abs_error(&self) -> f32 {
        self.scales.iter().fold(0.0f32, |m, s| m.max(s * 0.5))
    }

    pub fn bytes(&self) -> usize {
        self.packed.bytes() + 4 * self.scales.len()
    }

    /// `out[i, r] ~ <x[i], row r>` for `n` f32 rows `x` of width `cols` (`out` is
    /// `[n, rows]`): each `x` row quantized with its own scale, the products summed exactly
    /// in i32, then both scales applied.
    pub fn matmul_nt(&self, x: &[f32], out: &mut [f32]) {
        let cols = self.cols;
        let n = x.len() / cols.max(1);
        assert_eq!(out.len(), n * self.rows, "int8 matmul: wrong output length");
        let stride = self.packed.stride();
        let mut xq = vec![OFFSET as u8; n * stride];
        let mut x_scales = Vec::with_capacity(n);
        for (row, q) in x.chunks_exact(cols.max(1)).zip(xq.chunks_exact_mut(stride)) {
            let scale = row_scale(row);
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (q, &v) in q.iter_mut().zip(row) {
                *q = (i32::from(quantize_one(v, inv)) + OFFSET) as u8;
            }
            x_scales.push(scale);
        }
        let mut dots = vec![0i32; n * self.rows];
        self.packed.dots(&xq, n, &mut dots);
        for ((o, d), x_scale) in out
            .chunks_exact_mut(self.rows.max(1))
            .zip(dots.chunks_exact(self.rows.max(1)))
            .zip(&x_scales)
        {
            for ((o, &d), &s) in o.iter_mut().zip(d).zip(&self.scales) {
                *o = d as f32 * x_scale * s;
            }
        }
    }

    /// Scores `n` queries (`[n, cols]`) against every row: [`Self::matmul_nt`].
    pub fn score(&self, queries: &[f32], out: &mut [f32]) {
        self.matmul_nt(queries, out);
    }
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

    /// `x` is `[n, d_in]`; returns `[n, d_out]` ([`Int8Rows::matmul_nt`]).
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.d_in().max(1);
        let mut out = vec![0f32; n * self.d_out()];
        self.w.matmul_nt(x, &mut out);
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

    /// The bound of one int8 dot product against the f32 one: each product errs by at most
    /// `|x| dw + |w| dx + dx dw` (half a step of each side's scale).
    fn dot_bound(x: &[f32], w: &[f32], x_scale: f32, w_scale: f32) -> f32 {
        x.iter()
            .zip(w)
            .map(|(a, b)| {
                a.abs() * w_scale * 0.5 + b.abs() * x_scale * 0.5 + x_scale * w_scale * 0.25
            })
            .sum::<f32>()
            + 1e-5
    }

    /// Every dequantized element is within half a step of its row's scale, and every int8
    /// score within [`dot_bound`] of the f32 score.
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
            for r in 0..rows {
                let w = &table[r * cols..(r + 1) * cols];
                let exact: f32 = query.iter().zip(w).map(|(a, b)| a * b).sum();
                let bound = dot_bound(query, w, row_scale(query), q.scales[r]);
                assert!(
                    (scores[i * rows + r] - exact).abs() <= bound,
                    "row {r}: {} vs {exact} (bound {bound})",
                    scores[i * rows + r]
                );
            }
        }
    }

    /// The packed kernels compute exact integer dot products: the dispatched path (VNNI
    /// where the CPU has it) and the portable one both equal a plain i32 sum, for shapes
    /// that leave partial panels and partial groups.
    #[test]
    fn packed_dots_are_exact_on_every_path() {
        for (rows, cols, n) in [
            (1, 1, 1),
            (17, 5, 3),
            (33, 64, 4),
            (16, 68, 2),
            (40, 130, 5),
        ] {
            let value = |r: usize, k: usize| ((r * 31 + k * 17) % 255) as i32 - 127;
            let packed = PackedI8::pack(rows, cols, |r, k| value(r, k) as i8);
            let stride = packed.stride();
            let x: Vec<i32> = (0..n * cols)
                .map(|i| ((i * 53) % 255) as i32 - 127)
                .collect();
            let mut xq = vec![0xA5u8; n * stride];
            for i in 0..n {
                for k in 0..cols {
                    xq[i * stride + k] = (x[i * cols + k] + OFFSET) as u8;
                }
            }
            let expected: Vec<i32> = (0..n)
                .flat_map(|i| (0..rows).map(move |r| (i, r)))
                .map(|(i, r)| (0..cols).map(|k| x[i * cols + k] * value(r, k)).sum())
                .collect();
            let mut out = vec![0i32; n * rows];
            packed.dots(&xq, n, &mut out);
            assert_eq!(out, expected, "dispatched, {rows}x{cols}, n {n}");
            let mut out = vec![0i32; n * rows];
            packed.dots_portable(&xq, n, &mut out);
            assert_eq!(out, expected, "portable, {rows}x{cols}, n {n}");
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
            let x_scale = row_scale(xr);
            for o in 0..d_out {
                let column: Vec<f32> = (0..d_in).map(|k| w[k * d_out + o]).collect();
                let exact: f32 = xr.iter().zip(&column).map(|(a, b)| a * b).sum();
                let bound = dot_bound(xr, &column, x_scale, lin.w.scales[o]);
                assert!((y[i * d_out + o] - exact).abs() <= bound, "{i},{o}");
            }
        }
    }
}
