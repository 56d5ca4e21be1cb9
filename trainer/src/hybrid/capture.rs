//! `--timeline`: every rank's events of a few steps, gathered to the leader and drawn side
//! by side into the run folder (`timeline.svg`, `timeline.json`).

use std::path::PathBuf;

use meshrec_comm::Communicator;
use meshrec_pipeline::timeline::{write_svg, Event, StageTimeline};
use meshrec_pipeline::Mesh;

use crate::error::RunError;

/// The steps of the run whose per-rank timelines are drawn, and where.
pub struct TimelineCapture {
    first_step: u64,
    steps: u64,
    dir: PathBuf,
    /// Per captured step, every rank's events (on the leader).
    captured: Vec<Vec<StageTimeline>>,
}

impl TimelineCapture {
    /// `steps` steps from the third (the first two warm up), drawn into `dir`.
    pub fn new(steps: u64, dir: PathBuf) -> Self {
        Self {
            first_step: 2,
            steps,
            dir,
            captured: Vec::new(),
        }
    }

    /// Whether `step` is captured (its ranks then start together, so their rows line up).
    pub fn wants(&self, step: u64) -> bool {
        (self.first_step..self.first_step + self.steps).contains(&step)
    }

    /// Gathers every rank's events of `step` to the leader (collective over `world`); after
    /// the last captured step the leader draws them, titled `title`.
    pub fn capture(
        &mut self,
        step: u64,
        events: &[Event],
        world: &dyn Communicator,
        mesh: &Mesh,
        title: &str,
    ) -> Result<(), RunError> {
        let mine = serde_json::to_vec(events).map_err(|e| RunError::Parallel(e.to_string()))?;
        let all = world.all_gatherv_bytes(&mine)?;
        if world.rank() != 0 {
            return Ok(());
        }
        let mut stages = Vec::with_capacity(all.len());
        for (rank, bytes) in all.iter().enumerate() {
            let events: Vec<Event> = serde_json::from_slice(bytes)
                .map_err(|e| RunError::Parallel(format!("rank {rank}'s timeline: {e}")))?;
            let c = mesh.coord(rank);
            stages.push(StageTimeline {
                rank,
                label: format!("r{rank} dp{} tp{} pp{}", c.dp, c.tp, c.pp),
                events,
            });
        }
        self.captured.push(stages);
        if step + 1 == self.first_step + self.steps {
            self.draw(step, title)?;
        }
        Ok(())
    }

    /// The captured steps one after the other: each step's events shifted past the end of
    /// the previous one.
    fn draw(&self, last_step: u64, title: &str) -> Result<(), RunError> {
        let mut merged: Vec<StageTimeline> = self.captured[0].clone();
        let mut offset = 0.0;
        for (i, step_stages) in self.captured.iter().enumerate() {
            let end = step_stages
                .iter()
                .flat_map(|s| s.events.iter().map(|e| e.end_s))
                .fold(0.0, f64::max);
            if i > 0 {
                for (m, s) in merged.iter_mut().zip(step_stages) {
                    m.events.extend(s.events.iter().map(|e| Event {
                        start_s: e.start_s + offset,
                        end_s: e.end_s + offset,
                        ..*e
                    }));
                }
            }
            offset += end;
        }
        let svg = self.dir.join("timeline.svg");
        let title = format!("{title} · steps {}..{last_step}", self.first_step);
        write_svg(&svg, &title, &merged).map_err(|e| RunError::Parallel(e.to_string()))?;
        let json = self.dir.join("timeline.json");
        let text = serde_json::to_string(&self.captured).map_err(|e| RunError::io(&json, e))?;
        std::fs::write(&json, text).map_err(|e| RunError::io(&json, e))?;
        tracing::info!(svg = %svg.display(), "timeline written");
        Ok(())
    }
}
