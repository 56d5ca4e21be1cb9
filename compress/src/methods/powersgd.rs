//! PowerSGD (Vogels et al. 2019): rank-r power iteration on the matrix view of a
//! tensor, or of each layer of a bucket, warm-started, with Gram-Schmidt
//! orthogonalisation; all-reduce compatible.
//! The matrix view and its products are in `lowrank.rs`, which the decoder shares.

use super::api::{avg_as, Aggregation, AvgReduce, Compressor, Ctx, ReduceInfo};
use super::config::MethodConfig;
use super::dense::write_identity;
use crate::error::{CompressError, SyncError};
use crate::lowrank::{m_times_q, mt_times_p, orthogonalize, p_times_qt};
use crate::rng;
use crate::wire::{DecodeScratch, Header, MethodId, OpSet, Params, Payload};
use rand_distr::{Distribution, StandardNormal};

// Re-exported so the view keeps its public path next to the compressor that uses it.
pub use crate::lowrank::View;

/// Fills Q with standard normals from the seed shared by all ranks, orthogonalised.
fn init_q(q: &mut Vec<f32>, cols: usize, r: usize, seed: u64) {
    q.clear();
    q.resize(cols * r, 0.0);
    init_q_in(q, cols, r, seed);
}

/// `init_q` into a slice of exactly `cols * r` values.
fn init_q_in(q: &mut [f32], cols: usize, r: usize, seed: u64) {
    let mut g = rng::stream(seed);
    q.iter_mut()
        .for_each(|v| *v = StandardNormal.sample(&mut g));
    orthogonalize(q, cols, r);
}

/// Where one layer of a bucket sits in the per-layer protocol's buffers.
#[derive(Debug, Clone, Copy)]
struct LayerPlan {
    /// Offset of the layer in the bucket.
    at: usize,
    view: View,
    /// Rank used; 0 sends the layer dense (a vector, or factors no smaller than it).
    rank: usize,
    /// Offset of its P (or of its dense values) in the first all-reduce's buffer.
    p_at: usize,
    /// Offset of its Q in the second all-reduce's buffer.
    q_at: usize,
}

/// PowerSGD compressor; P/Q buffers are reused between calls.
#[derive(Debug)]
pub struct PowerSgd {
    config: MethodConfig,
    rank: usize,
    min_rate: f64,
    p: Vec<f32>,
    q: Vec<f32>,
    plan: Vec<LayerPlan>,
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
            plan: Vec::new(),
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

