//! The fused, row-chunked softmax cross-entropy over the whole item catalogue.
//!
//! One pass per chunk of rows computes the logits against the (tied) item table, the row
//! max, the log-sum-exp and the gradient `softmax - one_hot`, and folds it into `dh` and
//! `d_table`; the full `[rows, items]` logits never exist. The same code serves the
//! vocab-parallel loss of tensor parallelism: each rank passes its shard of the table and a
//! [`VocabReducer`] that all-reduces the row max and the sums across the shards, so no rank
//! ever materialises the full logits (Megatron's vocab-parallel cross-entropy).

use rayon::prelude::*;

use crate::kernels::{fast_exp, matmul_into, MatRef};

/// Combines per-row statistics across vocabulary shards. On one device it does nothing.
pub trait VocabReducer {
    type Error;
    /// Element-wise maximum of `values` over all shards, in place.
    fn all_max(&mut self, values: &mut [f32]) -> Result<(), Self::Error>;
    /// Element-wise sum of `values` over all shards, in place.
    fn all_sum(&mut self, values: &mut [f32]) -> Result<(), Self::Error>;
    /// Whether there are other shards to combine with; when not, the device loss keeps its
    /// statistics on the device instead of bringing them to the host for a no-op.
    fn spans_shards(&self) -> bool {
        true
    }
}

/// The reducer of an unsharded table.
pub struct SingleShard;

impl VocabReducer for SingleShard {
    type Error = std::convert::Infallible;
    fn all_max(&mut self, _: &mut [f32]) -> Result<(), Self::Error> {
        Ok(())
    }
    fn all_sum(&mut self, _: &mut [f32]) -> Result<(), Self::Error> {
        Ok(())
    }
    fn spans_shards(&self) -> bool {
        false
    }
}

/// A contiguous shard of the item table: `rows` items of width `dim`, row `r` being the item
/// with global id `first_item + r`.
#[derive(Debug, Clone, Copy)]
pub struct TableShard<'a> {
    pub table: &'a [f32],
    pub rows: usize,
    pub dim: usize,
    pub first_item: u32,
}

impl<'a> TableShard<'a> {
    pub fn new(table: &'a [f32], dim: usize, first_item: u32) -> Self {
        assert_eq!(
            table.len() % dim.max(1),
            0,
            "table length is not a multiple of dim"
        );
        Self {
            table,
            rows: table.len() / dim.max(1),
            dim,
            first_item,
        }
    }

    fn view(&self) -> MatRef<'a> {
        MatRef::row_major(self.table, self.rows, self.dim)
    }

    fn local(&self, item: u32) -> Option<usize> {
        let r = item.checked_sub(self.first_item)? as usize;
        (r < self.rows).then_some(r)
    }
}

/// What the fused loss returns. `loss_sum` is the sum of per-row losses (the same on every
/// shard); `dh` is this shard's partial gradient of the hidden rows (sum over shards to get
/// the full one) and `d_table` the gradient of this shard's table rows, both already
/// multiplied by `grad_scale`.
#[derive(Debug, Clone)]
pub struct CrossEntropyOutput {
    pub loss_sum: f64,
    pub dh: Vec<f32>,
    pub d_table: Vec<f32>,
}

/// Rows per chunk: the chunk's logits stay in cache and give rayon enough rows.
pub const DEFAULT_CHUNK_ROWS: usize = 256;

