//! Run observers: what the scheduler tells the outside world while a run goes.
//!
//! Rules:
//! - The scheduler calls [`RunObserver::run_started`] once after taking the
//!   lock, [`RunObserver::stage_started`] / [`RunObserver::stage_finished`]
//!   on the stage's own (blocking) thread around its execution — exactly once
//!   each for every stage that was started, whatever its outcome (cached,
//!   restored, ran, failed, panicked) — and [`RunObserver::run_finished`] once
//!   with the run record before it is written (an observer may add its own
//!   summary field to it).
//! - Between the two, [`RunObserver::stage_working`] just before a stage
//!   does its work (not cached, not restored: before its outputs are
//!   prepared and its command or kind runs). It can
//!   also come for a stage already finished in this run (a cached producer
//!   rerun to regenerate a deleted sensitive output): ignore what you do not
//!   expect.
//! - Stages never started (skipped because an upstream stage failed, or the
//!   run was interrupted first) get no stage calls.
//! - An observer never fails or delays the run: it logs its own problems, and
//!   anything slow (network) happens on its own thread.
//!
//! Observers today: OpenLineage events ([`super::openlineage`]) and run
//! metrics ([`super::run_metrics`]).

use super::Engine;
use super::runs::{RunRecord, StageRecord};

pub trait RunObserver: Send + Sync {
    fn run_started(&self, _engine: &Engine) {}
    fn stage_started(&self, _engine: &Engine, _stage: usize) {}
    /// The stage is about to do its work (it was not cached or restored).
    fn stage_working(&self, _engine: &Engine, _stage: usize) {}
    fn stage_finished(&self, _engine: &Engine, _stage: usize, _record: &StageRecord) {}
    fn run_finished(&self, _engine: &Engine, _record: &mut RunRecord) {}
}