    /// The per-layer protocol (Vogels et al.'s Algorithm 1 over a bucket): P_i = M_i Q_i
    /// for every layer, one all-reduce of all P_i together with the layers sent dense,
    /// orthogonalise each P_i, Q_i = M_i^T P_i, one all-reduce of all Q_i, then
    /// M_i ≈ P_i Q_i^T. Q_i warm-starts from the previous step's.
    fn reduce_layers(
        &mut self,
        x: &mut [f32],
        residual: Option<&mut [f32]>,
        ctx: &mut Ctx<'_>,
        layers: &[(usize, usize)],
        avg: &mut AvgReduce<'_>,
    ) -> Result<ReduceInfo, SyncError> {
        self.plan.clear();
        let (mut at, mut p_len, mut q_len) = (0, 0, 0);
        for &(rows, cols) in layers {
            let len = rows
                .checked_mul(cols)
                .ok_or_else(|| CompressError::TooLarge {
                    method: "powersgd",
                    what: format!("layer {rows} x {cols}"),
                })?;
            let view = View::new(len, Some((rows, cols)))?;
            self.check_dims(view)?;
            let rank = if view.worth_compressing(self.rank, self.min_rate) {
                view.rank(self.rank)
            } else {
                0
            };
            self.plan.push(LayerPlan {
                at,
                view,
                rank,
                p_at: p_len,
                q_at: q_len,
            });
            at += len;
            if rank > 0 {
                p_len += rows * rank;
                q_len += cols * rank;
            } else {
                p_len += len;
            }
        }
        if at != x.len() {
            return Err(CompressError::LengthMismatch {
                what: "PowerSGD layers of the bucket",
                expected: x.len(),
                actual: at,
            }
            .into());
        }
        // Warm start: the previous step's Q of every layer, if the bucket's layers match.
        match ctx.warm.as_deref() {
            Some(w) if w.len() == q_len => {
                self.q.clear();
                self.q.extend_from_slice(w);
            }
            _ => {
                self.q.clear();
                self.q.resize(q_len, 0.0);
                for (i, l) in self.plan.iter().enumerate().filter(|(_, l)| l.rank > 0) {
                    let q = &mut self.q[l.q_at..l.q_at + l.view.cols * l.rank];
                    init_q_in(
                        q,
                        l.view.cols,
                        l.rank,
                        rng::combine(ctx.shared_seed, i as u64),
                    );
                }
            }
        }
        self.p.clear();
        self.p.resize(p_len, 0.0);
        for l in &self.plan {
            let m = &x[l.at..l.at + l.view.len];
            if l.rank > 0 {
                let p = &mut self.p[l.p_at..l.p_at + l.view.rows * l.rank];
                let q = &self.q[l.q_at..l.q_at + l.view.cols * l.rank];
                m_times_q(m, l.view, l.rank, q, p);
            } else {
                self.p[l.p_at..l.p_at + l.view.len].copy_from_slice(m);
            }
        }
        avg_as(avg, &mut self.p)?;
        for l in self.plan.iter().filter(|l| l.rank > 0) {
            let p = &mut self.p[l.p_at..l.p_at + l.view.rows * l.rank];
            orthogonalize(p, l.view.rows, l.rank);
            let q = &mut self.q[l.q_at..l.q_at + l.view.cols * l.rank];
            mt_times_p(&x[l.at..l.at + l.view.len], l.view, l.rank, p, q);
        }
        avg_as(avg, &mut self.q)?;
        self.store_q(ctx);
        let mut residual = residual;
        for l in &self.plan {
            let out = &mut x[l.at..l.at + l.view.len];
            if l.rank > 0 {
                let p = &self.p[l.p_at..l.p_at + l.view.rows * l.rank];
                let q = &self.q[l.q_at..l.q_at + l.view.cols * l.rank];
                p_times_qt::<OpSet>(p, q, l.view, l.rank, out);
            } else {
                out.copy_from_slice(&self.p[l.p_at..l.p_at + l.view.len]);
            }
            if let Some(res) = residual.as_deref_mut() {
                let res = &mut res[l.at..l.at + l.view.len];
                if l.rank > 0 {
                    // residual (= x on entry) minus the decompressed average.
                    res.iter_mut().zip(out.iter()).for_each(|(e, &s)| *e -= s);
                } else {
                    res.fill(0.0);
                }
            }
        }
        let bytes = 4 * (self.p.len() + self.q.len());
        Ok(ReduceInfo {
            payload_bytes: bytes,
            reduced_bytes: bytes,
            skipped: q_len == 0,
        })
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
    fn aggregation(&self) -> Aggregation {
        Aggregation::AllReduce
    }
    fn compress_into(
        &mut self,
        x: &[f32],
        ctx: &mut Ctx<'_>,
        out: &mut Payload,
    ) -> Result<(), CompressError> {
        if ctx.layers.is_some_and(|l| l.len() > 1) {
            // One payload holds one matrix; the per-layer protocol exists only as the
            // all-reduce (`reduce`), which is how `sync` runs PowerSGD.
            return Err(CompressError::InvalidParam {
                method: "powersgd",
                what: "a payload holds one matrix: per-layer PowerSGD runs through `reduce`".into(),
            });
        }
        let v = View::new(x.len(), ctx.shape)?;
        if !v.worth_compressing(self.rank, self.min_rate) {
            write_identity(x, out);
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
        if let Some(layers) = ctx.layers.filter(|l| l.len() > 1) {
            return self.reduce_layers(x, residual, ctx, layers, avg);
        }
        let n = x.len();
        let v = View::new(n, ctx.layers.and_then(|l| l.first().copied()).or(ctx.shape))?;
        if !v.worth_compressing(self.rank, self.min_rate) {
            if let Some(r) = residual {
                r.fill(0.0);
            }
            avg_as(avg, x)?;
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
        avg_as(avg, &mut self.p)?;
        orthogonalize(&mut self.p, v.rows, r);
        mt_times_p(x, v, r, &self.p, &mut self.q);
        avg_as(avg, &mut self.q)?;
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
