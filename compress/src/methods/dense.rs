//! Dense methods: identity (f32) and the fp16 / bf16 casts.

use super::api::{avg_as, Aggregation, AvgReduce, Compressor, Ctx, ReduceInfo};
use super::config::MethodConfig;
use crate::error::{CompressError, SyncError};
use crate::wire::{DecodeScratch, Half, Header, MethodId, Params, Payload, HEADER_LEN, STAGE};
use meshrec_comm::Element;

/// Sends the gradient unchanged.
#[derive(Debug, Default)]
pub struct Identity {
    scratch: DecodeScratch,
}

impl Identity {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Writes an identity payload (also PowerSGD's fallback for tensors it skips).
pub(crate) fn write_identity(x: &[f32], out: &mut Payload) {
    let buf = out.buf_mut();
    buf.clear();
    buf.reserve(HEADER_LEN + 4 * x.len());
    Header {
        method: MethodId::Identity,
        len: x.len() as u64,
        params: Params::None,
    }
    .write(buf);
    buf.extend_from_slice(bytemuck::cast_slice(x));
}

impl Compressor for Identity {
    fn method(&self) -> MethodId {
        MethodId::Identity
    }
    fn config(&self) -> &MethodConfig {
        &MethodConfig::Identity
    }
    fn aggregation(&self) -> Aggregation {
        Aggregation::AllReduce
    }
    fn compress_into(
        &mut self,
        x: &[f32],
        _ctx: &mut Ctx<'_>,
        out: &mut Payload,
    ) -> Result<(), CompressError> {
        write_identity(x, out);
        Ok(())
    }
    fn scratch(&mut self) -> &mut DecodeScratch {
        &mut self.scratch
    }
    fn reduce(
        &mut self,
        x: &mut [f32],
        residual: Option<&mut [f32]>,
        _ctx: &mut Ctx<'_>,
        avg: &mut AvgReduce<'_>,
    ) -> Result<ReduceInfo, SyncError> {
        if let Some(r) = residual {
            r.fill(0.0);
        }
        avg_as(avg, x)?;
        Ok(ReduceInfo {
            payload_bytes: 4 * x.len(),
            reduced_bytes: 4 * x.len(),
            skipped: false,
        })
    }
}

/// Largest finite f16; casts saturate here instead of overflowing to infinity, so an
/// outlier stays finite (and error feedback carries the clipped part).
const F16_MAX: f32 = 65504.0;

/// Casts to a 16-bit float (`half::f16` or `half::bf16`).
#[derive(Debug)]
pub struct Cast<H> {
    config: MethodConfig,
    scratch: DecodeScratch,
    /// The 16-bit values the all-reduce carries (reused across calls).
    wire: Vec<H>,
}

impl<H: Half + Element> Cast<H> {
    pub(crate) fn new(config: MethodConfig) -> Self {
        Self {
            config,
            scratch: DecodeScratch::default(),
            wire: Vec::new(),
        }
    }

    fn id(&self) -> MethodId {
        self.config.method()
    }

    /// Saturation bound: f16's range, or bf16's (f32's largest finite value rounds to
    /// bf16 infinity, so clamp just below it).
    fn limit(&self) -> f32 {
        if self.id() == MethodId::Fp16 {
            F16_MAX
        } else {
            f32::from_bits(0x7F7F_0000)
        }
    }

    /// Casts one staged block: clamps into `tmp`, converts into `h`.
    #[inline]
    fn cast_block(src: &[f32], limit: f32, tmp: &mut [f32], h: &mut [H]) {
        for (t, &v) in tmp.iter_mut().zip(src) {
            // `clamp` keeps NaN as NaN: a NaN gradient must stay visible.
            *t = v.clamp(-limit, limit);
        }
        H::from_f32_slice(tmp, h);
    }
}

impl<H: Half + Element> Compressor for Cast<H> {
    fn method(&self) -> MethodId {
        self.id()
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
        _ctx: &mut Ctx<'_>,
        out: &mut Payload,
    ) -> Result<(), CompressError> {
        let buf = out.buf_mut();
        buf.clear();
        let header = Header {
            method: self.id(),
            len: x.len() as u64,
            params: Params::None,
        };
        header.write(buf);
        let body_at = buf.len();
        buf.resize(body_at + 2 * x.len(), 0);
        let limit = self.limit();
        let mut tmp = [0f32; STAGE];
        let mut h = [H::default(); STAGE];
        for (src, dst) in x.chunks(STAGE).zip(buf[body_at..].chunks_mut(2 * STAGE)) {
            let n = src.len();
            Self::cast_block(src, limit, &mut tmp[..n], &mut h[..n]);
            dst.copy_from_slice(bytemuck::cast_slice(&h[..n]));
        }
        Ok(())
    }
    fn scratch(&mut self) -> &mut DecodeScratch {
        &mut self.scratch
    }
    fn reduce(
        &mut self,
        x: &mut [f32],
        mut residual: Option<&mut [f32]>,
        _ctx: &mut Ctx<'_>,
        avg: &mut AvgReduce<'_>,
    ) -> Result<ReduceInfo, SyncError> {
        let limit = self.limit();
        let mut tmp = [0f32; STAGE];
        self.wire.clear();
        self.wire.resize(x.len(), H::default());
        for (c, (block, h)) in x.chunks(STAGE).zip(self.wire.chunks_mut(STAGE)).enumerate() {
            let n = block.len();
            Self::cast_block(block, limit, &mut tmp[..n], h);
            if let Some(r) = residual.as_deref_mut() {
                H::to_f32_slice(h, &mut tmp[..n]);
                let r = &mut r[c * STAGE..c * STAGE + n];
                for ((r, &v), &s) in r.iter_mut().zip(block).zip(&tmp[..n]) {
                    *r = v - s;
                }
            }
        }
        // Reduced in the 16-bit type, rounding once per hop as NCCL reduces halves: 2 bytes
        // per element on the wire. The rounding of the sum is not fed back (only the cast's
        // own error is): it is shared by all ranks and below the cast's.
        avg_as(avg, &mut self.wire)?;
        for (dst, h) in x.chunks_mut(STAGE).zip(self.wire.chunks(STAGE)) {
            H::to_f32_slice(h, dst);
        }
        Ok(ReduceInfo {
            payload_bytes: 2 * x.len(),
            reduced_bytes: 2 * x.len(),
            skipped: false,
        })
    }
}
