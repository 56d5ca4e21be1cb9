//! `comm` benchmark: bus bandwidth (nccl-tests definitions) of all-reduce, all-gather and
//! reduce-scatter, 1 KB to 256 MB, local engine with 2 and 4 ranks, MPI engine with 2 and 4
//! ranks beside a raw MPI loop on the same buffers (feature `mpi`: the bench re-launches
//! itself under `mpirun`), the single-thread memcpy bandwidth, and the measured crossover of
//! the local engine's all-reduce algorithms. Writes `target/bench/comm.json`.
//!
//! Every point is timed `MESHREC_COMM_BENCH_REPS` times (default 3) and reported by its median
//! (`time_s`, `busbw_gbps`) beside the best repetition; the MPI engine and the raw MPI loop
//! alternate repetition by repetition, and `ratio_to_raw_median` is the median of those paired
//! ratios, which a machine busy with other work disturbs far less than either time alone.
//!
//! `cargo bench -p meshrec-comm --bench comm [--features mpi]`
//! Env: `MESHREC_BENCH_DIR` (output folder), `MESHREC_COMM_BENCH_MAX_BYTES` and
//! `MESHREC_COMM_BENCH_MIN_BYTES` (size range), `MESHREC_COMM_BENCH_REPS` (repetitions),
//! `MESHREC_COMM_BENCH_RANKS` (e.g. `2`), `MESHREC_COMM_BENCH_OPS` (e.g. `all_reduce`),
//! `MESHREC_COMM_BENCH_ENGINES` (`local`, `mpi`), `MESHREC_COMM_BENCH_CROSSOVER=0` (skip the
//! algorithm crossover table). Defaults run everything.

use std::time::Instant;

use meshrec_comm::cost::{all_reduce_bus_bandwidth, gather_scatter_bus_bandwidth};
use meshrec_comm::local::AllReduceChoice;
use meshrec_comm::{chunk_len, Communicator, LocalCluster, LocalConfig, ReduceOp};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    engine: String,
    op: String,
    ranks: usize,
    bytes: usize,
    iters: usize,
    time_s: f64,
    busbw_gbps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_mpi_busbw_gbps: Option<f64>,
    /// MPI engine with `check_sizes` off (no length pre-check).
    #[serde(skip_serializing_if = "Option::is_none")]
    nocheck_busbw_gbps: Option<f64>,
    /// Repetitions behind `time_s` (its median) and `time_s_min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reps: Option<usize>,
    /// Best repetition's seconds per iteration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time_s_min: Option<f64>,
    /// Bus bandwidth of the best repetition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    busbw_best_gbps: Option<f64>,
    /// Raw MPI loop: median seconds per iteration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    raw_mpi_time_s: Option<f64>,
    /// Median over repetitions of engine busbw / raw MPI busbw measured back to back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ratio_to_raw_median: Option<f64>,
    /// The same paired median for the engine with `check_sizes` off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nocheck_ratio_to_raw_median: Option<f64>,
}

impl Row {
    /// A row from per-repetition times (seconds per iteration).
    fn new(
        engine: &str,
        op: &str,
        ranks: usize,
        bytes: usize,
        iters: usize,
        times: &[f64],
    ) -> Self {
        let t = median(times);
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        Row {
            engine: engine.into(),
            op: op.into(),
            ranks,
            bytes,
            iters,
            time_s: t,
            busbw_gbps: busbw(op, ranks, bytes, t),
            raw_mpi_busbw_gbps: None,
            nocheck_busbw_gbps: None,
            reps: Some(times.len()),
            time_s_min: Some(best),
            busbw_best_gbps: Some(busbw(op, ranks, bytes, best)),
            raw_mpi_time_s: None,
            ratio_to_raw_median: None,
            nocheck_ratio_to_raw_median: None,
        }
    }
}

