//! Resharding: a full state (parameters or optimizer moments) split into the shards of one
//! layout, reassembled, split into another, reassembled again, is unchanged bit for bit.

use meshrec_model::device::test_device;
use meshrec_parallel::check::{initial_state, tiny_case};
use meshrec_parallel::layout::{shard_chunk, unshard, FullState, Layout, RankState};
use meshrec_parallel::mesh::Mesh;
use meshrec_parallel::segment::Segment;

fn shard_all(full: &FullState, layout: &Layout) -> Vec<RankState> {
    let (config, genres, _) = tiny_case();
    let device = test_device();
    (0..layout.mesh.world_size())
        .map(|rank| {
            let coord = layout.mesh.coord(rank);
            let chunks = (0..layout.virtual_stages)
                .map(|local| {
                    let k = layout.model_chunk(coord.pp, local);
                    let segment = Segment::new(&config, Some(&genres), layout, coord, k, &device);
                    let values = shard_chunk(full, &segment.specs, &layout.mesh, coord).unwrap();
                    (segment.specs.clone(), values)
                })
                .collect();
            RankState { coord, chunks }
        })
        .collect()
}

#[test]
fn state_survives_a_chain_of_layouts() {
    let (config, genres, _) = tiny_case();
    let (_, full) = initial_state(&config, Some(&genres), 9, &test_device());
    let layouts = [
        Layout::uniform(Mesh::new(2, 2, 2).unwrap(), 1, config.n_layers).unwrap(),
        Layout::uniform(Mesh::new(4, 1, 2).unwrap(), 1, config.n_layers).unwrap(),
        Layout::with_partition(
            Mesh::new(1, 4, 3).unwrap(),
            1,
            vec![2, 1, 1],
            config.n_layers,
        )
        .unwrap(),
        Layout::uniform(Mesh::new(1, 2, 2).unwrap(), 2, config.n_layers).unwrap(),
        Layout::single(config.n_layers),
    ];
    let mut current = full.clone();
    for layout in &layouts {
        let ranks = shard_all(&current, layout);
        // Every rank holds less than the whole model once it is split.
        if layout.mesh.tp * layout.mesh.pp > 1 {
            let total: usize = full.values.values().map(Vec::len).sum();
            for r in &ranks {
                let held: usize = r
                    .chunks
                    .iter()
                    .flat_map(|(_, v)| v.iter().map(Vec::len))
                    .sum();
                assert!(
                    held < total,
                    "{}: a rank holds everything",
                    layout.describe()
                );
            }
        }
        current = unshard(&full.shapes, &ranks, &layout.mesh).unwrap();
        assert_eq!(current, full, "after {}", layout.describe());
    }
}

#[test]
fn a_missing_shard_is_named() {
    let (config, genres, _) = tiny_case();
    let (_, full) = initial_state(&config, Some(&genres), 9, &test_device());
    let layout = Layout::uniform(Mesh::new(1, 2, 2).unwrap(), 1, config.n_layers).unwrap();
    let mut ranks = shard_all(&full, &layout);
    ranks.retain(|r| !(r.coord.tp == 1 && r.coord.pp == 0));
    let err = unshard(&full.shapes, &ranks, &layout.mesh)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tp rank 1"), "{err}");
}
