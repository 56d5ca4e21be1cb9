//! Progress of the leader's epoch on the terminal: an indicatif bar (step, loss, samples/s,
//! ETA) when stderr is a terminal, plain lines when it is not (a log file, CI) — at each
//! tenth of the epoch, at most one per few seconds — and nothing on the other ranks.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// One epoch's progress display.
pub struct EpochProgress {
    epoch: u64,
    total: u64,
    done: u64,
    start: Instant,
    /// Steps done before this display started (a resumed epoch), excluded from the rate.
    skipped: u64,
    view: View,
}

enum View {
    Bar(ProgressBar),
    Lines { every: u64, last: Option<Instant> },
    Hidden,
}

/// Plain lines come no closer together than this.
const LINE_INTERVAL_S: f64 = 5.0;

impl EpochProgress {
    /// Epoch `epoch` (1-based) of `total` steps, `done` of them already (a resume).
    pub fn new(epoch: u64, total: u64, done: u64, leader: bool) -> Self {
        let view = if !leader {
            View::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(epoch.to_string());
            bar.set_position(done);
            View::Bar(bar)
        } else {
            View::Lines {
                every: (total / 10).max(1),
                last: None,
            }
        };
        Self {
            epoch,
            total,
            done,
            start: Instant::now(),
            skipped: done,
            view,
        }
    }

    /// One more step done: `step` is the run's step count, `loss` and `samples_per_s` the
    /// epoch's so far.
    pub fn step(&mut self, step: u64, loss: f64, samples_per_s: f64) {
        self.done += 1;
        match &mut self.view {
            View::Bar(bar) => {
                bar.set_position(self.done);
                bar.set_message(format!(
                    "step {step} loss {loss:.4} {samples_per_s:.0} seq/s"
                ));
            }
            View::Lines { every, last } => {
                let quiet = last.is_some_and(|t| t.elapsed().as_secs_f64() < LINE_INTERVAL_S);
                if self.done.is_multiple_of(*every) && self.done < self.total && !quiet {
                    *last = Some(Instant::now());
                    let timed = self.done.saturating_sub(self.skipped).max(1);
                    let per_step = self.start.elapsed().as_secs_f64() / timed as f64;
                    let eta = per_step * self.total.saturating_sub(self.done) as f64;
                    eprintln!(
                        "epoch {} step {}/{} ({}%) run step {step} loss {loss:.4} {samples_per_s:.0} seq/s ETA {}",
                        self.epoch,
                        self.done,
                        self.total,
                        100 * self.done / self.total.max(1),
                        clock(eta)
                    );
                }
            }
            View::Hidden => {}
        }
    }

    /// The epoch is over: the bar goes (the epoch's summary line follows it).
    pub fn finish(self) {
        if let View::Bar(bar) = self.view {
            bar.finish_and_clear();
        }
    }
}

/// `1:02:03` or `2:03`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_like_a_clock() {
        assert_eq!(clock(62.4), "1:02");
        assert_eq!(clock(3723.0), "1:02:03");
        assert_eq!(clock(-5.0), "0:00");
    }
}
