//! The pieces of a block's two branches (attention, MLP) as the segment cuts them: the
//! branch functions, and what a forward keeps of a branch for backward with or without
//! recomputation and sequence parallelism.

use burn::tensor::Tensor;
use meshrec_model::model::Block;

/// A branch's forward as the model defines it: attention (site 0) or MLP (site 1).
pub(crate) fn branch(block: &Block, site: u64, x: Tensor<3>) -> Tensor<3> {
    if site == 0 {
        block.attention_branch(x)
    } else {
        block.mlp_branch(x)
    }
}

/// What a branch's forward produced before the residual dropout mask.
#[allow(clippy::large_enum_variant)]
pub(crate) enum BranchPiece {
    Kept {
        leaf: Tensor<3>,
        partial: Tensor<3>,
    },
    Recomputed {
        input: Tensor<3>,
    },
    Selective {
        leaf: Tensor<3>,
        qkv: [Tensor<4>; 3],
        context: Tensor<3>,
        partial: Tensor<3>,
    },
}

/// A branch under sequence parallelism: the norm runs on this rank's sequence rows
/// (`leaf` -> `normed`), the rows are all-gathered into `gathered` (a leaf), the rest of the
/// branch runs over the whole sequence (`gathered` -> `partial`, partial over TP) and is
/// reduce-scattered back; under recomputation less of it is kept.
#[allow(clippy::large_enum_variant)]
pub(crate) enum SeqPiece {
    Kept {
        leaf: Tensor<3>,
        normed: Tensor<3>,
        gathered: Tensor<3>,
        partial: Tensor<3>,
    },
    /// Full recomputation: the branch's input rows only; backward norms, gathers and runs
    /// the branch again.
    Recomputed {
        input: Tensor<3>,
        block: usize,
        site: u64,
    },
    /// Selective recomputation of the attention: the projections of the gathered rows and
    /// the output projection are kept, the `seq²` core is rerun in backward.
    Selective {
        leaf: Tensor<3>,
        normed: Tensor<3>,
        gathered: Tensor<3>,
        qkv: [Tensor<4>; 3],
        context: Tensor<3>,
        partial: Tensor<3>,
        block: usize,
    },
}

/// A branch's norm: attention's (site 0) or the MLP's (site 1).
pub(crate) fn branch_norm(block: &Block, site: u64, x: Tensor<3>) -> Tensor<3> {
    if site == 0 {
        block.attn_norm.forward(x)
    } else {
        block.mlp_norm.forward(x)
    }
}

/// A branch after its norm: attention (site 0) or the MLP (site 1).
pub(crate) fn branch_body(block: &Block, site: u64, x: Tensor<3>) -> Tensor<3> {
    if site == 0 {
        block.attn.forward(x)
    } else {
        block.mlp.forward(x)
    }
}

/// Selective recomputation's forward of an attention branch from its normalised input:
/// the q, k, v projections (kept, graph and all), the `seq²` core on detached copies of
/// them (nothing of it kept), and the output projection from the core's output as a fresh
/// leaf. Returns `(qkv, context, partial)`.
pub(crate) fn selective_attention(
    block: &Block,
    normed: Tensor<3>,
) -> ([Tensor<4>; 3], Tensor<3>, Tensor<3>) {
    let qkv = block.attn.project(normed);
    let [q, k, v] = qkv.clone().map(|t| t.detach());
    let context = block.attn.core(q, k, v).require_grad();
    let partial = block.attn.wo.forward(context.clone());
    (qkv, context, partial)
}

/// The upstream gradient through the residual dropout mask, if any.
pub(crate) fn masked(g: &Tensor<3>, mask: Option<Tensor<3>>) -> Tensor<3> {
    match mask {
        Some(m) => g.clone() * m,
        None => g.clone(),
    }
}