/// Median of `v` (mean of the middle two for an even count); NaN when empty or any is NaN.
fn median(v: &[f64]) -> f64 {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A comma-separated list from the environment, or `default`.
fn env_list(name: &str, default: &[&str]) -> Vec<String> {
    match std::env::var(name) {
        Ok(s) if !s.trim().is_empty() => s.split(',').map(|x| x.trim().to_owned()).collect(),
        _ => default.iter().map(|&x| x.to_owned()).collect(),
    }
}

fn reps() -> usize {
    env_usize("MESHREC_COMM_BENCH_REPS", 3).max(1)
}

fn ranks_list() -> Vec<usize> {
    env_list("MESHREC_COMM_BENCH_RANKS", &["2", "4"])
        .iter()
        .filter_map(|s| s.parse().ok())
        .filter(|&n| n >= 1)
        .collect()
}

fn ops() -> Vec<&'static str> {
    let want = env_list("MESHREC_COMM_BENCH_OPS", &OPS);
    OPS.into_iter()
        .filter(|o| want.iter().any(|w| w == o))
        .collect()
}

fn engine_on(name: &str) -> bool {
    env_list("MESHREC_COMM_BENCH_ENGINES", &["local", "mpi"])
        .iter()
        .any(|e| e == name)
}

const OPS: [&str; 3] = ["all_reduce", "all_gather", "reduce_scatter"];

fn sizes() -> Vec<usize> {
    let max = env_usize("MESHREC_COMM_BENCH_MAX_BYTES", 256 << 20);
    let min = env_usize("MESHREC_COMM_BENCH_MIN_BYTES", 1024);
    let mut v = Vec::new();
    let mut s = 1024usize;
    while s <= max {
        if s >= min {
            v.push(s);
        }
        s *= 4;
    }
    v
}

/// About 64 MiB of buffer per repetition: fewer iterations at the large end keep the whole
/// run to a few minutes, and many at the small end make a repetition last milliseconds, not
/// microseconds, so that one preemption by another process does not decide it.
fn iters_for(bytes: usize) -> usize {
    ((64usize << 20) / bytes).clamp(2, 20_000)
}

fn busbw(op: &str, n: usize, bytes: usize, t: f64) -> f64 {
    let b = if op == "all_reduce" {
        all_reduce_bus_bandwidth(n, bytes as f64, t)
    } else {
        gather_scatter_bus_bandwidth(n, bytes as f64, t)
    };
    b / 1e9
}

/// Runs `reps` repetitions of `iters` calls of `op` on `c` over buffers for `bytes` (the
/// nccl-tests `S`); returns each repetition's seconds per iteration, measured between
/// barriers, after one warm-up call. NaN on failure.
fn time_op(c: &dyn Communicator, op: &str, bytes: usize, iters: usize, reps: usize) -> Vec<f64> {
    let n = c.size();
    let elems = bytes / 4;
    let run = |buf: &mut Vec<f32>, out: &mut Vec<f32>| -> meshrec_comm::Result<()> {
        match op {
            "all_reduce" => c.all_reduce(buf, ReduceOp::Sum),
            "all_gather" => c.all_gather(&buf[..elems / n], &mut out[..elems / n * n]),
            _ => {
                let len = chunk_len(elems, n, c.rank());
                c.reduce_scatter(buf, &mut out[..len], ReduceOp::Sum)
            }
        }
    };
    let mut buf = vec![1.0f32; elems];
    let mut out = vec![0.0f32; elems];
    if let Err(e) = run(&mut buf, &mut out).and_then(|()| c.barrier()) {
        eprintln!("bench: {op} {bytes} B failed: {e}");
        return vec![f64::NAN];
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        for _ in 0..iters {
            if let Err(e) = run(&mut buf, &mut out) {
                eprintln!("bench: {op} {bytes} B failed: {e}");
                return vec![f64::NAN];
            }
        }
        let _ = c.barrier();
        times.push(t0.elapsed().as_secs_f64() / iters as f64);
    }
    times
}

fn memcpy_gbps() -> f64 {
    let n = (64usize << 20) / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    dst.copy_from_slice(&src);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
}

fn local_rows(rows: &mut Vec<Row>) {
    let reps = reps();
    for n in ranks_list() {
        for op in ops() {
            for &bytes in &sizes() {
                let iters = iters_for(bytes);
                let times = LocalCluster::run(n, |c| time_op(&c, op, bytes, iters, reps))
                    .map(|mut v| v.swap_remove(0))
                    .unwrap_or_else(|_| vec![f64::NAN]);
                let row = Row::new("local", op, n, bytes, iters, &times);
                print_row(&row);
                rows.push(row);
            }
        }
    }
}

