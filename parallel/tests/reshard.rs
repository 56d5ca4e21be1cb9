//! Resharding: a full state (parameters or optimizer moments) split into the shards of one
//! layout, reassembled, split into another, reassembled again, is unchanged bit for bit; and
//! a shard equals the slice Megatron's layout prescribes, built here by index arithmetic
//! independent of the crate's shard functions.

use meshrec_model::device::test_device;
use meshrec_parallel::check::tiny_case;
use meshrec_parallel::layout::{shard_chunk, unshard, FullState, Layout, RankState};
use meshrec_parallel::mesh::Mesh;
use meshrec_parallel::rank::initial_state;
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
                    let segment =
                        Segment::new(&config, &genres, layout, coord, k, &device).unwrap();
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
    let (_, full) = initial_state(&config, &genres, 9, &test_device());
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
    let (_, full) = initial_state(&config, &genres, 9, &test_device());
    let layout = Layout::uniform(Mesh::new(1, 2, 2).unwrap(), 1, config.n_layers).unwrap();
    let mut ranks = shard_all(&full, &layout);
    ranks.retain(|r| !(r.coord.tp == 1 && r.coord.pp == 0));
    let err = unshard(&full.shapes, &ranks, &layout.mesh)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tp rank 1"), "{err}");
}

/// Rows `rows` and columns `cols` of a row-major `[_, width]` matrix.
fn block(
    full: &[f32],
    width: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Vec<f32> {
    rows.flat_map(|r| cols.clone().map(move |c| full[r * width + c]))
        .collect()
}

#[test]
fn shards_are_the_slices_megatron_prescribes() {
    let (config, genres, _) = tiny_case();
    let (_, full) = initial_state(&config, &genres, 9, &test_device());
    let layout = Layout::uniform(Mesh::new(1, 2, 2).unwrap(), 1, config.n_layers).unwrap();
    let ranks = shard_all(&full, &layout);
    let (d, ff) = (config.d_model, config.d_ff);
    let vocab = full.shapes["embed.items.weight"][0];
    for rank in &ranks {
        let t = rank.coord.tp;
        let (specs, values) = &rank.chunks[0];
        let held = |path: &str| -> &Vec<f32> {
            let i = specs
                .iter()
                .position(|s| s.local_path == path)
                .unwrap_or_else(|| {
                    let known: Vec<_> = specs.iter().map(|s| s.local_path.as_str()).collect();
                    panic!("{path} missing on {:?}: {known:?}", rank.coord)
                });
            &values[i]
        };
        let first_block = if rank.coord.pp == 0 {
            0
        } else {
            config.n_layers / 2
        };
        let global =
            |local: &str| local.replacen("blocks.0.", &format!("blocks.{first_block}."), 1);
        // Column-parallel (weights stored [d_in, d_out]): this rank's half of the outputs.
        let wq = &full.values[&global("blocks.0.attn.wq.weight")];
        assert_eq!(
            held("blocks.0.attn.wq.weight"),
            &block(wq, d, 0..d, t * d / 2..(t + 1) * d / 2)
        );
        let w1 = &full.values[&global("blocks.0.mlp.w1.weight")];
        assert_eq!(
            held("blocks.0.mlp.w1.weight"),
            &block(w1, ff, 0..d, t * ff / 2..(t + 1) * ff / 2)
        );
        // Row-parallel: this rank's half of the inputs.
        let wo = &full.values[&global("blocks.0.attn.wo.weight")];
        assert_eq!(
            held("blocks.0.attn.wo.weight"),
            &block(wo, d, t * d / 2..(t + 1) * d / 2, 0..d)
        );
        let w2 = &full.values[&global("blocks.0.mlp.w2.weight")];
        assert_eq!(
            held("blocks.0.mlp.w2.weight"),
            &block(w2, d, t * ff / 2..(t + 1) * ff / 2, 0..d)
        );
        // Replicated norms: whole.
        assert_eq!(
            held("blocks.0.attn_norm.Rms.gamma"),
            &full.values[&global("blocks.0.attn_norm.Rms.gamma")]
        );
        // The vocabulary-parallel table on the first stage, its tied copy on the last: the
        // first ceil(vocab / 2) rows on TP rank 0, the rest on rank 1.
        let half = vocab.div_ceil(2);
        let rows = if t == 0 { 0..half } else { half..vocab };
        let table = block(&full.values["embed.items.weight"], d, rows, 0..d);
        let path = if rank.coord.pp == 0 {
            "embed.items.weight"
        } else {
            "head"
        };
        assert_eq!(held(path), &table, "{path} on {:?}", rank.coord);
    }
}