/// Cross-entropy of `h` (`[n, dim]` row-major) against the item table, with `targets[i]` the
/// global item id of row `i`. The gradient is scaled by `grad_scale` (e.g. `1 / total
/// targets of the global batch`, so that micro-batches and data-parallel shards sum to the
/// gradient of the mean loss).
pub fn fused_cross_entropy<R: VocabReducer>(
    h: &[f32],
    targets: &[u32],
    shard: TableShard<'_>,
    grad_scale: f32,
    chunk_rows: usize,
    reducer: &mut R,
) -> Result<CrossEntropyOutput, R::Error> {
    let dim = shard.dim;
    let n = targets.len();
    assert_eq!(h.len(), n * dim, "hidden rows and targets disagree");
    let v = shard.rows;
    let chunk_rows = chunk_rows.max(1);
    let mut dh = vec![0.0f32; n * dim];
    let mut d_table = vec![0.0f32; v * dim];
    let mut logits = vec![0.0f32; chunk_rows.min(n.max(1)) * v];
    let mut stats = vec![0.0f32; 3 * chunk_rows];
    let mut loss_sum = 0.0f64;

    for start in (0..n).step_by(chunk_rows) {
        let end = (start + chunk_rows).min(n);
        let c = end - start;
        let h_c = MatRef::row_major(&h[start * dim..end * dim], c, dim);
        let logits = &mut logits[..c * v];
        matmul_into(logits, h_c, shard.view().t(), false);

        // Row max, agreed across shards.
        let row_max = &mut stats[..c];
        logits
            .par_chunks(v.max(1))
            .zip(row_max.par_iter_mut())
            .for_each(|(row, m)| *m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        reducer.all_max(row_max)?;

        // exp(l - max) in place; per-row sum and the target's logit (zero off-shard).
        let (row_max, sums) = stats.split_at_mut(chunk_rows);
        let row_max = &row_max[..c];
        let sums = &mut sums[..2 * c];
        let (sum_exp, target_logit) = sums.split_at_mut(c);
        logits
            .par_chunks_mut(v.max(1))
            .zip(sum_exp.par_iter_mut().zip(target_logit.par_iter_mut()))
            .enumerate()
            .for_each(|(i, (row, (s, t)))| {
                let m = row_max[i];
                *t = shard.local(targets[start + i]).map_or(0.0, |r| row[r] - m);
                // Two passes so both vectorise: the element-wise exp, then a lane-wise sum
                // (one running scalar sum would serialise on the adds).
                for x in row.iter_mut() {
                    *x = fast_exp(*x - m);
                }
                *s = lane_sum(row);
            });
        // One all-reduce for both statistics.
        reducer.all_sum(&mut stats[chunk_rows..chunk_rows + 2 * c])?;
        let (sum_exp, target_logit) = stats[chunk_rows..chunk_rows + 2 * c].split_at(c);

        // Loss and the gradient (softmax - one_hot) * grad_scale, in place.
        for i in 0..c {
            loss_sum += f64::from(sum_exp[i].ln() - target_logit[i]);
        }
        logits
            .par_chunks_mut(v.max(1))
            .enumerate()
            .for_each(|(i, row)| {
                let inv = grad_scale / sum_exp[i];
                for x in row.iter_mut() {
                    *x *= inv;
                }
                if let Some(r) = shard.local(targets[start + i]) {
                    row[r] -= grad_scale;
                }
            });
        let g = MatRef::row_major(logits, c, v);
        matmul_into(&mut dh[start * dim..end * dim], g, shard.view(), false);
        matmul_into(&mut d_table, g.t(), h_c, true);
    }
    Ok(CrossEntropyOutput {
        loss_sum,
        dh,
        d_table,
    })
}

/// How a student learns from a teacher ([`fused_distill_cross_entropy`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillWeights {
    /// Softmax temperature of both models' soft distributions (Hinton et al.).
    pub temperature: f32,
    /// Weight of the cross-entropy on the true next item; `1 - hard` goes to the soft term.
    pub hard: f32,
}

