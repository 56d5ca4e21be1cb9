//! `ReduceOp`: the element-wise operation of a reduction (a leaf: every engine and the
//! kernels name it, it names nothing).

/// Element-wise reduction of a collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ReduceOp {
    /// Sum over ranks.
    Sum,
    /// Mean over ranks (sum, then divided by the group size once). Floating-point element
    /// types only: typed reductions refuse it on integers (see `DType::supports`).
    Avg,
    /// Maximum over ranks.
    Max,
    /// Minimum over ranks.
    Min,
}
