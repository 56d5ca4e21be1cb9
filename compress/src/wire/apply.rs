//! How decoded values combine with the caller's buffer, and the scratch the decoders
//! reuse; shared by every body decoder and by PowerSGD's reconstruction.

/// How decoded values are combined with the output buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// `out = decoded` (positions a sparse payload does not name become 0).
    Set,
    /// `out += decoded`.
    Add,
    /// `out -= decoded` (used to turn the compensated gradient into the residual).
    Sub,
}

/// The element-wise combination, monomorphised so the inner loops stay branch-free.
pub(crate) trait Op {
    const SET: bool;
    /// Factor on the decoded value when folded into a product (PowerSGD's GEMM).
    const SIGN: f32;
    fn apply(dst: &mut f32, v: f32);
}
pub(crate) struct OpSet;
pub(crate) struct OpAdd;
pub(crate) struct OpSub;
impl Op for OpSet {
    const SET: bool = true;
    const SIGN: f32 = 1.0;
    #[inline(always)]
    fn apply(dst: &mut f32, v: f32) {
        *dst = v;
    }
}
impl Op for OpAdd {
    const SET: bool = false;
    const SIGN: f32 = 1.0;
    #[inline(always)]
    fn apply(dst: &mut f32, v: f32) {
        *dst += v;
    }
}
impl Op for OpSub {
    const SET: bool = false;
    const SIGN: f32 = -1.0;
    #[inline(always)]
    fn apply(dst: &mut f32, v: f32) {
        *dst -= v;
    }
}

/// Reusable buffers for decoding (sparse and random-k indices, PowerSGD factors).
#[derive(Debug, Default, Clone)]
pub struct DecodeScratch {
    pub(crate) bits: Vec<u64>,
    pub(crate) idx: Vec<u32>,
    pub(crate) p: Vec<f32>,
    pub(crate) q: Vec<f32>,
}

impl DecodeScratch {
    /// The indices of the last sparse (top-k, DGC, threshold) or random-k payload
    /// decoded successfully with this scratch, in the payload's order.
    pub fn indices(&self) -> &[u32] {
        &self.idx
    }
}
