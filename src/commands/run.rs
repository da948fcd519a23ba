//! `dagrun run PIPELINE [STAGE…]`: bring the selected stages up to date and
//! print one summary line (plus the per-tenant summary), or the run record as
//! JSON. `--dry-run` is `dagrun status` with `--force` taken into account.

use crate::engine::report::{Verbosity, say};
use crate::engine::runs;
use crate::engine::scheduler::{self, RunOptions};
use crate::error::exit;
use crate::pipeline::Pipeline;
use anyhow::Result;
use std::time::Duration;

/// What `dagrun run` was asked for, beyond the pipeline.
pub struct RunArgs {
    pub stages: Vec<String>,
    /// `--force` given without a stage (empty string) or with stages.
    pub force: Vec<String>,
    pub jobs: Option<usize>,
    pub wait: Option<f64>,
    pub dry_run: bool,
    pub json: bool,
    pub verbosity: Verbosity,
    /// `--openlineage-url` (else `DAGRUN_OPENLINEAGE_URL`).
    pub openlineage_url: Option<String>,
    /// `--metrics-file` (else `metrics_file:` in config/dagrun.yaml).
    pub metrics_file: Option<std::path::PathBuf>,
    /// `--pull`: the remote cache consulted for keys not in the local cache.
    pub remote: Option<std::sync::Arc<dyn crate::engine::RemoteSource>>,
    /// `--executor`: where every stage's work runs, overriding the pipeline.
    pub executor: Option<ExecutorArg>,
}

/// `--executor local|slurm`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ExecutorArg {
    Local,
    Slurm,
}

/// `--force` as the scheduler takes it: none, everything (`Some([])`), or named stages.
fn force_selection(force: &[String]) -> Option<Vec<String>> {
    if force.is_empty() {
        None
    } else if force.iter().any(|f| f.is_empty()) {
        Some(vec![])
    } else {
        Some(force.to_vec())
    }
}

pub fn run(p: Pipeline, args: &RunArgs) -> Result<i32> {
    let force = force_selection(&args.force);
    if args.dry_run {
        return super::status::show(p, &args.stages, &force, args.json);
    }
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(crate::pipeline::MAX_JOBS));
    let opts = RunOptions {
        targets: args.stages.clone(),
        force,
        jobs,
        wait: args.wait.map(Duration::from_secs_f64),
        verbosity: if args.json { Verbosity::Quiet } else { args.verbosity },
        openlineage_url: args.openlineage_url.clone(),
        metrics_file: args.metrics_file.clone(),
        remote: args.remote.clone(),
        json: args.json,
        executor: args.executor.map(|e| match e {
            ExecutorArg::Local => crate::pipeline::ExecutorKind::Local,
            ExecutorArg::Slurm => crate::pipeline::ExecutorKind::Slurm,
        }),
    };
    let (workspace, shown) = (p.workspace.clone(), p.shown.clone());
    let out = match scheduler::run(p, &opts) {
        Ok(out) => out,
        Err(e) => {
            if crate::error::exit_code_of(&e) == exit::CONFIG {
                note_failed_start(&workspace, &shown, args.metrics_file.as_deref());
            }
            return Err(e);
        }
    };
    if args.json {
        say(&serde_json::to_string_pretty(&out.record)?);
        return Ok(exit::OK);
    }
    if args.verbosity != Verbosity::Quiet {
        let count = |s: runs::Status| out.record.stages.iter().filter(|r| r.status == s).count();
        if count(runs::Status::Ran) + count(runs::Status::Restored) == 0 {
            let all = match out.record.stages.len() {
                1 => "the stage is".to_string(),
                n => format!("all {n} stages"),
            };
            say(&format!("{all} up to date ({:.3}s, run {})", out.record.seconds, out.record.run_id));
        } else {
            say(&format!("{} ({:.2}s, run {})", out.record.tally(), out.record.seconds, out.record.run_id));
        }
        for line in &out.summary {
            say(line);
        }
    }
    Ok(exit::OK)
}

/// A run that did not start (the pipeline or the workspace's settings did
/// not load: exit 2) says so in the metrics file when one is known: the
/// `metrics_file` flag, else `metrics_file:` of a `config/dagrun.yaml` that
/// loads (`engine::run_metrics::write_failed_start`).
pub fn note_failed_start(workspace: &std::path::Path, pipeline_shown: &str, metrics_flag: Option<&std::path::Path>) {
    if let Some(path) = crate::config::DagrunConfig::metrics_file_or(workspace, metrics_flag) {
        crate::engine::run_metrics::write_failed_start(&path, workspace, pipeline_shown, exit::CONFIG);
    }
}
