//! `cargo xtask bench pipeline`: measured pipeline bubble of GPipe, 1F1B and interleaved
//! 1F1B on the local engine, next to the theory, with a timeline picture per schedule.
//!
//! The model is cut into equal stages (8 identical blocks, a small catalogue so the
//! embedding and softmax weigh little), one thread per stage. Every stage records its
//! forwards and backwards against one clock; the bubble of a stage is its idle fraction
//! between the step's start (a barrier) and the last stage's end. Each stage runs its burn
//! kernels in a one-thread rayon pool of its own, so a stage is one core (with more stages
//! than cores the stages share cores and the measured bubble no longer isolates the
//! schedule); outside a pool, burn's kernels from every stage would queue on the one
//! global pool and run one at a time.
//!
//! Beside the formula's bubble, each step is replayed with every action taking exactly as
//! long as it did (`Schedule::simulate_costs`, MODELLED): the bubble a perfect executor
//! reaches with that compute. Their difference is the executor's own waiting (message
//! latency, ordering); the rest of the gap to the formula is the stages' unequal and
//! varying compute. Each stage's compute, receive and other time, and its mean forward and
//! backward, are listed per row.
//!
//! Writes `target/bench/pipeline.json` and `target/bench/pipeline-<schedule>.svg`.

use meshrec_model::SideInputs;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use meshrec_comm::{Communicator, LocalCluster, LocalCommunicator};
use meshrec_model::data::Batch;
use meshrec_model::device::test_device;
use meshrec_model::{ModelConfig, Preset};
use meshrec_parallel::exec::{micro_batches, run_schedule, NoHooks};
use meshrec_parallel::layout::{FullState, Layout};
use meshrec_parallel::mesh::{Groups, Mesh};
use meshrec_parallel::rank::{build_segments, initial_state};
use meshrec_pipeline::schedule::{Action, Schedule, ScheduleKind};
use meshrec_pipeline::timeline::{busy_s, write_svg, Event, EventKind, Recorder, StageTimeline};
use serde_json::json;

const STEPS: usize = 7;

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
    /// Median over steps of the bubble a perfect executor would reach with the step's own
    /// action times (MODELLED), and of the measured bubble's excess over it.
    ideal: f64,
    own_waits: f64,
    step_s: f64,
    /// Per stage, the median step's fractions of the wall: computing, waiting in a
    /// receive, and neither (before its first action, after its last, between actions).
    stages: Vec<StageSplit>,
    timelines: Vec<StageTimeline>,
}

#[derive(Debug, Clone, Copy)]
struct StageSplit {
    compute: f64,
    recv: f64,
    rest: f64,
    /// The stage's first action starts and its last one ends (fractions of the wall).
    first_start: f64,
    last_end: f64,
    /// Mean forward and backward time per micro-batch, seconds.
    forward_s: f64,
    backward_s: f64,
}

fn measure(config: &ModelConfig, schedule: &Schedule, batch: &Batch) -> Measured {
    let pp = schedule.pp;
    let mesh = Mesh::new(1, 1, pp).expect("mesh");
    let layout = Layout::uniform(mesh, schedule.virtual_stages, config.n_layers).expect("layout");
    let (_, initial) = initial_state(config, &SideInputs::default(), 1, &test_device());
    let barrier = Arc::new(Barrier::new(pp));
    let origin = Arc::new(std::sync::Mutex::new(Instant::now()));
    let results = LocalCluster::run(pp, |comm| {
        // A stage's own one-thread pool: burn's kernels split work over rayon, and from a
        // thread outside a pool they would queue on the global pool that every stage
        // shares (with one thread there, the stages' kernels would run one at a time).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("stage pool");
        pool.install(|| {
            stage(
                comm, config, schedule, batch, &layout, &initial, &barrier, &origin,
            )
        })
    })
    .expect("cluster");
    summarise(schedule, results)
}

#[allow(clippy::too_many_arguments)]
fn stage(
    comm: LocalCommunicator,
    config: &ModelConfig,
    schedule: &Schedule,
    batch: &Batch,
    layout: &Layout,
    initial: &FullState,
    barrier: &Barrier,
    origin: &std::sync::Mutex<Instant>,
) -> (usize, StageSteps) {
    let device = test_device();
    let rank = comm.rank();
    let groups = Groups::new(Box::new(comm), layout.mesh).expect("groups");
    let mut segments = build_segments(
        config,
        &SideInputs::default(),
        layout,
        &groups,
        initial,
        &device,
    )
    .expect("segments");
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
            layout,
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
}

/// The bubble, the median step and each stage's split, from every stage's recorded steps.
/// One stage's recorded steps: its events and its end, seconds from the step's start.
type StageSteps = Vec<(Vec<Event>, f64)>;

