//! The device mesh: a `dp × tp × pp` grid of ranks, rank <-> coordinate mapping, and the
//! checks of a layout against a world size and a model's dimensions.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One axis of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    Dp,
    Tp,
    Pp,
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Axis::Dp => "dp",
            Axis::Tp => "tp",
            Axis::Pp => "pp",
        })
    }
}

/// A rank's position in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Coord {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
}

impl Coord {
    pub fn get(&self, axis: Axis) -> usize {
        match axis {
            Axis::Dp => self.dp,
            Axis::Tp => self.tp,
            Axis::Pp => self.pp,
        }
    }

    pub fn set(&mut self, axis: Axis, value: usize) {
        match axis {
            Axis::Dp => self.dp = value,
            Axis::Tp => self.tp = value,
            Axis::Pp => self.pp = value,
        }
    }
}

/// The grid. `order` lists the axes from the fastest-varying (innermost) to the slowest:
/// Megatron's default `[Tp, Dp, Pp]` keeps a TP group on neighbouring ranks (one node,
/// the fastest links), since TP all-reduces sit on the critical path of every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mesh {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub order: [Axis; 3],
}

impl Mesh {
    pub const MEGATRON_ORDER: [Axis; 3] = [Axis::Tp, Axis::Dp, Axis::Pp];

    /// A mesh in Megatron's order. Every axis must be at least 1.
    pub fn new(dp: usize, tp: usize, pp: usize) -> Result<Self, MeshError> {
        Self::with_order(dp, tp, pp, Self::MEGATRON_ORDER)
    }

    pub fn with_order(
        dp: usize,
        tp: usize,
        pp: usize,
        order: [Axis; 3],
    ) -> Result<Self, MeshError> {
        for (axis, size) in [(Axis::Dp, dp), (Axis::Tp, tp), (Axis::Pp, pp)] {
            if size == 0 {
                return Err(MeshError::ZeroAxis { axis });
            }
        }
        let mut seen = order.to_vec();
        seen.sort_by_key(|a| *a as u8);
        seen.dedup();
        if seen.len() != 3 {
            return Err(MeshError::BadOrder { order });
        }
        Ok(Self { dp, tp, pp, order })
    }

    /// A single device.
    pub fn single() -> Self {
        Self {
            dp: 1,
            tp: 1,
            pp: 1,
            order: Self::MEGATRON_ORDER,
        }
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    pub fn size(&self, axis: Axis) -> usize {
        match axis {
            Axis::Dp => self.dp,
            Axis::Tp => self.tp,
            Axis::Pp => self.pp,
        }
    }

    /// The coordinates of global `rank` (which must be below [`Mesh::world_size`]).
    pub fn coord(&self, rank: usize) -> Coord {
        let mut c = Coord {
            dp: 0,
            tp: 0,
            pp: 0,
        };
        let mut rest = rank;
        for axis in self.order {
            let n = self.size(axis);
            c.set(axis, rest % n);
            rest /= n;
        }
        c
    }

    /// The global rank at `coord`.
    pub fn rank(&self, coord: Coord) -> usize {
        let mut rank = 0;
        for axis in self.order.iter().rev() {
            rank = rank * self.size(*axis) + coord.get(*axis);
        }
        rank
    }

    /// The mesh's world size must be `world_size`.
    pub fn check_world(&self, world_size: usize) -> Result<(), MeshError> {
        if self.world_size() != world_size {
            return Err(MeshError::WorldSize {
                mesh: *self,
                world_size,
            });
        }
        Ok(())
    }

    /// Checks the mesh against a model: TP must divide the heads and the MLP width (whole
    /// heads and whole columns per rank) and leave every rank some item rows, and every
    /// pipeline chunk (`pp × virtual_stages` of them) must get a block.
    pub fn check_model(&self, model: &ModelDims, virtual_stages: usize) -> Result<(), MeshError> {
        for (what, value) in [("model.n_heads", model.n_heads), ("model.d_ff", model.d_ff)] {
            if !value.is_multiple_of(self.tp) {
                return Err(MeshError::TpDivides {
                    tp: self.tp,
                    what,
                    value,
                });
            }
        }
        if model.vocab < self.tp {
            return Err(MeshError::VocabTooSmall {
                tp: self.tp,
                vocab: model.vocab,
            });
        }
        let chunks = self.pp * virtual_stages.max(1);
        if chunks > model.n_layers {
            return Err(MeshError::TooManyStages {
                pp: self.pp,
                virtual_stages,
                n_layers: model.n_layers,
            });
        }
        Ok(())
    }
}

/// What a layout must fit of a model: the sizes that tensor and pipeline parallelism cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDims {
    pub n_heads: usize,
    pub d_ff: usize,
    /// Rows of the item table (the vocabulary-parallel split).
    pub vocab: usize,
    /// Transformer blocks (the pipeline split).
    pub n_layers: usize,
}

impl fmt::Display for Coord {
    /// `dp1·tp0·pp1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp{}·tp{}·pp{}", self.dp, self.tp, self.pp)
    }
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp{}·tp{}·pp{}", self.dp, self.tp, self.pp)
    }
}

