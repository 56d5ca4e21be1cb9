//! `cargo xtask bench tp`: step time and bytes each rank sends per step for tensor
//! parallelism 1, 2 and 4 on the local engine, next to Megatron's per-layer volume
//! `8·b·s·h·(t-1)/t` elements (two all-reduces forward and two backward per block, ring
//! algorithm), plus the embedding and head all-reduces meshrec adds.
//!
//! The `small` preset has 2 heads, which tp 4 cannot split; the benchmark runs it with 4
//! heads of width 16 (same d_model, same FLOPs). On this 2-core machine tp 4 shares cores,
//! so its step time shows the overhead, not a speed-up.
//!
//! Writes `target/bench/tp.json`.

use meshrec_model::SideInputs;
use std::path::PathBuf;
use std::time::Instant;

use meshrec_comm::LocalCluster;
use meshrec_model::data::Batch;
use meshrec_model::device::test_device;
use meshrec_model::{ModelConfig, Preset};
use meshrec_parallel::exec::{micro_batches, reduce_model_parallel_grads, run_schedule, NoHooks};
use meshrec_parallel::layout::Layout;
use meshrec_parallel::mesh::{Groups, Mesh};
use meshrec_parallel::rank::{build_segments, initial_state};
use meshrec_pipeline::schedule::{Schedule, ScheduleKind};
use meshrec_pipeline::timeline::Recorder;
use serde_json::json;

const STEPS: usize = 4;
const ITEMS: usize = 1682;

fn main() {
    let out_dir = std::env::var_os("MESHREC_BENCH_DIR")
        .map_or_else(|| PathBuf::from("target/bench"), PathBuf::from);
    let mut config = ModelConfig::preset(Preset::Small, ITEMS);
    config.n_heads = 4;
    config.dropout = 0.0;
    let (b, s, h) = (64usize, config.max_len, config.d_model);
    let inputs: Vec<u32> = (0..b * s)
        .map(|i| 1 + ((i * 7919) % ITEMS) as u32)
        .collect();
    let targets: Vec<u32> = (0..b * s)
        .map(|i| 1 + ((i * 104_729 + 3) % ITEMS) as u32)
        .collect();
    let batch = Batch {
        batch_size: b,
        seq_len: s,
        inputs,
        targets,
    };
    let device = test_device();
    let (_, initial) = initial_state(&config, &SideInputs::default(), 1, &device);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("tensor parallelism, small preset with 4 heads (d {h}, {} blocks), batch {b}×{s}, {ITEMS} items, local engine, {cores} cores", config.n_layers);
    println!("| tp | step ms | ratio to tp 1 | MB sent/rank/step | Megatron blocks MB | + embedding & head MB | measured / model |");
    println!("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    let mut base_s = None;
    for tp in [1usize, 2, 4] {
        let layout = Layout::uniform(Mesh::new(1, tp, 1).expect("mesh"), 1, config.n_layers)
            .expect("layout");
        let schedule = Schedule::new(ScheduleKind::OneFOneB, 1, 1, 1).expect("schedule");
        let results = LocalCluster::run(tp, |comm| {
            let groups = Groups::new(Box::new(comm), layout.mesh).expect("groups");
            let mut segments = build_segments(
                &config,
                &SideInputs::default(),
                &layout,
                &groups,
                &initial,
                &device,
            )
            .expect("segments");
            let micro = micro_batches(&batch, 1);
            let scale = 1.0 / batch.num_targets() as f32;
            let mut times = Vec::new();
            let mut bytes = 0u64;
            for step in 0..=STEPS {
                groups.world.barrier().expect("barrier");
                groups.tp.reset_stats();
                let t0 = Instant::now();
                run_schedule(
                    &mut segments,
                    &layout,
                    &schedule,
                    &groups,
                    &micro,
                    scale,
                    &mut Recorder::new(),
                    &mut NoHooks,
                )
                .expect("step");
                reduce_model_parallel_grads(&mut segments, &groups).expect("reduce");
                let dt = t0.elapsed().as_secs_f64();
                for s in &mut segments {
                    s.zero_grads();
                }
                if step > 0 {
                    times.push(dt);
                    bytes = groups.tp.stats().total().bytes_sent;
                }
            }
            times.sort_by(f64::total_cmp);
            (times[times.len() / 2], bytes)
        })
        .expect("cluster");
        let step_s = results.iter().map(|r| r.0).fold(0.0, f64::max);
        let sent = results.iter().map(|r| r.1).max().unwrap_or(0);
        let base = *base_s.get_or_insert(step_s);
        let frac = (tp as f64 - 1.0) / tp as f64;
        let bsh = (b * s * h) as f64;
        // Megatron: per block two all-reduces forward, two backward, ring: 2(t-1)/t each.
        let blocks_bytes = 8.0 * bsh * frac * 4.0 * config.n_layers as f64;
        // meshrec adds the vocab-parallel embedding (one forward all-reduce), the head's
        // dh (one all-reduce of targets × h) and the per-row softmax statistics (3 values).
        let rows_with_targets = batch.num_targets() as f64;
        let extra_bytes =
            2.0 * frac * 4.0 * (bsh + rows_with_targets * h as f64 + 3.0 * rows_with_targets);
        let model = blocks_bytes + extra_bytes;
        let ratio = if model > 0.0 {
            sent as f64 / model
        } else {
            1.0
        };
        println!(
            "| {tp} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            step_s * 1e3,
            step_s / base,
            sent as f64 / 1e6,
            blocks_bytes / 1e6,
            extra_bytes / 1e6,
            ratio
        );
        rows.push(json!({
            "tp": tp,
            "step_s": step_s,
            "step_ratio_to_tp1": step_s / base,
            "bytes_sent_per_rank": sent,
            "megatron_block_bytes": blocks_bytes,
            "embedding_and_head_bytes": extra_bytes,
            "measured_over_model": ratio,
        }));
    }
    let report = json!({
        "cores": cores,
        "model": { "preset": "small", "n_heads": config.n_heads, "d_model": h, "n_layers": config.n_layers, "batch": b, "seq": s, "items": ITEMS },
        "rows": rows,
    });
    std::fs::create_dir_all(&out_dir).expect("bench dir");
    let path = out_dir.join("tp.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json"))
        .expect("write tp.json");
    println!("wrote {}", path.display());
}
