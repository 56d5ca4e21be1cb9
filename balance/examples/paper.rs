//! The paper's comparison, **simulated**: for 8/16/32/64 devices and two model sizes, the
//! best hybrid layout against the best single-mode (DP-only, TP-only, PP-only) layout, with
//! adaptive balancing on and off, on a homogeneous and a heterogeneous cluster.
//!
//! `cargo run --release -p meshrec-balance --example paper`

use meshrec_balance::plan::{plan, Candidate, PlanRequest};
use meshrec_balance::{BalanceError, Cluster, ModelShape};

fn short(c: Option<&Candidate>) -> String {
    c.map_or("-".into(), |c| c.config.label().replace(" sync", ""))
}

fn main() -> Result<(), BalanceError> {
    let global_batch = 1024;
    println!("SIMULATED (roofline compute + alpha-beta links; nothing here was measured)");
    println!(
        "global batch {global_batch} sequences; models: 100m = {} params, 1b = {} params",
        ModelShape::preset_100m().params(),
        ModelShape::preset_1b().params()
    );
    println!();
    println!("| cluster | model | devices | balance | best hybrid | samples/s | util | best single-mode | samples/s | util | throughput ratio | utilization ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut explanations = Vec::new();
    let mut pipelined = Vec::new();
    for cluster_name in ["a100x8", "a100+v100x8"] {
        for shape in [ModelShape::preset_100m(), ModelShape::preset_1b()] {
            for devices in [8usize, 16, 32, 64] {
                for balance in [true, false] {
                    let cluster = Cluster::preset(cluster_name, devices)?;
                    let mut req = PlanRequest::new(shape.clone(), cluster, devices, global_batch);
                    req.balance = balance;
                    let p = match plan(&req) {
                        Ok(p) => p,
                        Err(e) => {
                            println!(
                                "| {cluster_name} | {} | {devices} | {balance} | {e} |",
                                shape.name
                            );
                            continue;
                        }
                    };
                    let hybrid = p.best_hybrid.as_ref();
                    let single = p.best_single();
                    let (hs, hu) = hybrid.map_or((0.0, 0.0), |c| {
                        (c.result.samples_per_s, c.result.utilization_mean)
                    });
                    let (ss, su) = single.map_or((0.0, 0.0), |c| {
                        (c.result.samples_per_s, c.result.utilization_mean)
                    });
                    let ratio = |a: f64, b: f64| {
                        if a > 0.0 && b > 0.0 {
                            format!("{:.2}", a / b)
                        } else {
                            "-".into()
                        }
                    };
                    println!(
                        "| {cluster_name} | {} | {devices} | {} | {} | {hs:.0} | {:.1}% | {} | {ss:.0} | {:.1}% | {} | {} |",
                        shape.name,
                        if balance { "on" } else { "off" },
                        short(hybrid),
                        100.0 * hu,
                        short(single),
                        100.0 * su,
                        ratio(hs, ss),
                        ratio(hu, su),
                    );
                    pipelined.push(format!(
                        "| {cluster_name} | {} | {devices} | {} | {} | {:.0} | {:.1}% | {:.1}% | {} | {:.0} |",
                        shape.name,
                        if balance { "on" } else { "off" },
                        short(p.best_pipelined.as_ref()),
                        p.best_pipelined.as_ref().map_or(0.0, |c| c.result.samples_per_s),
                        p.best_pipelined.as_ref().map_or(0.0, |c| 100.0 * c.result.utilization_mean),
                        p.best_pipelined.as_ref().map_or(0.0, |c| 100.0 * c.result.bubble),
                        short(p.best_pp.as_ref()),
                        p.best_pp.as_ref().map_or(0.0, |c| c.result.samples_per_s),
                    ));
                    if balance && devices == 64 {
                        explanations.push(format!(
                            "[{cluster_name} {} {devices}] {}",
                            shape.name, p.explanation
                        ));
                    }
                }
            }
        }
    }
    println!();
    println!(
        "Layouts with pipeline parallelism (where the heavy embedding/head make balancing matter):"
    );
    println!();
    println!("| cluster | model | devices | balance | best with pp>1 | samples/s | util | bubble | best PP-only | samples/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in pipelined {
        println!("{row}");
    }
    println!();
    for e in explanations {
        println!("{e}\n");
    }
    Ok(())
}
