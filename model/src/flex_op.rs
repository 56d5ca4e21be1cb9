//! The one place that reaches under burn's tensor API: an element-wise (or row-wise) host
//! kernel on Flex tensors registered as a single autodiff op, so a chain of burn ops that
//! Flex runs as several passes with scalar libm calls becomes one vectorised pass forward and
//! one backward.
//!
//! A tensor that is not on Flex, or is under an autodiff checkpointing strategy other than
//! burn's default, is not taken (`None`): the caller runs burn's composition instead.

use std::borrow::Cow;

use burn::backend::tensor::FloatTensor;
use burn::tensor::{Tensor, TensorData};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;
use burn_flex::{Flex, FlexTensor};

/// Elements per parallel task: large enough to amortise rayon, small enough to share a
/// step's activations between the cores.
pub(crate) const PAR_CHUNK: usize = 1 << 15;

/// What the backward keeps of the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    Input,
    Output,
}

/// A kernel pair over the flat row-major values of one tensor (same shape in and out).
pub(crate) trait FlexUnary: Send + Sync + std::fmt::Debug + 'static {
    /// The op's name, for messages.
    const NAME: &'static str;
    /// What `backward` reads besides the gradient.
    const KEEP: Keep;
    /// `out = f(x)`.
    fn forward(&self, out: &mut [f32], x: &[f32]);
    /// `out = grad · f'(…)`, from the kept input or output.
    fn backward(&self, out: &mut [f32], kept: &[f32], grad: &[f32]);
}

/// `op` applied to `x`: tracked by autodiff when `x` is, or `None` when `x` is not an f32
/// Flex tensor under the default strategy.
pub(crate) fn apply_unary<U: FlexUnary, const D: usize>(op: U, x: &Tensor<D>) -> Option<Tensor<D>> {
    if x.is_autodiff() {
        let t = x.clone().try_into_primitive::<Autodiff<Flex>>().ok()?;
        Some(Tensor::from_primitive::<Autodiff<Flex>>(tracked(op, t)?))
    } else {
        let t = x.clone().try_into_primitive::<Flex>().ok()?;
        Some(Tensor::from_primitive::<Flex>(forward(&op, &t)?))
    }
}

fn f32_values(t: &FlexTensor) -> Option<Cow<'_, [f32]>> {
    match t.as_slice::<f32>() {
        Some(s) => Some(Cow::Borrowed(s)),
        None => t
            .to_contiguous()
            .as_slice::<f32>()
            .map(|s| s.to_vec().into()),
    }
}

fn with_shape_of(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, like.layout().shape().clone()))
}

fn forward<U: FlexUnary>(op: &U, x: &FlexTensor) -> Option<FlexTensor> {
    let values = f32_values(x)?;
    let mut out = vec![0.0f32; values.len()];
    op.forward(&mut out, &values);
    Some(with_shape_of(out, x))
}

#[derive(Debug)]
struct Op<U>(U);

impl<U: FlexUnary> Backward<Flex, 1> for Op<U> {
    /// The kept input or output (f32, as `forward` accepted it).
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let kept = ops.state;
        let op = self.0;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            // Both are f32 Flex tensors: `forward` accepted the kept one, and burn's gradient
            // of an f32 output is f32.
            let (Some(k), Some(g)) = (f32_values(&kept), f32_values(&grad)) else {
                unreachable!("{}: non-f32 tensors reached the backward", U::NAME)
            };
            let mut out = vec![0.0f32; k.len()];
            op.backward(&mut out, &k, &g);
            with_shape_of(out, &kept)
        });
    }
}

fn tracked<U: FlexUnary>(
    op: U,
    x: FloatTensor<Autodiff<Flex>>,
) -> Option<FloatTensor<Autodiff<Flex>>> {
    let y = forward(&op, x.primitive())?;
    let kept = match U::KEEP {
        Keep::Input => x.primitive().clone(),
        Keep::Output => y.clone(),
    };
    Some(
        match Op(op)
            .prepare::<NoCheckpointing>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(kept, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    )
}
