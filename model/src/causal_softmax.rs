//! The attention's scale, causal mask and softmax as one op: `softmax(scale · scores)` over
//! each row's keys up to its own position (later keys get probability zero).
//!
//! burn composes this as a scalar multiply, a mask fill with a broadcast mask, and a softmax
//! of five passes (max, subtract, exp with libm's scalar `expf`, sum, divide), each a tensor
//! and an autodiff node; on Flex it is one pass forward (with [`crate::kernels::fast_exp`])
//! and one backward, `dx = scale · y · (g − Σ g·y)`, from the kept probabilities.

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor};

/// `softmax(scale · scores)` with key `j > i` of query row `i` masked, over the last
/// dimension of `[batch, heads, seq, seq]` scores.
pub fn causal_softmax(scores: Tensor<4>, scale: f64) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(y) = flex::causal_softmax(&scores, scale) {
        return y;
    }
    let [b, h, s, _] = scores.dims();
    let future: Tensor<2, Bool> = Tensor::tril_mask([s, s], 0, &scores.device());
    let scores = (scores * scale).mask_fill(
        future.unsqueeze::<4>().expand([b, h, s, s]),
        f32::NEG_INFINITY,
    );
    softmax(scores, 3)
}

/// Rows of `seq` values; row `r` is query `r % seq`, which sees keys `0..=r % seq`.
pub fn causal_softmax_into(out: &mut [f32], x: &[f32], seq: usize, scale: f32) {
    for (r, (o, x)) in out.chunks_mut(seq).zip(x.chunks(seq)).enumerate() {
        let seen = r % seq + 1;
        let (o_seen, o_future) = o.split_at_mut(seen);
        let max = x[..seen]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
        for (o, &v) in o_seen.iter_mut().zip(&x[..seen]) {
            *o = crate::kernels::fast_exp(v * scale - max);
        }
        let inv = 1.0 / o_seen.iter().sum::<f32>();
        for o in o_seen.iter_mut() {
            *o *= inv;
        }
        o_future.fill(0.0);
    }
}

/// The gradient of the scores from the probabilities `y` and their gradient `g`, rows of
/// `seq`: `scale · y · (g − Σ g·y)` (zero where `y` is, the masked keys).
pub fn causal_softmax_backward_into(out: &mut [f32], y: &[f32], g: &[f32], seq: usize, scale: f32) {
    for ((o, y), g) in out.chunks_mut(seq).zip(y.chunks(seq)).zip(g.chunks(seq)) {
        let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
            *o = scale * y * (g - dot);
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    //! The op on Flex tensors, registered with burn's autodiff by [`crate::flex_op`].

    use burn::tensor::Tensor;
    use rayon::prelude::*;

    use crate::flex_op::{apply_unary, FlexUnary, Keep, PAR_CHUNK};

    #[derive(Debug)]
    struct CausalSoftmax {
        seq: usize,
        scale: f32,
    }

    impl CausalSoftmax {
        /// Whole `[seq, seq]` matrices per task, so every row knows its query position.
        fn chunk(&self) -> usize {
            let per_matrix = self.seq * self.seq;
            per_matrix * (PAR_CHUNK / per_matrix).max(1)
        }
    }

    impl FlexUnary for CausalSoftmax {
        const NAME: &'static str = "causal_softmax";
        /// The gradient is a function of the probabilities.
        const KEEP: Keep = Keep::Output;

        fn forward(&self, out: &mut [f32], x: &[f32]) {
            let c = self.chunk();
            out.par_chunks_mut(c)
                .zip(x.par_chunks(c))
                .for_each(|(o, x)| super::causal_softmax_into(o, x, self.seq, self.scale));
        }

        fn backward(&self, out: &mut [f32], y: &[f32], grad: &[f32]) {
            let c = self.chunk();
            out.par_chunks_mut(c)
                .zip(y.par_chunks(c).zip(grad.par_chunks(c)))
                .for_each(|(o, (y, g))| {
                    super::causal_softmax_backward_into(o, y, g, self.seq, self.scale)
                });
        }
    }

    pub(super) fn causal_softmax(scores: &Tensor<4>, scale: f64) -> Option<Tensor<4>> {
        let [_, _, seq, keys] = scores.dims();
        if seq != keys || seq == 0 {
            return None;
        }
        let op = CausalSoftmax {
            seq,
            scale: scale as f32,
        };
        apply_unary(op, scores)
    }
}
