//! PowerSGD (Vogels et al. 2019): rank-r power iteration on the matrix view of a
//! tensor, warm-started, with Gram-Schmidt orthogonalisation; all-reduce compatible.
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
    fn aggregation(&self) -> Aggregation {
        Aggregation::AllReduce
    }
    fn compress_into(
        &mut self,
        x: &[f32],
        ctx: &mut Ctx<'_>,
        out: &mut Payload,
    ) -> Result<(), CompressError> {
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
        let n = x.len();
        let v = View::new(n, ctx.shape)?;
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
