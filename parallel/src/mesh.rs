//! The device mesh on a model and a communicator: layout validation against a
//! `ModelConfig`, and the sub-communicators of each axis. The grid itself (axes,
//! coordinates, rank order) is `meshrec-pipeline`'s.

use meshrec_comm::Communicator;
use meshrec_model::ModelConfig;
pub use meshrec_pipeline::mesh::{Axis, Coord, Mesh, MeshError, ModelDims};

use crate::error::ParallelError;
use crate::named::NamedGroup;

/// Checks `mesh` against a world size and a model (see [`Mesh::check_model`]).
pub fn validate_layout(
    mesh: &Mesh,
    world_size: usize,
    config: &ModelConfig,
    virtual_stages: usize,
) -> Result<(), MeshError> {
    mesh.check_world(world_size)?;
    mesh.check_model(&model_dims(config), virtual_stages)
}

/// What a layout must fit of a model: heads and MLP width (TP), item rows (the
/// vocabulary-parallel table), blocks (PP).
pub fn model_dims(config: &ModelConfig) -> ModelDims {
    ModelDims {
        n_heads: config.n_heads,
        d_ff: config.d_ff,
        vocab: config.vocab(),
        n_layers: config.n_layers,
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
        // Each group names its peers by world rank and coordinates in its errors.
        let along = |axis: Axis, at: &[usize]| -> Vec<usize> {
            at.iter()
                .map(|&i| {
                    let mut c = coord;
                    c.set(axis, i);
                    mesh.rank(c)
                })
                .collect()
        };
        let axis_group = |axis: Axis| -> Result<Box<dyn Communicator>, ParallelError> {
            let inner = world.split(color_without(axis), coord.get(axis) as u32)?;
            let members = along(axis, &(0..mesh.size(axis)).collect::<Vec<_>>());
            Ok(Box::new(NamedGroup::new(
                inner,
                axis.to_string(),
                mesh,
                members,
            )))
        };
        let dp = axis_group(Axis::Dp)?;
        let tp = axis_group(Axis::Tp)?;
        let pp = axis_group(Axis::Pp)?;
        let embed = if mesh.pp > 1 {
            let ends = coord.pp == 0 || coord.pp == mesh.pp - 1;
            let color = if ends {
                color_without(Axis::Pp)
            } else {
                // A group of one, never used: split is collective, so everyone takes part.
                (mesh.world_size() + world.rank()) as u32
            };
            let group = world.split(color, coord.pp as u32)?;
            let members = along(Axis::Pp, &[0, mesh.pp - 1]);
            ends.then(|| {
                Box::new(NamedGroup::new(group, "embedding-group", mesh, members))
                    as Box<dyn Communicator>
            })
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
    fn layouts_are_checked_against_the_model_config() {
        let config = ModelConfig::preset(Preset::Tiny, 30);
        let err = validate_layout(&Mesh::new(1, 3, 1).unwrap(), 3, &config, 1).unwrap_err();
        assert!(err.to_string().contains("n_heads"), "{err}");
        let err = validate_layout(&Mesh::new(2, 1, 1).unwrap(), 3, &config, 1).unwrap_err();
        assert!(err.to_string().contains("world size 3"), "{err}");
        validate_layout(&Mesh::new(1, 2, 2).unwrap(), 4, &config, 1).unwrap();
        assert_eq!(model_dims(&config).vocab, config.vocab());
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
