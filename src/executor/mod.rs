//! Executors: where a stage's *work* runs. The engine (the coordinator)
//! decides what is stale, hashes inputs before a stage and records outputs
//! after it; an executor only executes — in this process ([`local`]) or in a
//! Slurm job running `dagrun exec-stage` ([`slurm`]). What a killed run
//! left running on this machine is stopped by the next run
//! (`workspace::orphans`).
//!
//! # Rules
//! - The engine hands an executor a [`Batch`]: one stage, or a job group's
//!   chain (members in dependency order). The executor runs the members in
//!   order and stops at the first failure; it returns one result per member it
//!   finished or failed, in order (members after a failure are not returned).
//! - An executor never writes state, cache entries, run records or lineage:
//!   the engine records each member separately from the outputs on disk, which
//!   it hashes itself. What an executor reports (facts, the key a job used,
//!   CPU time) is checked, never trusted for integrity.
//! - Retries (`retries:`) are the engine's: it calls the executor again with
//!   the members that did not finish, except after a [`MayStillRun`] failure
//!   (a job of the work may still be running: a retry would run beside it).
//! - No secret crosses into a job: see [`slurm`] (`--export=NONE`, master key
//!   read from its file by the job).

pub mod local;
pub mod slurm;
pub mod spec;

use crate::pipeline::Stage;
use crate::stages::RunReport;
use anyhow::Result;
use serde_json::{Map, Value};

/// What a member's work produced.
#[derive(Debug, Default)]
pub struct Done {
    pub report: RunReport,
    /// The cache key the work ran under, when computed outside the engine (a job).
    pub key: Option<String>,
    /// Wall time of the member's work.
    pub seconds: f64,
    /// CPU time (user+sys) of the member's work, where measured.
    pub cpu_seconds: Option<f64>,
    /// Which job ran it (`slurm:ID`), when not this process.
    pub job: Option<String>,
}

/// A failure after which a job of the member's work may still be running
/// (Slurm could not say which job it was, or could not cancel it): the
/// engine does not retry it, since a retry would run the work beside that
/// job. The job stays registered; the next run cancels it.
#[derive(Debug)]
pub struct MayStillRun(pub String);

impl std::fmt::Display for MayStillRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MayStillRun {}

/// Whether `e` is (or wraps) a [`MayStillRun`].
pub fn may_still_run(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<MayStillRun>())
}

/// A member that failed in a job: the error is `message`; `job` names the job
/// that ran it (`slurm:ID`), for the run record (`slurm_job`) of a failed
/// stage as of a finished one; `facts` are those the stage's failure carried
/// in the job (`stages::FailedWithFacts`, e.g. a model's AUC below its gate).
#[derive(Debug)]
pub struct JobFailure {
    pub job: String,
    pub message: String,
    pub facts: Map<String, Value>,
}

impl std::fmt::Display for JobFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobFailure {}

/// The job a failure happened in, when it did in one (through any context
/// added since, e.g. "failed after 2 attempts").
pub fn failed_job(e: &anyhow::Error) -> Option<String> {
    e.downcast_ref::<JobFailure>().map(|f| f.job.clone())
}

/// The facts a failure carries, whether the stage failed here
/// (`stages::facts_of_failure`) or in a job that sent them back.
pub fn facts_of_failure(e: &anyhow::Error) -> Option<&Map<String, Value>> {
    crate::stages::facts_of_failure(e).or_else(|| e.downcast_ref::<JobFailure>().map(|f| &f.facts).filter(|f| !f.is_empty()))
}

/// Runs one member's work in this process (built by the engine).
pub type LocalWork<'a> = dyn Fn() -> Result<Done> + Sync + 'a;

/// One stage of a batch.
pub struct Member<'a> {
    pub index: usize,
    pub stage: &'a Stage,
    /// The cache key, when the engine knows it before execution. `None` for a
    /// member downstream of another member of the same batch: its inputs do not
    /// exist yet, so the job computes the key once they do (and the engine
    /// recomputes and compares it afterwards).
    pub key: Option<String>,
    /// The member's work in this process (what the local executor calls).
    pub local: &'a LocalWork<'a>,
}

/// Stages executed together (one Slurm job).
pub struct Batch<'a> {
    pub members: Vec<Member<'a>>,
    /// 1 for the first attempt, 2 for the first retry, …
    pub attempt: u32,
    /// Set when the run is interrupted: a job is cancelled.
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

impl Batch<'_> {
    /// A short label: the stage name, or `GROUP[TENANT]` for a job group.
    pub fn label(&self) -> String {
        match self.members.as_slice() {
            [] => String::new(),
            [m] => m.stage.name.clone(),
            [m, rest @ ..] => match (&m.stage.group, &m.stage.tenant) {
                (Some(g), Some(t)) => format!("{g}[{t}]"),
                (Some(g), None) => g.clone(),
                _ => format!("{}+{}", m.stage.name, rest.len()),
            },
        }
    }
}

/// An executor of batches.
pub trait Executor: Send + Sync {
    /// `local` or `slurm`.
    fn name(&self) -> &'static str;
    /// Execute the members in order, stopping at the first failure; one result
    /// per member finished or failed, in order.
    fn execute(&self, batch: &Batch) -> Vec<(usize, Result<Done>)>;
}
