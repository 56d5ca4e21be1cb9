//! Exact GELU (`x · Φ(x)`, the erf form, PyTorch's `nn.GELU()` default) as one autodiff op on
//! the Flex backend, whose forward and backward are loops the compiler vectorises.
//!
//! Flex computes GELU through libm's scalar `erff`, in forward and again (with a scalar
//! `expf`) in backward: 12 % of a `small` training step in `perf`. Here erf is Abramowitz &
//! Stegun 7.1.26 (absolute error ≤ 1.5e-7) over [`crate::kernels::fast_exp`], and the backward
//! shares one exponential between `Φ(x)` and the density. Other backends, and a Flex tensor
//! under an autodiff strategy other than burn's default, take burn's own `gelu`.

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
    //! The op on Flex tensors and its registration with burn's autodiff.

    use burn::backend::ops::ActivationOps;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::{Tensor, TensorData};
    use burn_autodiff::checkpoint::base::Checkpointer;
    use burn_autodiff::checkpoint::strategy::NoCheckpointing;
    use burn_autodiff::grads::Gradients;
    use burn_autodiff::ops::{unary, Backward, Ops, OpsKind};
    use burn_autodiff::Autodiff;
    use burn_flex::{Flex, FlexTensor};
    use rayon::prelude::*;

    /// Elements per parallel task: large enough to amortise rayon, small enough to share
    /// a step's activations between the cores.
    const CHUNK: usize = 1 << 15;

    /// The fused op, or `None` when `x` is not a float Flex tensor this op handles.
    pub(super) fn gelu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
        if x.is_autodiff() {
            let t = x.clone().try_into_primitive::<Autodiff<Flex>>().ok()?;
            Some(Tensor::from_primitive::<Autodiff<Flex>>(tracked(t)?))
        } else {
            let t = x.clone().try_into_primitive::<Flex>().ok()?;
            Some(Tensor::from_primitive::<Flex>(forward(&t)?))
        }
    }

    fn f32_values(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
        match t.as_slice::<f32>() {
            Some(s) => Some(std::borrow::Cow::Borrowed(s)),
            None => {
                let dense = t.to_contiguous();
                dense.as_slice::<f32>().map(|s| s.to_vec().into())
            }
        }
    }

    fn with_shape_of(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
        let shape = like.layout().shape().clone();
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    fn forward(x: &FlexTensor) -> Option<FlexTensor> {
        let values = f32_values(x)?;
        let mut out = vec![0.0f32; values.len()];
        out.par_chunks_mut(CHUNK)
            .zip(values.par_chunks(CHUNK))
            .for_each(|(o, x)| super::gelu_into(o, x));
        Some(with_shape_of(out, x))
    }

    fn backward(x: &FlexTensor, grad: FlexTensor) -> FlexTensor {
        let (Some(values), Some(g)) = (f32_values(x), f32_values(&grad)) else {
            // Unreachable for the f32 tensors `forward` accepted; burn's kernel as a fallback.
            return <Flex as ActivationOps<Flex>>::gelu_backward(x.clone(), grad);
        };
        let mut out = vec![0.0f32; values.len()];
        out.par_chunks_mut(CHUNK)
            .zip(values.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| super::gelu_backward_into(o, x, g));
        with_shape_of(out, x)
    }

    #[derive(Debug)]
    struct Gelu;

    impl Backward<Flex, 1> for Gelu {
        /// The input, kept for the backward.
        type State = FlexTensor;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let input = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |grad| backward(&input, grad));
        }
    }

    fn tracked(x: FloatTensor<Autodiff<Flex>>) -> Option<FloatTensor<Autodiff<Flex>>> {
        let y = forward(x.primitive())?;
        Some(
            match Gelu
                .prepare::<NoCheckpointing>([x.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(x.primitive().clone(), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            },
        )
    }
}