/// Seconds per all-reduce of `bytes` with a forced algorithm.
fn local_algo_time(n: usize, bytes: usize, algo: AllReduceChoice) -> f64 {
    let cfg = LocalConfig {
        all_reduce: algo,
        ..LocalConfig::default()
    };
    let iters = ((8usize << 20) / bytes).clamp(20, 2000);
    LocalCluster::run_with_config(n, cfg, |c| {
        median(&time_op(&c, "all_reduce", bytes, iters, reps()))
    })
    .map(|v| v[0])
    .unwrap_or(f64::NAN)
}

fn crossover() -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for n in [2usize, 3, 4] {
        let mut table = Vec::new();
        let mut first_ring_win = None;
        let mut first_in_place_win = None;
        let mut bytes = 256usize;
        while bytes <= 1 << 20 {
            let rd = local_algo_time(n, bytes, AllReduceChoice::RecursiveDoubling);
            let ring = local_algo_time(n, bytes, AllReduceChoice::Ring);
            let in_place = local_algo_time(n, bytes, AllReduceChoice::InPlace);
            if ring < rd && first_ring_win.is_none() {
                first_ring_win = Some(bytes);
            }
            if in_place < rd.min(ring) && first_in_place_win.is_none() {
                first_in_place_win = Some(bytes);
            }
            table.push(serde_json::json!({
                "bytes": bytes,
                "rd_us": rd * 1e6,
                "ring_us": ring * 1e6,
                "in_place_us": in_place * 1e6,
            }));
            bytes *= 4;
        }
        let show = |b: Option<usize>| b.map_or("never (<= 1 MiB)".to_owned(), |b| format!("{b} B"));
        println!(
            "crossover local n={n}: ring first faster than recursive doubling at {}, in place \
             first faster than both at {}",
            show(first_ring_win),
            show(first_in_place_win)
        );
        out.push(serde_json::json!({
            "ranks": n,
            "ring_first_faster_bytes": first_ring_win,
            "in_place_first_faster_bytes": first_in_place_win,
            "points": table,
        }));
    }
    out
}

fn print_row(r: &Row) {
    let extra = match (r.raw_mpi_busbw_gbps, r.nocheck_busbw_gbps) {
        (Some(raw), Some(nc)) => format!(
            "  raw {:>7.3}  ratio {:>5.2} (paired {:>5.2})  nocheck {:>7.3} ({:>4.2}, paired {:>4.2})",
            raw,
            r.busbw_gbps / raw,
            r.ratio_to_raw_median.unwrap_or(f64::NAN),
            nc,
            nc / raw,
            r.nocheck_ratio_to_raw_median.unwrap_or(f64::NAN)
        ),
        _ => match r.busbw_best_gbps {
            Some(b) => format!("  best {b:>7.3}"),
            None => String::new(),
        },
    };
    println!(
        "{:<6} {:<15} n={} {:>11} B  {:>11.1} us  busbw {:>7.3} GB/s{extra}",
        r.engine,
        r.op,
        r.ranks,
        r.bytes,
        r.time_s * 1e6,
        r.busbw_gbps
    );
}

#[cfg(feature = "mpi")]
mod mpi_part {
    use super::*;
    use meshrec_comm::mpi::{MpiConfig, MpiRuntime};
    use mpi::ffi;
    use mpi::raw::AsRaw;
    use std::ffi::c_void;
    use std::os::raw::c_int;

    pub const CHILD: &str = "MESHREC_COMM_BENCH_MPI_CHILD";

