//! A rank's model chunks of a layout: a seeded full model's state, each rank's chunks
//! built and loaded with their slices of a full state, and the parameter specs of every
//! rank (derived from the layout, never communicated).

use burn::tensor::Device;
use meshrec_model::params::{init_normal, param_paths, read_values, ParamInfo};
use meshrec_model::{ModelConfig, Recommender, SideInputs};

use crate::error::ParallelError;
use crate::layout::{shard_chunk, FullState, Layout, RankState};
use crate::mesh::Groups;
use crate::segment::Segment;

/// A freshly initialised full model's state (seeded, layout-independent).
pub fn initial_state(
    config: &ModelConfig,
    side: &SideInputs,
    seed: u64,
    device: &Device,
) -> (Vec<ParamInfo>, FullState) {
    let model = Recommender::new(config, side, device);
    let model = init_normal(model, seed, config.init_std, config.n_layers, device);
    let infos = param_paths(&model);
    let values = read_values(&model);
    let state = FullState::from_ordered(&infos, values);
    (infos, state)
}

/// Builds this rank's segments of `layout` loaded with its slices of `initial`.
pub fn build_segments(
    config: &ModelConfig,
    side: &SideInputs,
    layout: &Layout,
    groups: &Groups,
    initial: &FullState,
    device: &Device,
) -> Result<Vec<Segment>, ParallelError> {
    (0..layout.virtual_stages)
        .map(|local| {
            let k = layout.model_chunk(groups.coord.pp, local);
            let mut segment = Segment::new(config, side, layout, groups.coord, k, device)?;
            let values = shard_chunk(initial, &segment.specs, &layout.mesh, groups.coord)?;
            segment.set_values(&values)?;
            Ok(segment)
        })
        .collect()
}

/// The parameter specs of every rank of `layout`, in world-rank order (their values left
/// empty): what a gather needs to reassemble the full model from every rank's slices.
pub fn all_rank_specs(
    config: &ModelConfig,
    side: &SideInputs,
    layout: &Layout,
    device: &Device,
) -> Result<Vec<RankState>, ParallelError> {
    let mesh = layout.mesh;
    (0..mesh.world_size())
        .map(|r| {
            let coord = mesh.coord(r);
            let chunks = (0..layout.virtual_stages)
                .map(|local| {
                    let k = layout.model_chunk(coord.pp, local);
                    let s = Segment::new(config, side, layout, coord, k, device)?;
                    Ok((s.specs, Vec::new()))
                })
                .collect::<Result<_, ParallelError>>()?;
            Ok(RankState { coord, chunks })
        })
        .collect()
}