/// Knowledge distillation through the fused kernel: for each row, the student's logits
/// against its item table and the teacher's logits against the teacher's table are formed a
/// chunk of rows at a time (the catalogue-wide logits of neither model are ever held whole),
/// and the loss is `hard * CE(z, y) + (1 - hard) * T^2 * KL(softmax(t/T) || softmax(z/T))`.
/// Its gradient with respect to the student's logits, `hard * (softmax(z) - onehot(y)) +
/// (1 - hard) * T * (softmax(z/T) - softmax(t/T))`, is folded into `dh` and `d_table` as in
/// [`fused_cross_entropy`]. `student` and `teacher` cover the same items (`first_item` 1,
/// the padding row left out); `teacher_h` is `[n, teacher.dim]`.
pub fn fused_distill_cross_entropy(
    h: &[f32],
    teacher_h: &[f32],
    targets: &[u32],
    student: TableShard<'_>,
    teacher: TableShard<'_>,
    weights: DistillWeights,
    grad_scale: f32,
    chunk_rows: usize,
) -> CrossEntropyOutput {
    let dim = student.dim;
    let n = targets.len();
    assert_eq!(h.len(), n * dim, "hidden rows and targets disagree");
    assert_eq!(
        teacher_h.len(),
        n * teacher.dim,
        "teacher rows and targets disagree"
    );
    assert_eq!(
        student.rows, teacher.rows,
        "student and teacher catalogues differ"
    );
    assert_eq!(
        student.first_item, teacher.first_item,
        "tables start at different items"
    );
    let v = student.rows;
    let chunk_rows = chunk_rows.max(1);
    let temp = weights.temperature.max(1e-3);
    let hard = weights.hard.clamp(0.0, 1.0);
    let soft = 1.0 - hard;
    let mut dh = vec![0.0f32; n * dim];
    let mut d_table = vec![0.0f32; v * dim];
    let cap = chunk_rows.min(n.max(1)) * v;
    let mut logits = vec![0.0f32; cap];
    let mut teacher_logits = vec![0.0f32; cap];
    let mut loss_sum = 0.0f64;
    for start in (0..n).step_by(chunk_rows) {
        let end = (start + chunk_rows).min(n);
        let c = end - start;
        let h_c = MatRef::row_major(&h[start * dim..end * dim], c, dim);
        let t_c = MatRef::row_major(
            &teacher_h[start * teacher.dim..end * teacher.dim],
            c,
            teacher.dim,
        );
        let logits = &mut logits[..c * v];
        let teacher_logits = &mut teacher_logits[..c * v];
        matmul_into(logits, h_c, student.view().t(), false);
        matmul_into(teacher_logits, t_c, teacher.view().t(), false);
        let row_losses: Vec<f64> = logits
            .par_chunks_mut(v.max(1))
            .zip(teacher_logits.par_chunks_mut(v.max(1)))
            .enumerate()
            .map(|(i, (z, t))| {
                let target = student.local(targets[start + i]);
                distill_row(z, t, target, temp, hard, soft, grad_scale)
            })
            .collect();
        loss_sum += row_losses.iter().sum::<f64>();
        let g = MatRef::row_major(logits, c, v);
        matmul_into(&mut dh[start * dim..end * dim], g, student.view(), false);
        matmul_into(&mut d_table, g.t(), h_c, true);
    }
    CrossEntropyOutput {
        loss_sum,
        dh,
        d_table,
    }
}

/// One row of [`fused_distill_cross_entropy`]: returns the row's loss and leaves the
/// (scaled) gradient with respect to the student's logits in `z`; `t` is scratch.
fn distill_row(
    z: &mut [f32],
    t: &mut [f32],
    target: Option<usize>,
    temp: f32,
    hard: f32,
    soft: f32,
    grad_scale: f32,
) -> f64 {
    let inv_t = 1.0 / temp;
    // Teacher: p = softmax(t / T), kept in `t`, with log p for the KL term.
    let t_max = t.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
    for x in t.iter_mut() {
        *x = fast_exp(*x * inv_t - t_max);
    }
    let t_sum = lane_sum(t);
    let log_t_sum = t_sum.ln();
    // Student at temperature T: q = softmax(z / T); at 1: s = softmax(z).
    let z_max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let zt_max = z_max * inv_t;
    let mut q_sum = 0.0f32;
    let mut s_sum = 0.0f32;
    for &x in z.iter() {
        q_sum += fast_exp(x * inv_t - zt_max);
        s_sum += fast_exp(x - z_max);
    }
    let (log_q_sum, log_s_sum) = (q_sum.ln(), s_sum.ln());
    let mut kl = 0.0f64;
    for (zi, ti) in z.iter().zip(t.iter()) {
        let p = ti / t_sum;
        if p > 0.0 {
            let log_p = (ti.ln()) - log_t_sum;
            let log_q = zi * inv_t - zt_max - log_q_sum;
            kl += f64::from(p) * f64::from(log_p - log_q);
        }
    }
    let ce = target.map_or(0.0, |r| f64::from(log_s_sum + z_max - z[r]));
    let loss = f64::from(hard) * ce + f64::from(soft * temp * temp) * kl;
    for (zi, ti) in z.iter_mut().zip(t.iter()) {
        let p = ti / t_sum;
        let q = fast_exp(*zi * inv_t - zt_max - log_q_sum);
        let s = fast_exp(*zi - z_max - log_s_sum);
        *zi = grad_scale * (hard * s + soft * temp * (q - p));
    }
    if let Some(r) = target {
        z[r] -= grad_scale * hard;
    }
    loss
}