/// A layout that cannot run, naming the constraint it breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MeshError {
    #[error("mesh axis {axis} must be at least 1")]
    ZeroAxis { axis: Axis },
    #[error("mesh order {order:?} must name dp, tp and pp once each")]
    BadOrder { order: [Axis; 3] },
    #[error("mesh {mesh} needs {} ranks but the world size {world_size} differs", mesh.world_size())]
    WorldSize { mesh: Mesh, world_size: usize },
    #[error("tp {tp} must divide {what} ({value}): each tensor-parallel rank holds whole heads and equal MLP shards")]
    TpDivides {
        tp: usize,
        what: &'static str,
        value: usize,
    },
    #[error("tp {tp} exceeds the item vocabulary ({vocab} rows): every rank needs item rows")]
    VocabTooSmall { tp: usize, vocab: usize },
    #[error("pp {pp} × virtual_stages {virtual_stages} model chunks exceed model.n_layers ({n_layers}): no pipeline chunk may be empty")]
    TooManyStages {
        pp: usize,
        virtual_stages: usize,
        n_layers: usize,
    },
    #[error("partition {partition:?} must have {chunks} non-empty entries summing to n_layers {n_layers}")]
    BadPartition {
        partition: Vec<usize>,
        chunks: usize,
        n_layers: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `tiny` preset's dimensions: 4 heads, d_ff 128, 4 blocks.
    fn tiny(vocab: usize) -> ModelDims {
        ModelDims {
            n_heads: 4,
            d_ff: 128,
            vocab,
            n_layers: 4,
        }
    }

    #[test]
    fn megatron_order_puts_tp_innermost() {
        let mesh = Mesh::new(2, 2, 2).unwrap();
        assert_eq!(
            mesh.coord(0),
            Coord {
                dp: 0,
                tp: 0,
                pp: 0
            }
        );
        assert_eq!(
            mesh.coord(1),
            Coord {
                dp: 0,
                tp: 1,
                pp: 0
            }
        );
        assert_eq!(
            mesh.coord(2),
            Coord {
                dp: 1,
                tp: 0,
                pp: 0
            }
        );
        assert_eq!(
            mesh.coord(4),
            Coord {
                dp: 0,
                tp: 0,
                pp: 1
            }
        );
    }

    #[test]
    fn rank_and_coord_are_inverse_for_every_order() {
        let orders = [
            [Axis::Tp, Axis::Dp, Axis::Pp],
            [Axis::Dp, Axis::Tp, Axis::Pp],
            [Axis::Pp, Axis::Tp, Axis::Dp],
        ];
        for order in orders {
            let mesh = Mesh::with_order(3, 2, 4, order).unwrap();
            let mut seen = std::collections::HashSet::new();
            for r in 0..mesh.world_size() {
                let c = mesh.coord(r);
                assert!(c.dp < 3 && c.tp < 2 && c.pp < 4);
                assert_eq!(mesh.rank(c), r);
                assert!(seen.insert(c));
            }
        }
    }

    #[test]
    fn invalid_layouts_name_the_constraint() {
        let dims = tiny(31);
        let err = Mesh::new(1, 3, 1)
            .unwrap()
            .check_model(&dims, 1)
            .unwrap_err();
        assert_eq!(
            err,
            MeshError::TpDivides {
                tp: 3,
                what: "model.n_heads",
                value: 4
            }
        );
        assert!(err.to_string().contains("n_heads"), "{err}");
        let err = Mesh::new(2, 1, 1).unwrap().check_world(3).unwrap_err();
        assert!(err.to_string().contains("world size 3"), "{err}");
        let err = Mesh::new(1, 1, 5)
            .unwrap()
            .check_model(&dims, 1)
            .unwrap_err();
        assert!(err.to_string().contains("n_layers"), "{err}");
        let err = Mesh::new(1, 2, 3)
            .unwrap()
            .check_model(&dims, 2)
            .unwrap_err();
        assert!(matches!(
            err,
            MeshError::TooManyStages {
                pp: 3,
                virtual_stages: 2,
                ..
            }
        ));
        let err = Mesh::new(1, 4, 1)
            .unwrap()
            .check_model(&tiny(3), 1)
            .unwrap_err();
        assert_eq!(err, MeshError::VocabTooSmall { tp: 4, vocab: 3 });
        let odd_ff = ModelDims { d_ff: 130, ..dims };
        let err = Mesh::new(1, 4, 1)
            .unwrap()
            .check_model(&odd_ff, 1)
            .unwrap_err();
        assert!(err.to_string().contains("model.d_ff (130)"), "{err}");
        assert_eq!(
            Mesh::new(0, 1, 1),
            Err(MeshError::ZeroAxis { axis: Axis::Dp })
        );
        assert!(matches!(
            Mesh::with_order(1, 1, 1, [Axis::Tp, Axis::Tp, Axis::Pp]),
            Err(MeshError::BadOrder { .. })
        ));
        let ok = Mesh::new(1, 2, 2).unwrap();
        ok.check_world(4).unwrap();
        ok.check_model(&dims, 1).unwrap();
    }
}
