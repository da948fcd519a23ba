//! `dagrun exec-stage SPEC`: the inside of a Slurm job (see
//! `executor::slurm`). Runs the stages the job spec names, in order, in the
//! workspace on the shared filesystem, and after each one rewrites the result
//! file atomically (`executor::spec`).
//!
//! # Rules
//! - It decides nothing and records nothing: no state, cache entry, run
//!   record or lineage is written here, and the workspace lock is the
//!   coordinator's. Only the stages' outputs (written atomically by the
//!   built-in kinds; `cmd` stages write their own), their logs and the result
//!   file are written.
//! - Before each stage it hashes the inputs and computes the cache key the
//!   same way the coordinator does; when the spec gives a key, a different one
//!   (inputs changed since the coordinator hashed them) fails the stage
//!   without running it. The key goes into the result file; the coordinator
//!   recomputes and compares it. The result file is sealed under the
//!   workspace integrity key (`executor::spec`).
//! - Secrets: the master key comes from its file (`DAGRUN_MASTER_KEY_FILE`,
//!   set by the batch script to a path), never from the job's environment.
//! - A spec runs once: its claim file (`X.aN.claim`, linked into place
//!   holding the job's `SLURM_JOB_ID` before anything runs, so the
//!   coordinator can tell which job runs it) refuses a second run (jobs are submitted
//!   `--no-requeue`; a retry gets a new spec), and the coordinator removes
//!   the spec when the job has ended (the next run removes any left by a
//!   killed run), so a finished run's spec cannot be replayed.
//! - Exit status: 0 when every stage succeeded, 1 otherwise (Slurm: FAILED).

use crate::engine::{Decision, Engine, Evaluation};
use crate::error::exit;
use crate::executor::spec::{self, JobResult, RESULT_FORMAT, SpecStage, StageResult};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::Instant;

/// Claim the spec (`executor::spec::claim_for_job`), or refuse: its claim
/// exists when it ran already or its job has ended. The claim holds the
/// job's id (`SLURM_JOB_ID`; empty when run by hand), so the coordinator
/// knows which job runs the spec.
fn claim(spec_path: &Path, result: &Path) -> Result<()> {
    let path = spec::claim_path(result);
    let job = std::env::var("SLURM_JOB_ID").ok().filter(|id| spec::is_job_id(id)).unwrap_or_default();
    match spec::claim_for_job(result, &job) {
        Ok(true) => Ok(()),
        Ok(false) => bail!(
            "the job spec {} has run already or its job has ended (its claim {} exists); a spec runs once, inside the job its run submitted; nothing was run",
            spec_path.display(),
            path.display()
        ),
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot make the claim {}; nothing was run", path.display()))),
    }
}

pub fn exec_stage(spec_path: &Path) -> Result<i32> {
    // The keyring that verifies the spec is the one the stages then use.
    let mut ring = None;
    let spec = spec::read_spec(spec_path, |ws| {
        let r = std::sync::Arc::new(
            crate::crypto::Keyring::open_existing(ws)?
                .ok_or_else(|| anyhow::anyhow!("the workspace {} has no master key to verify the job spec with", ws.display()))?,
        );
        let key = r.integrity_key();
        ring = Some(r);
        Ok(key)
    })?;
    let ring = ring.expect("read_spec asks for the key before it returns a spec");
    let own_dir = crate::executor::slurm::slurm_dir(&spec.workspace);
    if !spec.result.starts_with(&own_dir) || spec.result.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        bail!("the job spec {} puts its result file outside {}; it is not one dagrun wrote", spec_path.display(), own_dir.display());
    }
    // One use: the spec's claim file is made (linked into place, failing
    // on an existing one as O_EXCL does) before anything runs; one that exists means the spec ran already (its job was
    // submitted with `--no-requeue`; a retry is a new spec, `.aN`). Replaying
    // a finished run's spec would bring back outputs the run deleted (its
    // plaintext raw data: reviews 13 and 14) with no run to delete them again.
    claim(spec_path, &spec.result)?;
    let job = std::env::var("SLURM_JOB_ID").unwrap_or_else(|_| "-".into());
    let p = crate::pipeline::load(&spec.pipeline, Some(&spec.workspace), &spec.overrides, &crate::stages::kinds())?;
    let engine = Engine::with_ring(p, ring);
    let names: Vec<&str> = spec.stages.iter().map(|s| s.stage.as_str()).collect();
    eprintln!("dagrun exec-stage: run {}, Slurm job {job}: {}", spec.run_id, names.join(", "));
    let Some(integrity) = engine.states.integrity_key() else { bail!("no workspace integrity key to seal the job result with") };
    let spec_name = spec_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut result = JobResult { format: RESULT_FORMAT.into(), run_id: spec.run_id.clone(), spec: spec_name, stages: vec![], mac: None };
    let mut code = exit::OK;
    for st in &spec.stages {
        let t0 = Instant::now();
        let cpu0 = crate::util::par::thread_cpu_ns();
        let r = run_one(&engine, st);
        let secs = t0.elapsed().as_secs_f64();
        let mut sr = StageResult { stage: st.stage.clone(), ok: false, key: None, seconds: secs, cpu_seconds: None, facts: Default::default(), error: None };
        match r {
            Ok((key, done)) => {
                let own = crate::util::par::thread_cpu_ns().saturating_sub(cpu0) as f64 / 1e9;
                eprintln!("dagrun exec-stage: {} done in {secs:.2}s", st.stage);
                sr.ok = true;
                sr.key = Some(key);
                sr.cpu_seconds = Some(own + done.cpu_seconds.unwrap_or(0.0));
                sr.facts = done.report.facts;
            }
            Err(e) => {
                eprintln!("dagrun exec-stage: {} failed: {e:#}", st.stage);
                sr.error = Some(format!("{e:#}"));
                sr.facts = crate::stages::facts_of_failure(&e).cloned().unwrap_or_default();
                code = exit::FAILED;
            }
        }
        let failed = !sr.ok;
        result.stages.push(sr);
        spec::write_result(&spec.result, &result, integrity)?;
        if failed {
            break;
        }
    }
    Ok(code)
}

/// Hash the inputs, check the key, run the stage's work.
fn run_one(engine: &Engine, st: &SpecStage) -> Result<(String, crate::executor::Done)> {
    let i = engine
        .pipeline
        .stages
        .iter()
        .position(|s| s.name == st.stage)
        .with_context(|| format!("the pipeline {} has no stage {} (was it edited during the run?)", engine.pipeline.shown, st.stage))?;
    let mut missing_sensitive = Vec::new();
    let (ingredients, _) = engine.ingredients(i, &mut |d| engine.hash_input(d, &mut missing_sensitive))?;
    let key = ingredients.key();
    if let Some(k) = &st.key
        && k.as_str() != key.as_str()
    {
        bail!(
            "its cache key is {} here but {} when dagrun decided to run it: its inputs or pipeline changed since; run again",
            key.short(),
            &k[..12.min(k.len())]
        );
    }
    let s = engine.stage(i);
    for o in &s.outs {
        if let Some(parent) = engine.pipeline.abs(&o.path).parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
    }
    let ev = Evaluation { key: key.clone(), ingredients, decision: Decision::Fresh, missing_sensitive, prev: None };
    let done = engine.local_work(i, &ev)?;
    for o in &s.outs {
        engine.memo.forget(&engine.pipeline.abs(&o.path));
    }
    Ok((key.to_string(), done))
}
