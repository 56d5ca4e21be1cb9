//! Exact GELU (`x · Φ(x)`, the erf form, PyTorch's `nn.GELU()` default) as one autodiff op on
//! the Flex backend, whose forward and backward are loops the compiler vectorises.
//!
//! Flex computes GELU through libm's scalar `erff`, in forward and again (with a scalar
//! `expf`) in backward: 12 % of a `small` training step in `perf`. Here erf is Abramowitz &
//! Stegun 7.1.26 (absolute error ≤ 1.5e-7) over [`crate::kernels::fast_exp`], and the backward
//! shares one exponential between `Φ(x)` and the density. Other backends, and a Flex tensor
//! under an autodiff strategy other than burn's default, take burn's own `gelu`
//! ([`crate::flex_op`] registers the op).

use burn::tensor::Tensor;

/// GELU of `x`: the fused Flex op where `x` lives on Flex, burn's `gelu` elsewhere.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if let Some(y) = flex::gelu(&x) {
        return y;
    }
    burn::tensor::activation::gelu(x)
}

/// `Φ(x)` and the standard normal density `φ(x)`, from one exponential.
#[inline(always)]
fn cdf_and_density(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    // 1 / sqrt(2π)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    // Abramowitz & Stegun 7.1.26: erf(z) = 1 - t·P(t)·e^(-z²), t = 1 / (1 + p·z), z ≥ 0.
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let z = (x * FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    // e^(-z²) = e^(-x²/2): the density's exponential too.
    let e = crate::kernels::fast_exp(-z * z);
    let erf = (1.0 - poly * e).copysign(x);
    (0.5 * (1.0 + erf), INV_SQRT_2PI * e)
}

/// `gelu(x)` element by element.
pub fn gelu_into(out: &mut [f32], x: &[f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = x * cdf_and_density(x).0;
    }
}

/// `grad · gelu'(x)` element by element: `gelu'(x) = Φ(x) + x·φ(x)`.
pub fn gelu_backward_into(out: &mut [f32], x: &[f32], grad: &[f32]) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
        let (cdf, density) = cdf_and_density(x);
        *o = g * (cdf + x * density);
    }
}

#[cfg(feature = "flex")]
mod flex {
    //! The op on Flex tensors, registered with burn's autodiff by [`crate::flex_op`].

    use burn::tensor::Tensor;
    use rayon::prelude::*;

    use crate::flex_op::{apply_unary, FlexUnary, Keep, PAR_CHUNK};

    #[derive(Debug)]
    struct Gelu;

    impl FlexUnary for Gelu {
        const NAME: &'static str = "gelu";
        /// The derivative is a function of `x`.
        const KEEP: Keep = Keep::Input;

        fn forward(&self, out: &mut [f32], x: &[f32]) {
            out.par_chunks_mut(PAR_CHUNK)
                .zip(x.par_chunks(PAR_CHUNK))
                .for_each(|(o, x)| super::gelu_into(o, x));
        }

        fn backward(&self, out: &mut [f32], x: &[f32], grad: &[f32]) {
            out.par_chunks_mut(PAR_CHUNK)
                .zip(x.par_chunks(PAR_CHUNK).zip(grad.par_chunks(PAR_CHUNK)))
                .for_each(|(o, (x, g))| super::gelu_backward_into(o, x, g));
        }
    }

    pub(super) fn gelu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
        apply_unary(Gelu, x)
    }
}