/// Sum of `values` in eight independent lanes (vectorisable; order differs from a scalar
/// left fold by rounding only).
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = values.chunks_exact(8);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Scores of `h` (`[n, dim]`) against every item of the shard into `out` (`[n, rows]`).
pub fn score_into(out: &mut [f32], h: &[f32], shard: TableShard<'_>) {
    let n = h.len() / shard.dim.max(1);
    matmul_into(
        out,
        MatRef::row_major(h, n, shard.dim),
        shard.view().t(),
        false,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        h: &[f32],
        targets: &[u32],
        table: &[f32],
        dim: usize,
        first: u32,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let v = table.len() / dim;
        let n = targets.len();
        let mut loss = 0.0;
        let mut dh = vec![0.0; n * dim];
        let mut dt = vec![0.0; v * dim];
        for i in 0..n {
            let logits: Vec<f64> = (0..v)
                .map(|j| {
                    (0..dim)
                        .map(|p| f64::from(h[i * dim + p]) * f64::from(table[j * dim + p]))
                        .sum()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            let t = (targets[i] - first) as usize;
            loss += m + s.ln() - logits[t];
            for j in 0..v {
                let g = (logits[j] - m).exp() / s - if j == t { 1.0 } else { 0.0 };
                for p in 0..dim {
                    dh[i * dim + p] += g * f64::from(table[j * dim + p]);
                    dt[j * dim + p] += g * f64::from(h[i * dim + p]);
                }
            }
        }
        (loss, dh, dt)
    }

    fn data(n: usize, v: usize, dim: usize) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
        let h = (0..n * dim)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.3)
            .collect();
        let t = (0..v * dim)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2)
            .collect();
        let targets = (0..n).map(|i| 1 + (i * 3 % v) as u32).collect();
        (h, t, targets)
    }

    #[test]
    fn fused_loss_matches_reference_for_any_chunking() {
        let (n, v, dim) = (37, 23, 6);
        let (h, table, targets) = data(n, v, dim);
        let (loss, dh, dt) = reference(&h, &targets, &table, dim, 1);
        for chunk in [1, 5, 37, 100] {
            let out = fused_cross_entropy(
                &h,
                &targets,
                TableShard::new(&table, dim, 1),
                1.0,
                chunk,
                &mut SingleShard,
            )
            .unwrap();
            assert!((out.loss_sum - loss).abs() < 1e-4 * loss.abs().max(1.0));
            for (a, b) in out.dh.iter().zip(&dh) {
                assert!((f64::from(*a) - b).abs() < 1e-4, "dh {a} vs {b}");
            }
            for (a, b) in out.d_table.iter().zip(&dt) {
                assert!((f64::from(*a) - b).abs() < 1e-4, "dt {a} vs {b}");
            }
        }
    }

    /// Shards of the table with a reducer that sums across them reproduce the full loss:
    /// the vocab-parallel path, simulated sequentially (two passes exchange the statistics).
    #[test]
    fn sharded_table_with_exact_reduction_matches_full() {
        let (n, v, dim) = (9, 10, 4);
        let (h, table, targets) = data(n, v, dim);
        let full = fused_cross_entropy(
            &h,
            &targets,
            TableShard::new(&table, dim, 1),
            0.5,
            4,
            &mut SingleShard,
        )
        .unwrap();

        // Precompute the global statistics the reducer would produce.
        struct Fixed {
            max: Vec<Vec<f32>>,
            sums: Vec<Vec<f32>>,
            step_max: usize,
            step_sum: usize,
        }
        impl VocabReducer for Fixed {
            type Error = ();
            fn all_max(&mut self, v: &mut [f32]) -> Result<(), ()> {
                v.copy_from_slice(&self.max[self.step_max]);
                self.step_max += 1;
                Ok(())
            }
            fn all_sum(&mut self, v: &mut [f32]) -> Result<(), ()> {
                v.copy_from_slice(&self.sums[self.step_sum]);
                self.step_sum += 1;
                Ok(())
            }
        }
        struct Record<'a> {
            max: &'a mut Vec<Vec<f32>>,
            sums: &'a mut Vec<Vec<f32>>,
        }
        impl VocabReducer for Record<'_> {
            type Error = ();
            fn all_max(&mut self, v: &mut [f32]) -> Result<(), ()> {
                self.max.push(v.to_vec());
                Ok(())
            }
            fn all_sum(&mut self, v: &mut [f32]) -> Result<(), ()> {
                self.sums.push(v.to_vec());
                Ok(())
            }
        }
        let split = 6;
        let shards = [(0, split), (split, v)];
        // Pass 1: per-shard maxima; the global max is their maximum.
        let mut maxes: Vec<Vec<Vec<f32>>> = Vec::new();
        for &(a, b) in &shards {
            let (mut mx, mut sm) = (Vec::new(), Vec::new());
            let _ = fused_cross_entropy(
                &h,
                &targets,
                TableShard::new(&table[a * dim..b * dim], dim, 1 + a as u32),
                0.5,
                4,
                &mut Record {
                    max: &mut mx,
                    sums: &mut sm,
                },
            );
            maxes.push(mx);
        }
        let gmax: Vec<Vec<f32>> = (0..maxes[0].len())
            .map(|c| {
                maxes[0][c]
                    .iter()
                    .zip(&maxes[1][c])
                    .map(|(a, b)| a.max(*b))
                    .collect()
            })
            .collect();
        // Pass 2: per-shard sums under the global max; the global sum is their sum.
        let mut sums: Vec<Vec<Vec<f32>>> = Vec::new();
        for &(a, b) in &shards {
            let mut sm = Vec::new();
            struct MaxThenRecord<'a> {
                max: &'a [Vec<f32>],
                i: usize,
                sums: &'a mut Vec<Vec<f32>>,
            }
            impl VocabReducer for MaxThenRecord<'_> {
                type Error = ();
                fn all_max(&mut self, v: &mut [f32]) -> Result<(), ()> {
                    v.copy_from_slice(&self.max[self.i]);
                    self.i += 1;
                    Ok(())
                }
                fn all_sum(&mut self, v: &mut [f32]) -> Result<(), ()> {
                    self.sums.push(v.to_vec());
                    Ok(())
                }
            }
            let _ = fused_cross_entropy(
                &h,
                &targets,
                TableShard::new(&table[a * dim..b * dim], dim, 1 + a as u32),
                0.5,
                4,
                &mut MaxThenRecord {
                    max: &gmax,
                    i: 0,
                    sums: &mut sm,
                },
            );
            sums.push(sm);
        }
        let gsum: Vec<Vec<f32>> = (0..sums[0].len())
            .map(|c| {
                sums[0][c]
                    .iter()
                    .zip(&sums[1][c])
                    .map(|(a, b)| a + b)
                    .collect()
            })
            .collect();
        let mut dh = vec![0.0f32; n * dim];
        let mut dt = Vec::new();
        for &(a, b) in &shards {
            let out = fused_cross_entropy(
                &h,
                &targets,
                TableShard::new(&table[a * dim..b * dim], dim, 1 + a as u32),
                0.5,
                4,
                &mut Fixed {
                    max: gmax.clone(),
                    sums: gsum.clone(),
                    step_max: 0,
                    step_sum: 0,
                },
            )
            .unwrap();
            assert!((out.loss_sum - full.loss_sum).abs() < 1e-4);
            for (x, y) in dh.iter_mut().zip(&out.dh) {
                *x += y;
            }
            dt.extend(out.d_table);
        }
        for (a, b) in dh.iter().zip(&full.dh) {
            assert!((a - b).abs() < 1e-5);
        }
        for (a, b) in dt.iter().zip(&full.d_table) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    /// The distillation kernel's loss and gradients against a direct f64 computation.
    #[test]
    fn distill_matches_reference() {
        let (n, v, dim, tdim) = (7, 11, 4, 3);
        let (h, table, targets) = data(n, v, dim);
        let th: Vec<f32> = (0..n * tdim)
            .map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.4)
            .collect();
        let tt: Vec<f32> = (0..v * tdim)
            .map(|i| ((i * 2 % 5) as f32 - 2.0) * 0.3)
            .collect();
        let (temp, hard) = (2.0f64, 0.3f64);
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum()
        };
        let softmax = |l: &[f64]| -> Vec<f64> {
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = l.iter().map(|x| (x - m).exp()).sum();
            l.iter().map(|x| (x - m).exp() / s).collect()
        };
        let mut loss = 0.0;
        let mut dh = vec![0.0f64; n * dim];
        let mut d_table = vec![0.0f64; v * dim];
        for i in 0..n {
            let z: Vec<f64> = (0..v)
                .map(|j| dot(&h[i * dim..(i + 1) * dim], &table[j * dim..(j + 1) * dim]))
                .collect();
            let t: Vec<f64> = (0..v)
                .map(|j| dot(&th[i * tdim..(i + 1) * tdim], &tt[j * tdim..(j + 1) * tdim]))
                .collect();
            let s = softmax(&z);
            let q = softmax(&z.iter().map(|x| x / temp).collect::<Vec<_>>());
            let p = softmax(&t.iter().map(|x| x / temp).collect::<Vec<_>>());
            let y = (targets[i] - 1) as usize;
            let kl: f64 = (0..v).map(|j| p[j] * (p[j].ln() - q[j].ln())).sum();
            loss += hard * -s[y].ln() + (1.0 - hard) * temp * temp * kl;
            for j in 0..v {
                let g = hard * (s[j] - if j == y { 1.0 } else { 0.0 })
                    + (1.0 - hard) * temp * (q[j] - p[j]);
                for k in 0..dim {
                    dh[i * dim + k] += g * f64::from(table[j * dim + k]);
                    d_table[j * dim + k] += g * f64::from(h[i * dim + k]);
                }
            }
        }
        for chunk in [1, 3, 100] {
            let out = fused_distill_cross_entropy(
                &h,
                &th,
                &targets,
                TableShard::new(&table, dim, 1),
                TableShard::new(&tt, tdim, 1),
                DistillWeights {
                    temperature: temp as f32,
                    hard: hard as f32,
                },
                1.0,
                chunk,
            );
            assert!(
                (out.loss_sum - loss).abs() < 1e-4 * loss.abs().max(1.0),
                "{} vs {loss}",
                out.loss_sum
            );
            for (a, b) in out.dh.iter().zip(&dh) {
                assert!((f64::from(*a) - b).abs() < 1e-4, "dh {a} vs {b}");
            }
            assert_eq!(out.d_table.len(), d_table.len());
            for (a, b) in out.d_table.iter().zip(&d_table) {
                assert!((f64::from(*a) - b).abs() < 1e-4, "d_table {a} vs {b}");
            }
        }
    }
}
