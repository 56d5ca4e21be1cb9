//! The planner's report without building the trainer: **simulated** layouts for a model
//! preset on a cluster preset, what `meshrec plan` prints.
//!
//! `cargo run --release -p meshrec-balance --example plan -- [MODEL] [DEVICES] [CLUSTER] [GLOBAL_BATCH] [TOP]`
//! (defaults: `1b 64 a100x8 1024 10`).

use meshrec_balance::plan::{plan, render_report, PlanRequest};
use meshrec_balance::BalanceError;

fn main() -> Result<(), BalanceError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let number = |i: usize, default: usize| -> Result<usize, BalanceError> {
        let text = arg(i, &default.to_string());
        text.parse().map_err(|_| BalanceError::InvalidLayout {
            layout: text.clone(),
            reason: format!("argument {} must be a number", i + 1),
        })
    };
    let model = arg(0, "1b");
    let devices = number(1, 64)?;
    let cluster = arg(2, "a100x8");
    let global_batch = number(3, 1024)?;
    let top = number(4, 10)?;
    let req = PlanRequest::from_names(&model, &cluster, devices, global_batch)?;
    let p = plan(&req)?;
    print!("{}", render_report(&p, top));
    Ok(())
}