    /// The raw MPI loop: the same call the engine makes, with no engine around it.
    fn raw_time(
        comm: &mpi::topology::SimpleCommunicator,
        op: &str,
        bytes: usize,
        iters: usize,
        in_place: *const c_void,
    ) -> f64 {
        use mpi::collective::CommunicatorCollectives;
        use mpi::topology::Communicator as _;
        let n = comm.size() as usize;
        let r = comm.rank() as usize;
        let elems = bytes / 4;
        let mut buf = vec![1.0f32; elems.max(1)];
        let mut out = vec![0.0f32; elems.max(1)];
        let counts: Vec<c_int> = (0..n).map(|q| chunk_len(elems, n, q) as c_int).collect();
        let call = |buf: &mut Vec<f32>, out: &mut Vec<f32>| {
            // SAFETY: buffers sized for the counts passed; MPI_IN_PLACE from the runtime's
            // detection (Open MPI: (void*)1).
            unsafe {
                match op {
                    "all_reduce" => ffi::MPI_Allreduce(
                        in_place,
                        buf.as_mut_ptr() as *mut c_void,
                        elems as c_int,
                        ffi::RSMPI_FLOAT,
                        ffi::RSMPI_SUM,
                        comm.as_raw(),
                    ),
                    "all_gather" => ffi::MPI_Allgather(
                        buf.as_ptr() as *const c_void,
                        (elems / n) as c_int,
                        ffi::RSMPI_FLOAT,
                        out.as_mut_ptr() as *mut c_void,
                        (elems / n) as c_int,
                        ffi::RSMPI_FLOAT,
                        comm.as_raw(),
                    ),
                    _ => ffi::MPI_Reduce_scatter(
                        buf.as_ptr() as *const c_void,
                        out.as_mut_ptr() as *mut c_void,
                        counts.as_ptr(),
                        ffi::RSMPI_FLOAT,
                        ffi::RSMPI_SUM,
                        comm.as_raw(),
                    ),
                };
            }
        };
        let _ = r;
        call(&mut buf, &mut out);
        comm.barrier();
        let t0 = Instant::now();
        for _ in 0..iters {
            call(&mut buf, &mut out);
        }
        comm.barrier();
        t0.elapsed().as_secs_f64() / iters as f64
    }

    pub fn child() {
        let rt = match MpiRuntime::init() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("bench child: {e}");
                std::process::exit(2);
            }
        };
        if !rt.library_version().contains("Open MPI") {
            eprintln!("bench child: raw loop needs Open MPI's MPI_IN_PLACE");
            std::process::exit(2);
        }
        // Open MPI's MPI_IN_PLACE is the address 1 (a sentinel, never dereferenced).
        #[allow(clippy::manual_dangling_ptr)]
        let in_place = 1usize as *const c_void;
        let world = rt.world(MpiConfig::default());
        let nocheck = rt.world(MpiConfig {
            check_sizes: false,
            ..MpiConfig::default()
        });
        let n = world.size();
        let reps = reps();
        for op in ops() {
            for &bytes in &sizes() {
                let iters = iters_for(bytes);
                // Engine, raw and engine without checks on the same buffer sizes, repetition
                // by repetition, rotating which goes first.
                let (mut te, mut tr, mut tn) = (Vec::new(), Vec::new(), Vec::new());
                for rep in 0..reps {
                    for k in 0..3 {
                        match (rep + k) % 3 {
                            0 => te.extend(time_op(&world, op, bytes, iters, 1)),
                            1 => tr.push(raw_time(world.raw(), op, bytes, iters, in_place)),
                            _ => tn.extend(time_op(&nocheck, op, bytes, iters, 1)),
                        }
                    }
                }
                if world.rank() == 0 {
                    let paired =
                        |t: &[f64]| -> Vec<f64> { t.iter().zip(&tr).map(|(e, r)| r / e).collect() };
                    let raw = median(&tr);
                    let mut row = Row::new("mpi", op, n, bytes, iters, &te);
                    row.raw_mpi_busbw_gbps = Some(busbw(op, n, bytes, raw));
                    row.raw_mpi_time_s = Some(raw);
                    row.nocheck_busbw_gbps = Some(busbw(op, n, bytes, median(&tn)));
                    row.ratio_to_raw_median = Some(median(&paired(&te)));
                    row.nocheck_ratio_to_raw_median = Some(median(&paired(&tn)));
                    println!("ROW {}", serde_json::to_string(&row).unwrap_or_default());
                }
            }
        }
        drop(nocheck);
        drop(world);
        drop(rt);
    }

    pub fn rows(rows: &mut Vec<Row>) {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("bench: no current exe ({e}); skipping MPI rows");
                return;
            }
        };
        for n in ranks_list() {
            let out = std::process::Command::new("mpirun")
                .args([
                    "--allow-run-as-root",
                    "--oversubscribe",
                    "-np",
                    &n.to_string(),
                ])
                .arg(&exe)
                .env(CHILD, "1")
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    for line in String::from_utf8_lossy(&o.stdout).lines() {
                        if let Some(j) = line.strip_prefix("ROW ") {
                            if let Ok(r) = serde_json::from_str::<Row>(j) {
                                print_row(&r);
                                rows.push(r);
                            }
                        }
                    }
                }
                Ok(o) => eprintln!(
                    "bench: mpirun -np {n} failed ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("bench: cannot run mpirun ({e}); skipping MPI rows"),
            }
        }
    }
}

