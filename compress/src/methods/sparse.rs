//! Sparsifiers: exact top-k, DGC's sampled-threshold top-k, threshold, and random-k.

use super::api::{avg_as, warmed_ratio, Aggregation, AvgReduce, Compressor, Ctx, ReduceInfo};
use super::config::MethodConfig;
use crate::error::{CompressError, SyncError};
use crate::rng;
use crate::wire::{
    gaps_len, write_gaps, DecodeScratch, Header, MethodId, Params, Payload, SparseValues,
};
use rand::Rng;

/// Magnitude as the bits of |x|: for non-negative floats the integer order is the
/// float order, and NaN sorts above infinity, so a NaN gradient is always sent (and
/// shows up downstream) rather than hidden in the residual.
#[inline(always)]
fn mag(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// Elements per block of the candidate scan.
const BLOCK: usize = 16;
/// Sample size for the top-k pre-threshold.
const SAMPLE: usize = 16_384;

/// Appends the indices of all elements with `mag >= t`, in index order.
///
/// Blocks of 16 are first tested with a branch-free count (vectorises); only blocks
/// with a hit are walked, so a 1% selection costs little more than one read pass.
fn collect_at_least(x: &[f32], t: u32, out: &mut Vec<u32>) {
    out.clear();
    // Magnitudes are < 2^31, so a signed compare is exact and SSE2 has it.
    let ti = t as i32;
    let mut base = 0usize;
    for block in x.chunks(BLOCK) {
        let hits: u32 = block.iter().map(|&v| (mag(v) as i32 >= ti) as u32).sum();
        if hits != 0 {
            for (j, &v) in block.iter().enumerate() {
                if mag(v) as i32 >= ti {
                    out.push((base + j) as u32);
                }
            }
        }
        base += block.len();
    }
}

/// The magnitude threshold that `rank` sampled elements reach (rank 1 = largest).
fn sampled_threshold(x: &[f32], samples: usize, rank: usize, seed: u64, buf: &mut Vec<u32>) -> u32 {
    let n = x.len();
    let mut g = rng::stream(seed);
    buf.clear();
    buf.extend((0..samples).map(|_| mag(x[g.random_range(0..n)])));
    let pos = samples - rank.clamp(1, samples);
    *buf.select_nth_unstable(pos).1
}

/// Appends the `k` largest-magnitude candidates of `x` (ties broken towards lower
/// index), in index order: their indices plus `base` and their values.
fn keep_top(
    x: &[f32],
    cand: &[u32],
    k: usize,
    base: u32,
    mags: &mut Vec<u32>,
    idx: &mut Vec<u32>,
    vals: &mut Vec<f32>,
) {
    if k == 0 {
        return;
    }
    mags.clear();
    mags.extend(cand.iter().map(|&i| mag(x[i as usize])));
    let pos = mags.len() - k;
    let kth = *mags.select_nth_unstable(pos).1;
    // After the partition, everything above `pos` is >= kth: count the strict ones to
    // know how many ties at kth still fit.
    let above = mags[pos + 1..].iter().filter(|&&m| m > kth).count();
    let mut ties = k - above;
    idx.reserve(k);
    vals.reserve(k);
    for &i in cand {
        let v = x[i as usize];
        let m = mag(v);
        if m > kth || (m == kth && ties > 0) {
            if m == kth {
                ties -= 1;
            }
            idx.push(base + i);
            vals.push(v);
        }
    }
}

/// Appends every element of `x`, its index plus `base`.
fn keep_all(x: &[f32], base: u32, idx: &mut Vec<u32>, vals: &mut Vec<f32>) {
    idx.extend(base..base + x.len() as u32);
    vals.extend_from_slice(x);
}

/// Top-k, DGC top-k and threshold: all send (index, value) pairs.
#[derive(Debug)]
pub struct Sparsifier {
    config: MethodConfig,
    cand: Vec<u32>,
    mags: Vec<u32>,
    idx: Vec<u32>,
    vals: Vec<f32>,
    /// The tensor divided by its selection scale, when selection is normalized.
    scaled: Vec<f32>,
    scratch: DecodeScratch,
}

impl Sparsifier {
    pub(crate) fn new(config: MethodConfig) -> Self {
        Self {
            config,
            cand: Vec::new(),
            mags: Vec::new(),
            idx: Vec::new(),
            vals: Vec::new(),
            scaled: Vec::new(),
            scratch: DecodeScratch::default(),
        }
    }

    /// Indices (sorted) and values this method keeps for `x`, at `warmup`'s point of the
    /// sparsity warm-up (see [`warmed_ratio`]). Given the `layers` of a bucket every layer
    /// keeps its own share (`ratio` of its elements, or those above the threshold), as DGC
    /// selects layer by layer; without, one selection over the bucket favours the layers
    /// with large gradients.
    pub(crate) fn select(
        &mut self,
        x: &[f32],
        layers: Option<&[(usize, usize)]>,
        seed: u64,
        warmup: Option<f64>,
    ) -> (&[u32], &[f32]) {
        self.idx.clear();
        self.vals.clear();
        match layers.filter(|l| l.len() > 1) {
            Some(layers) => {
                let mut base = 0usize;
                for (i, &(rows, cols)) in layers.iter().enumerate() {
                    let len = rows * cols;
                    let seed = rng::combine(seed, i as u64);
                    self.select_segment(&x[base..base + len], base as u32, seed, warmup);
                    base += len;
                }
            }
            None => self.select_segment(x, 0, seed, warmup),
        }
        (&self.idx, &self.vals)
    }

    /// Appends what the method keeps of `x`, a segment starting at `base` of the tensor.
    fn select_segment(&mut self, x: &[f32], base: u32, seed: u64, warmup: Option<f64>) {
        let n = x.len();
        match self.config {
            MethodConfig::TopK { ratio } => {
                self.exact_topk(x, k_for(warmed_ratio(ratio, warmup), n), base, seed)
            }
            MethodConfig::DgcTopK {
                ratio,
                sample_ratio,
            } => self.dgc(
                x,
                k_for(warmed_ratio(ratio, warmup), n),
                sample_ratio,
                base,
                seed,
            ),
            MethodConfig::Threshold { threshold } => {
                // |x| > threshold  <=>  mag >= bits(threshold) + 1 for finite threshold >= 0.
                collect_at_least(x, mag(threshold) + 1, &mut self.cand);
                self.idx.extend(self.cand.iter().map(|&i| base + i));
                self.vals.extend(self.cand.iter().map(|&i| x[i as usize]));
            }
            _ => unreachable!("Sparsifier is built only for top-k, DGC and threshold"),
        }
    }

    /// Exact top-k: a sampled threshold that with overwhelming probability lets through
    /// a little more than k elements, one scan for the candidates, then selection
    /// (`select_nth_unstable`) among them. If the sample guessed too high the
    /// threshold is lowered and, at worst, every element is a candidate: the result
    /// is exact in every case, only the speed depends on the sample.
    fn exact_topk(&mut self, x: &[f32], k: usize, base: u32, seed: u64) {
        let n = x.len();
        if k == n {
            keep_all(x, base, &mut self.idx, &mut self.vals);
            return;
        }
        let mut t = 0u32;
        if n >= 8 * SAMPLE && k * 8 <= n {
            let q = k as f64 / n as f64;
            let expect = q * SAMPLE as f64;
            // Aim 25% plus four standard deviations above the expected count.
            let rank = (expect * 1.25 + 4.0 * expect.sqrt() + 2.0).ceil() as usize;
            if rank < SAMPLE {
                t = sampled_threshold(x, SAMPLE, rank, seed, &mut self.mags);
            }
        }
        let mut retries = 0;
        loop {
            collect_at_least(x, t, &mut self.cand);
            if self.cand.len() >= k || t == 0 {
                break;
            }
            // Too few (an unlucky sample): halve the magnitude threshold (one exponent
            // step) once or twice, then take every element as a candidate.
            retries += 1;
            t = if retries <= 2 && t > (1 << 23) {
                t - (1 << 23)
            } else {
                0
            };
        }
        keep_top(
            x,
            &self.cand,
            k,
            base,
            &mut self.mags,
            &mut self.idx,
            &mut self.vals,
        );
    }

    /// DGC: threshold from a sample of `sample_ratio * n` magnitudes, keep everything
    /// above it; if the estimate lets through more than 2k, exact top-k among those.
    fn dgc(&mut self, x: &[f32], k: usize, sample_ratio: f64, base: u32, seed: u64) {
        let n = x.len();
        if k == n {
            keep_all(x, base, &mut self.idx, &mut self.vals);
            return;
        }
        let samples = ((sample_ratio * n as f64).ceil() as usize).clamp(1, n);
        let rank = ((k as f64 / n as f64) * samples as f64).round().max(1.0) as usize;
        let t = sampled_threshold(x, samples, rank, seed, &mut self.mags);
        collect_at_least(x, t, &mut self.cand);
        if self.cand.len() > 2 * k {
            keep_top(
                x,
                &self.cand,
                k,
                base,
                &mut self.mags,
                &mut self.idx,
                &mut self.vals,
            );
        } else {
            self.idx.extend(self.cand.iter().map(|&i| base + i));
            self.vals.extend(self.cand.iter().map(|&i| x[i as usize]));
        }
    }
}

/// Writes a sparse payload: the indices (strictly increasing) as varint gaps, then the
/// values.
pub(crate) fn write_sparse(
    method: MethodId,
    n: usize,
    idx: &[u32],
    vals: &[f32],
    values: SparseValues,
    out: &mut Payload,
) {
    let buf = out.buf_mut();
    buf.clear();
    let index_bytes = gaps_len(idx);
    let header = Header {
        method,
        len: n as u64,
        params: Params::Sparse {
            k: idx.len() as u64,
            index_bytes: index_bytes as u64,
            values,
        },
    };
    buf.reserve(header.prefix_len() + index_bytes + values.bytes() * vals.len());
    header.write(buf);
    write_gaps(idx, buf);
    match values {
        SparseValues::F32 => buf.extend_from_slice(bytemuck::cast_slice(vals)),
        SparseValues::Bf16 => {
            for &v in vals {
                buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        }
    }
}

impl Compressor for Sparsifier {
    fn method(&self) -> MethodId {
        self.config.method()
    }
    fn config(&self) -> &MethodConfig {
        &self.config
    }
    fn aggregation(&self) -> Aggregation {
        Aggregation::GatherThenSum
    }
    fn compress_into(
        &mut self,
        x: &[f32],
        ctx: &mut Ctx<'_>,
        out: &mut Payload,
    ) -> Result<(), CompressError> {
        let method = self.method();
        check_u32_len(method, x.len())?;
        let layers = ctx.layers.filter(|_| ctx.layerwise_selection);
        match ctx.selection_scale {
            None => {
                self.select(x, layers, ctx.local_seed, ctx.warmup);
            }
            Some(scale) => {
                if scale.len() != x.len() {
                    return Err(CompressError::LengthMismatch {
                        what: "selection scale",
                        expected: x.len(),
                        actual: scale.len(),
                    });
                }
                // Rank by the scaled tensor, send the tensor's own values.
                let mut scaled = std::mem::take(&mut self.scaled);
                scaled.clear();
                scaled.extend(
                    x.iter()
                        .zip(scale)
                        .map(|(&v, &s)| v / (s + f32::MIN_POSITIVE).sqrt()),
                );
                self.select(&scaled, layers, ctx.local_seed, ctx.warmup);
                self.scaled = scaled;
                self.vals.clear();
                self.vals.extend(self.idx.iter().map(|&i| x[i as usize]));
            }
        }
        let values = if ctx.bf16_values {
            SparseValues::Bf16
        } else {
            SparseValues::F32
        };
        write_sparse(method, x.len(), &self.idx, &self.vals, values, out);
        Ok(())
    }
    fn scratch(&mut self) -> &mut DecodeScratch {
        &mut self.scratch
    }
}

/// Random-k: the same k indices on every rank (drawn from the shared seed), so the
/// kept values can be all-reduced as a dense k-vector.
#[derive(Debug)]
pub struct RandK {
    config: MethodConfig,
    ratio: f64,
    unbiased: bool,
    vals: Vec<f32>,
    scratch: DecodeScratch,
}

impl RandK {
    pub(crate) fn new(ratio: f64, unbiased: bool) -> Self {
        Self {
            config: MethodConfig::RandK { ratio, unbiased },
            ratio,
            unbiased,
            vals: Vec::new(),
            scratch: DecodeScratch::default(),
        }
    }

    /// Draws the index set into the scratch and gathers the (scaled) values.
    fn gather(&mut self, x: &[f32], ctx: &Ctx<'_>) -> Result<(), CompressError> {
        let (n, seed) = (x.len(), ctx.shared_seed);
        check_u32_len(MethodId::RandK, n)?;
        let k = k_for(warmed_ratio(self.ratio, ctx.warmup), n);
        rng::randk_indices(n, k, seed, &mut self.scratch.bits, &mut self.scratch.idx);
        let scale = if self.unbiased && k > 0 {
            (n as f64 / k as f64) as f32
        } else {
            1.0
        };
        self.vals.clear();
        self.vals
            .extend(self.scratch.idx.iter().map(|&i| x[i as usize] * scale));
        Ok(())
    }
}

impl Compressor for RandK {
    fn method(&self) -> MethodId {
        MethodId::RandK
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
        self.gather(x, ctx)?;
        let buf = out.buf_mut();
        buf.clear();
        let header = Header {
            method: MethodId::RandK,
            len: x.len() as u64,
            params: Params::RandK {
                k: self.vals.len() as u64,
                seed: ctx.shared_seed,
            },
        };
        buf.reserve(header.prefix_len() + 4 * self.vals.len());
        header.write(buf);
        buf.extend_from_slice(bytemuck::cast_slice(&self.vals));
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
        self.gather(x, ctx)?;
        if let Some(r) = residual {
            // r holds x on entry (see the trait): subtract what is sent.
            for (&i, &v) in self.scratch.idx.iter().zip(&self.vals) {
                r[i as usize] -= v;
            }
        }
        avg_as(avg, &mut self.vals)?;
        x.fill(0.0);
        for (&i, &v) in self.scratch.idx.iter().zip(&self.vals) {
            x[i as usize] = v;
        }
        let bytes = 4 * self.vals.len();
        Ok(ReduceInfo {
            payload_bytes: bytes,
            reduced_bytes: bytes,
            skipped: false,
        })
    }
}

/// `k = ceil(ratio * n)`, at least 1 for a non-empty tensor, at most n.
fn k_for(ratio: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((ratio * n as f64).ceil() as usize).clamp(1, n)
}

/// Tensors indexed by u32 on the wire.
fn check_u32_len(method: MethodId, n: usize) -> Result<(), CompressError> {
    if n > u32::MAX as usize + 1 {
        Err(CompressError::TooLarge {
            method: method.name(),
            what: format!("{n} elements exceed the u32 index range"),
        })
    } else {
        Ok(())
    }
}
