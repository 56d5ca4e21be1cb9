//! Elastic training: a run that keeps going when a data-parallel replica is lost and takes
//! in one that joins. `section` is `[elastic]`; `health` keeps liveness (a heartbeat
//! thread) apart from progress (phases, ticks, whether the rank waits on a peer) and judges
//! them; `watchdog` reads every rank's health; `membership` is the local engine's
//! rendezvous (who is in, the step to continue from, the new world); `local` runs the
//! ranks as threads through membership changes; `supervisor` is `meshrec launch`, which
//! restarts an MPI job from its newest checkpoint with the surviving world.

mod health;
mod local;
mod membership;
mod phase;
mod section;
mod supervisor;
mod watchdog;

pub use health::{
    health_file, judge, read_health_file, HealthSnapshot, Heartbeat, PhaseHooks, RankHealth,
    Verdict,
};
pub use local::train_elastic_local;
pub use membership::{Arrival, Arrived, Assignment, Membership, Settings};
pub use phase::{Budgets, Phase};
pub use section::{ElasticNeeds, ElasticSection};
pub use supervisor::{launch, Attempt, LaunchOptions, LaunchReport, HEALTH_DIR_ENV};
