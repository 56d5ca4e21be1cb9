//! `cargo xtask bench pipeline`: measured pipeline bubble of GPipe, 1F1B and interleaved
//! 1F1B on the local engine, next to the theory, with a timeline picture per schedule.
//!
//! The model is cut into equal stages (8 identical blocks, a small catalogue so the
//! embedding and softmax weigh little), one thread per stage. Every stage records its
//! forwards and backwards against one clock; the bubble of a stage is its idle fraction
//! between the step's start (a barrier) and the last stage's end. Run with
//! `RAYON_NUM_THREADS=1` (xtask does) so a stage is one core: with more stages than cores
//! the stages share cores and the measured bubble no longer isolates the schedule.
//!
//! Writes `target/bench/pipeline.json` and `target/bench/pipeline-<schedule>.svg`.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use meshrec_comm::{Communicator, LocalCluster};
use meshrec_model::data::Batch;
use meshrec_model::device::test_device;
use meshrec_model::{ModelConfig, Preset};
use meshrec_parallel::exec::{micro_batches, run_schedule, NoHooks};
use meshrec_parallel::layout::Layout;
use meshrec_parallel::mesh::{Groups, Mesh};
use meshrec_parallel::rank::{build_segments, initial_state};
use meshrec_pipeline::schedule::{Schedule, ScheduleKind};
use meshrec_pipeline::timeline::{busy_s, write_svg, EventKind, Recorder, StageTimeline};
use serde_json::json;

const STEPS: usize = 3;

fn config() -> ModelConfig {
    let mut c = ModelConfig::preset(Preset::Small, 63);
    c.n_layers = 8;
    c.dropout = 0.0;
    c.max_len = 32;
    c
}

fn batch(rows: usize, seq: usize, items: usize) -> Batch {
    let inputs: Vec<u32> = (0..rows * seq)
        .map(|i| 1 + ((i * 7919) % items) as u32)
        .collect();
    let targets: Vec<u32> = (0..rows * seq)
        .map(|i| 1 + ((i * 104_729 + 3) % items) as u32)
        .collect();
    Batch {
        batch_size: rows,
        seq_len: seq,
        inputs,
        targets,
    }
}

struct Measured {
    bubble: f64,
    step_s: f64,
    timelines: Vec<StageTimeline>,
}

fn measure(config: &ModelConfig, schedule: &Schedule, batch: &Batch) -> Measured {
    let pp = schedule.pp;
    let mesh = Mesh::new(1, 1, pp).expect("mesh");
    let layout = Layout::uniform(mesh, schedule.virtual_stages, config.n_layers).expect("layout");
    let device = test_device();
    let (_, initial) = initial_state(config, None, 1, &device);
    let barrier = Arc::new(Barrier::new(pp));
    let origin = Arc::new(std::sync::Mutex::new(Instant::now()));
    let results = LocalCluster::run(pp, |comm| {
        let rank = comm.rank();
        let groups = Groups::new(Box::new(comm), layout.mesh).expect("groups");
        let mut segments =
            build_segments(config, None, &layout, &groups, &initial, &device).expect("segments");
        let micro = micro_batches(batch, schedule.micro_batches);
        let scale = 1.0 / batch.num_targets() as f32;
        let mut steps = Vec::new();
        for step in 0..=STEPS {
            // One origin per step, taken by the first thread out of the barrier.
            if barrier.wait().is_leader() {
                *origin.lock().expect("origin") = Instant::now();
            }
            barrier.wait();
            let start = *origin.lock().expect("origin");
            let mut recorder = Recorder::starting_at(start);
            run_schedule(
                &mut segments,
                &layout,
                schedule,
                &groups,
                &micro,
                scale,
                &mut recorder,
                &mut NoHooks,
            )
            .expect("step");
            let end_s = recorder.now_s();
            for s in &mut segments {
                s.zero_grads();
            }
            if step > 0 {
                steps.push((recorder.take(), end_s));
            }
        }
        (rank, steps)
    })
    .expect("cluster");
    let mut bubbles = Vec::new();
    let mut walls = Vec::new();
    for step in 0..STEPS {
        let wall = results.iter().map(|(_, s)| s[step].1).fold(0.0, f64::max);
        let idle: f64 = results
            .iter()
            .map(|(_, s)| {
                1.0 - busy_s(&s[step].0, &[EventKind::Forward, EventKind::Backward]) / wall
            })
            .sum::<f64>()
            / pp as f64;
        bubbles.push(idle);
        walls.push(wall);
    }
    let timelines = results
        .iter()
        .map(|(rank, s)| StageTimeline {
            rank: *rank,
            label: format!("stage {rank}"),
            events: s[STEPS - 1].0.clone(),
        })
        .collect();
    Measured {
        bubble: median(&mut bubbles),
        step_s: median(&mut walls),
        timelines,
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let out_dir = std::env::var_os("MESHREC_BENCH_DIR")
        .map_or_else(|| PathBuf::from("target/bench"), PathBuf::from);
    let config = config();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("pipeline bubble, 8 equal blocks (d {}), local engine, {cores} cores, RAYON_NUM_THREADS={threads}", config.d_model);
    println!("| schedule | pp | m | v | step ms | bubble measured | bubble theory | diff (pp) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for pp in [2usize, 4] {
        for m in [4usize, 8, 16] {
            let batch = batch(4 * m, config.max_len, config.num_items);
            for (kind, v) in [
                (ScheduleKind::GPipe, 1),
                (ScheduleKind::OneFOneB, 1),
                (ScheduleKind::Interleaved, 2),
            ] {
                let schedule = Schedule::new(kind, pp, m, v).expect("schedule");
                let measured = measure(&config, &schedule, &batch);
                let theory = schedule.bubble_theory();
                println!(
                    "| {kind} | {pp} | {m} | {v} | {:.1} | {:.3} | {:.3} | {:+.1} |",
                    measured.step_s * 1e3,
                    measured.bubble,
                    theory,
                    (measured.bubble - theory) * 100.0
                );
                rows.push(json!({
                    "schedule": kind.name(),
                    "pp": pp,
                    "micro_batches": m,
                    "virtual_stages": v,
                    "micro_batch_rows": 4,
                    "step_s": measured.step_s,
                    "bubble_measured": measured.bubble,
                    "bubble_theory": theory,
                    "oversubscribed": pp > cores,
                }));
                if pp == 4 && m == 8 {
                    let path = out_dir.join(format!("pipeline-{}.svg", kind.name()));
                    let title = format!("{kind}, pp {pp}, {m} micro-batches, v {v}");
                    write_svg(&path, &title, &measured.timelines).expect("svg");
                    println!("timeline: {}", path.display());
                }
            }
        }
    }
    let report = json!({
        "cores": cores,
        "rayon_threads": threads,
        "model": { "d_model": config.d_model, "n_layers": config.n_layers, "seq": config.max_len, "items": config.num_items },
        "rows": rows,
    });
    let path = out_dir.join("pipeline.json");
    std::fs::create_dir_all(&out_dir).expect("bench dir");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json"))
        .expect("write pipeline.json");
    println!("wrote {}", path.display());
}