fn summarise(schedule: &Schedule, results: Vec<(usize, StageSteps)>) -> Measured {
    let pp = schedule.pp;
    let mut bubbles = Vec::new();
    let mut ideals = Vec::new();
    let mut own_waits = Vec::new();
    let mut walls = Vec::new();
    let mut splits: Vec<Vec<StageSplit>> = Vec::new();
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
        // MODELLED: the schedule replayed with every action taking exactly as long as it
        // did in this step and communication free — what a perfect executor would have
        // reached with this compute. The rest of the measured bubble is the executor's.
        let took = |d: usize, a: Action| -> f64 {
            let kind = if a.is_forward() {
                EventKind::Forward
            } else {
                EventKind::Backward
            };
            results[d].1[step]
                .0
                .iter()
                .find(|e| {
                    e.kind == kind
                        && e.micro_batch == Some(a.micro_batch())
                        && e.chunk == Some(a.chunk())
                })
                .map_or(0.0, |e| e.end_s - e.start_s)
        };
        let ideal = schedule.simulate_costs(took).expect("replay").bubble;
        ideals.push(ideal);
        own_waits.push(idle - ideal);
        splits.push(
            results
                .iter()
                .map(|(_, s)| {
                    let events = &s[step].0;
                    let compute = busy_s(events, &[EventKind::Forward, EventKind::Backward]);
                    let recv = busy_s(events, &[EventKind::Recv]);
                    let work =
                        |e: &&Event| matches!(e.kind, EventKind::Forward | EventKind::Backward);
                    let first = events
                        .iter()
                        .filter(work)
                        .map(|e| e.start_s)
                        .fold(f64::MAX, f64::min);
                    let last = events
                        .iter()
                        .filter(work)
                        .map(|e| e.end_s)
                        .fold(0.0, f64::max);
                    let mean = |kind: EventKind| {
                        let d: Vec<f64> = events
                            .iter()
                            .filter(|e| e.kind == kind)
                            .map(|e| e.end_s - e.start_s)
                            .collect();
                        d.iter().sum::<f64>() / d.len().max(1) as f64
                    };
                    StageSplit {
                        forward_s: mean(EventKind::Forward),
                        backward_s: mean(EventKind::Backward),
                        compute: compute / wall,
                        recv: recv / wall,
                        rest: 1.0 - (compute + recv) / wall,
                        first_start: first / wall,
                        last_end: last / wall,
                    }
                })
                .collect(),
        );
    }
    // The split of the step whose wall is the median.
    let median_step = {
        let mut order: Vec<usize> = (0..STEPS).collect();
        order.sort_by(|a, b| walls[*a].total_cmp(&walls[*b]));
        order[STEPS / 2]
    };
    let stages = splits[median_step].clone();
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
        ideal: median(&mut ideals),
        own_waits: median(&mut own_waits),
        step_s: median(&mut walls),
        stages,
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
    println!("| schedule | pp | m | v | step ms | bubble measured | bubble theory | diff (pp) | ideal for the measured action times (modelled) | executor's own waits (pp) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    // `MESHREC_BENCH_PP=2` measures only that pipeline size.
    let sizes: Vec<usize> = match std::env::var("MESHREC_BENCH_PP")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(pp) => vec![pp],
        None => vec![2, 4],
    };
    for pp in sizes {
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
                let (ideal, own) = (measured.ideal, measured.own_waits);
                println!(
                    "| {kind} | {pp} | {m} | {v} | {:.1} | {:.3} | {:.3} | {:+.1} | {:.3} | {:+.1} |",
                    measured.step_s * 1e3,
                    measured.bubble,
                    theory,
                    (measured.bubble - theory) * 100.0,
                    ideal,
                    own * 100.0
                );
                for (d, st) in measured.stages.iter().enumerate() {
                    println!(
                        "|   stage {d} | compute {:.3} | recv {:.3} | other {:.3} | first starts {:.3} | last ends {:.3} | forward {:.2} ms | backward {:.2} ms |",
                        st.compute, st.recv, st.rest, st.first_start, st.last_end, st.forward_s * 1e3, st.backward_s * 1e3
                    );
                }
                rows.push(json!({
                    "schedule": kind.name(),
                    "pp": pp,
                    "micro_batches": m,
                    "virtual_stages": v,
                    "micro_batch_rows": 4,
                    "step_s": measured.step_s,
                    "bubble_measured": measured.bubble,
                    "bubble_theory": theory,
                    "bubble_ideal_for_measured_action_times_modelled": ideal,
                    "executor_waits": own,
                    "oversubscribed": pp > cores,
                    "stages": measured.stages.iter().map(|st| json!({
                        "compute": st.compute, "recv": st.recv, "other": st.rest,
                        "first_action_start": st.first_start, "last_action_end": st.last_end,
                        "forward_s": st.forward_s, "backward_s": st.backward_s,
                    })).collect::<Vec<_>>(),
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
