//! The device mesh: a `dp × tp × pp` grid of ranks, rank <-> coordinate mapping, layout
//! validation against a model, and the sub-communicators of each axis.

use std::fmt;

use meshrec_comm::Communicator;
use meshrec_model::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::error::{MeshError, ParallelError};

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
    fn get(&self, axis: Axis) -> usize {
        match axis {
            Axis::Dp => self.dp,
            Axis::Tp => self.tp,
            Axis::Pp => self.pp,
        }
    }

    fn set(&mut self, axis: Axis, value: usize) {
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

    /// Checks the mesh against a world size and a model: the product must be the world size,
    /// TP must divide the heads and the MLP width (whole heads and whole columns per rank)
    /// and leave every rank some item rows, and every pipeline chunk must get a block.
    pub fn validate(
        &self,
        world_size: usize,
        config: &ModelConfig,
        virtual_stages: usize,
    ) -> Result<(), MeshError> {
        if self.world_size() != world_size {
            return Err(MeshError::WorldSize {
                mesh: *self,
                world_size,
            });
        }
        if !config.n_heads.is_multiple_of(self.tp) {
            return Err(MeshError::TpDivides {
                tp: self.tp,
                what: "model.n_heads",
                value: config.n_heads,
            });
        }
        if !config.d_ff.is_multiple_of(self.tp) {
            return Err(MeshError::TpDivides {
                tp: self.tp,
                what: "model.d_ff",
                value: config.d_ff,
            });
        }
        if config.vocab() < self.tp {
            return Err(MeshError::VocabTooSmall {
                tp: self.tp,
                vocab: config.vocab(),
            });
        }
        let chunks = self.pp * virtual_stages.max(1);
        if chunks > config.n_layers {
            return Err(MeshError::TooManyStages {
                pp: self.pp,
                virtual_stages,
                n_layers: config.n_layers,
            });
        }
        Ok(())
    }
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp{}·tp{}·pp{}", self.dp, self.tp, self.pp)
    }
}

/// The communicators of one rank: the world and one group per axis, plus the group that
/// ties the item table of the first pipeline stage to its copy in the last (Megatron's
/// "embedding group"; absent when `pp == 1` or on a middle stage).
pub struct Groups {
    pub mesh: Mesh,
    pub coord: Coord,
    pub world: Box<dyn Communicator>,
    pub dp: Box<dyn Communicator>,
    pub tp: Box<dyn Communicator>,
    pub pp: Box<dyn Communicator>,
    pub embed: Option<Box<dyn Communicator>>,
}

impl Groups {
    /// Splits `world` into the axis groups of `mesh`. Collective over `world`: every rank
    /// must call it with the same mesh.
    pub fn new(world: Box<dyn Communicator>, mesh: Mesh) -> Result<Self, ParallelError> {
        if world.size() != mesh.world_size() {
            return Err(MeshError::WorldSize {
                mesh,
                world_size: world.size(),
            }
            .into());
        }
        let coord = mesh.coord(world.rank());
        // Ranks that agree on the two other coordinates share an axis group; the key orders
        // the group by the axis coordinate, so the group rank is that coordinate.
        let color_without = |axis: Axis| -> u32 {
            let mut c = coord;
            c.set(axis, 0);
            mesh.rank(c) as u32
        };
        let dp = world.split(color_without(Axis::Dp), coord.dp as u32)?;
        let tp = world.split(color_without(Axis::Tp), coord.tp as u32)?;
        let pp = world.split(color_without(Axis::Pp), coord.pp as u32)?;
        let embed = if mesh.pp > 1 {
            let ends = coord.pp == 0 || coord.pp == mesh.pp - 1;
            let color = if ends {
                color_without(Axis::Pp)
            } else {
                // A group of one, never used: split is collective, so everyone takes part.
                (mesh.world_size() + world.rank()) as u32
            };
            let group = world.split(color, coord.pp as u32)?;
            ends.then_some(group)
        } else {
            None
        };
        Ok(Self {
            mesh,
            coord,
            world,
            dp,
            tp,
            pp,
            embed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshrec_model::Preset;

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
        let config = ModelConfig::preset(Preset::Tiny, 30);
        let mesh = Mesh::new(1, 3, 1).unwrap();
        let err = mesh.validate(3, &config, 1).unwrap_err().to_string();
        assert!(err.contains("n_heads"), "{err}");
        let err = Mesh::new(2, 1, 1)
            .unwrap()
            .validate(3, &config, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("world size 3"), "{err}");
        let err = Mesh::new(1, 1, 5)
            .unwrap()
            .validate(5, &config, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_layers"), "{err}");
        assert!(Mesh::new(0, 1, 1).is_err());
        assert!(Mesh::with_order(1, 1, 1, [Axis::Tp, Axis::Tp, Axis::Pp]).is_err());
        Mesh::new(1, 2, 2).unwrap().validate(4, &config, 1).unwrap();
    }

    #[test]
    fn groups_follow_the_mesh() {
        let mesh = Mesh::new(2, 2, 2).unwrap();
        let out = meshrec_comm::LocalCluster::run(8, move |comm| {
            let groups = Groups::new(Box::new(comm), mesh).unwrap();
            let c = groups.coord;
            assert_eq!(groups.tp.rank(), c.tp);
            assert_eq!(groups.dp.rank(), c.dp);
            assert_eq!(groups.pp.rank(), c.pp);
            // Sum of global ranks over each group tells who is in it.
            let r = groups.world.rank() as f32;
            let mut tp = [r];
            groups
                .tp
                .all_reduce(&mut tp, meshrec_comm::ReduceOp::Sum)
                .unwrap();
            let mut pp = [r];
            groups
                .pp
                .all_reduce(&mut pp, meshrec_comm::ReduceOp::Sum)
                .unwrap();
            let embed = groups.embed.as_ref().map(|e| e.size());
            (groups.world.rank(), tp[0], pp[0], embed)
        })
        .unwrap();
        for (rank, tp, pp, embed) in out {
            let c = mesh.coord(rank);
            let tp_expect: usize = (0..2).map(|t| mesh.rank(Coord { tp: t, ..c })).sum();
            let pp_expect: usize = (0..2).map(|p| mesh.rank(Coord { pp: p, ..c })).sum();
            assert_eq!(tp as usize, tp_expect);
            assert_eq!(pp as usize, pp_expect);
            assert_eq!(embed, Some(2));
        }
    }
}