fn main() {
    #[cfg(feature = "mpi")]
    if std::env::var_os(mpi_part::CHILD).is_some() {
        mpi_part::child();
        return;
    }
    // `cargo bench` passes `--bench`; nothing else to parse.
    let t_start = Instant::now();
    let memcpy = memcpy_gbps();
    println!("memcpy (single thread, 64 MiB): {memcpy:.2} GB/s");
    println!(
        "machine: {} hardware threads; 4-rank runs oversubscribe when that is below 4",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let cross = if std::env::var("MESHREC_COMM_BENCH_CROSSOVER").as_deref() == Ok("0") {
        Vec::new()
    } else {
        crossover()
    };
    let mut rows = Vec::new();
    if engine_on("local") {
        local_rows(&mut rows);
    }
    #[cfg(feature = "mpi")]
    if engine_on("mpi") {
        mpi_part::rows(&mut rows);
    }
    #[cfg(not(feature = "mpi"))]
    println!("(MPI rows need --features mpi)");

    // Targets.
    let mut targets = Vec::new();
    for r in rows
        .iter()
        .filter(|r| r.engine == "local" && r.op == "all_reduce" && r.bytes >= 16 << 20)
    {
        let frac = r.busbw_gbps / memcpy;
        let best = r.busbw_best_gbps.map_or(f64::NAN, |b| b / memcpy);
        println!(
            "target local all_reduce n={} {} B: busbw/memcpy = {:.2} (best rep {:.2}; target >= 0.70) {}",
            r.ranks,
            r.bytes,
            frac,
            best,
            if frac >= 0.7 { "MET" } else { "MISSED" }
        );
        targets.push(serde_json::json!({"what": "local_all_reduce_vs_memcpy", "ranks": r.ranks, "bytes": r.bytes, "ratio": frac, "ratio_best_rep": best, "met": frac >= 0.7}));
    }
    for r in rows.iter().filter(|r| r.engine == "mpi") {
        if let Some(raw) = r.raw_mpi_busbw_gbps {
            let ratio = r.busbw_gbps / raw;
            let paired = r.ratio_to_raw_median.unwrap_or(ratio);
            if r.op == "all_reduce" {
                println!(
                    "target mpi all_reduce n={} {} B: engine/raw = {:.2} (paired median {:.2}; target >= 0.95) {}",
                    r.ranks,
                    r.bytes,
                    ratio,
                    paired,
                    if paired >= 0.95 { "MET" } else { "MISSED" }
                );
            }
            targets.push(serde_json::json!({"what": "mpi_engine_vs_raw", "op": r.op, "ranks": r.ranks, "bytes": r.bytes, "ratio": ratio, "ratio_paired_median": paired, "met": paired >= 0.95}));
        }
    }
    let met = targets.iter().filter(|t| t["met"] == true).count();
    println!("targets met: {met}/{}", targets.len());

    let dir = std::env::var("MESHREC_BENCH_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench").to_owned());
    let json = serde_json::json!({
        "bench": "comm",
        "memcpy_gbps": memcpy,
        "reps": reps(),
        "hardware_threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "note": "4-rank rows oversubscribe a machine with fewer than 4 hardware threads",
        "all_reduce_crossover": cross,
        "targets": targets,
        "rows": rows,
        "wall_s": t_start.elapsed().as_secs_f64(),
    });
    let path = std::path::Path::new(&dir).join("comm.json");
    match std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
    }) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("bench: cannot write {}: {e}", path.display()),
    }
}
